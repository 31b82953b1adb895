"""gRPC error statuses with google.rpc details, for every program's servicers.

INVALID_ARGUMENT carries a google.rpc.BadRequest whose field violations use the field
paths of file validation (`spec.classes[0].rate`); other codes carry the detail message
they are given. Everything is capped to fit gRPC's trailers.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agent.common.policy.model import PolicyError

# Errors travel in trailers, and clients refuse trailers over 8 KiB (gRPC's default
# soft limit); the details go base64-encoded, so a policy with a hundred problems
# reports the first that fit and says how many more.
MAX_DETAIL_BYTES = 3 * 1024
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256
MAX_PRECONDITIONS = 8


def rich_status(code: grpc.StatusCode, message: str, detail: object) -> grpc.Status:
    """A status carrying one google.rpc detail message (BadRequest, PreconditionFailure),
    for `abort_with_status` (sync) or `abort(code, details, trailing_metadata)` (asyncio)."""
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type]
    # StatusCode.value is (google.rpc code number, name).
    status = status_pb2.Status(code=code.value[0], message=message, details=[packed])
    return rpc_status.to_status(status)


def invalid_status(exc: PolicyError) -> grpc.Status:
    """INVALID_ARGUMENT with a BadRequest naming each violation's field path, capped so
    the trailers fit gRPC's limit."""
    detail = error_details_pb2.BadRequest()
    shown = 0
    for violation in exc.violations:
        field = detail.field_violations.add(
            field=clip(violation.path), description=clip(violation.reason)
        )
        if detail.ByteSize() > MAX_DETAIL_BYTES:
            detail.field_violations.remove(field)
            break
        shown += 1
    hidden = len(exc.violations) - shown
    if hidden:
        detail.field_violations.add(field="", description=f"{hidden} more problems not shown")
    texts = [f"{v.path}: {v.reason}" if v.path else v.reason for v in exc.violations]
    message = clip("; ".join(texts), MAX_MESSAGE_CHARS)
    return rich_status(grpc.StatusCode.INVALID_ARGUMENT, message, detail)


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
