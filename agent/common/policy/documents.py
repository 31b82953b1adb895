"""Policy documents (the YAML of policy files) to and from `fabric.v1.PolicyObject`.

A document takes one parse whichever way it comes in: a policy file, fabricctl's
`-f FILE`, or a request to the agent or the aggregator are all validated by the model
(agent.common.policy.model.parse_document), with the same field paths and reasons.
Clients validate before they send, then send the model's own spelling; the servers
validate what arrives again.

The messages' proto3 JSON names are the documents' keys, so the mapping is `json_format`
both ways. Numbers for string fields (a stored document may hold a port as a number) are
turned into their text, led by the message descriptors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agent.common.policy.limits import MAX_DOCUMENT_BYTES, format_bytes
from agent.common.policy.model import (
    PolicyError,
    PolicyObject,
    PolicyViolation,
    parse_document,
)
from agent.proto.fabric.v1 import qos_service_pb2

# The oneof field of a PolicyObject for each document `kind`.
KINDS: dict[str, str] = {"QosPolicy": "policy", "QosAssignment": "assignment"}


class ObjectError(ValueError):
    """A stored or dumped document that does not fit the message: `path` (YAML names)
    and why. Documents from users are validated by the model first (PolicyError)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def object_from_document(
    document: object, source: str, *, number: int | None = None
) -> qos_service_pb2.PolicyObject:
    """The PolicyObject for a policy document a user wrote (a file, stdin): validated by
    the model first, exactly as a policy file is, so a document is accepted or refused
    the same way whichever way it takes; then the model's own spelling goes into the
    message (a rate, a port or a mark in its canonical text). Raises PolicyError naming
    `source` (document `number` of a file holding several) and each field."""
    return object_from_model(parse_document(document, source, number=number))


def object_from_model(model: PolicyObject) -> qos_service_pb2.PolicyObject:
    """The PolicyObject of a validated policy or assignment."""
    return encode_document(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def encode_document(document: Mapping[str, Any]) -> qos_service_pb2.PolicyObject:
    """The PolicyObject of a document in the model's spelling (a validated model's dump,
    or a document an agent or the aggregator stored); ObjectError if it does not fit."""
    kind = document.get("kind")
    if kind not in KINDS:
        raise ObjectError("kind", f"must be {' or '.join(KINDS)}, got {kind!r}")
    obj = qos_service_pb2.PolicyObject()
    message = getattr(obj, KINDS[str(kind)])
    try:
        json_format.ParseDict(_coerce(document, message.DESCRIPTOR), message)
    except json_format.ParseError as exc:
        raise ObjectError("", str(exc)) from None
    return obj


def document_from_object(obj: qos_service_pb2.PolicyObject) -> tuple[str, dict[str, Any]]:
    """(kind field, document) of a PolicyObject; an empty oneof gives ('', {})."""
    which = obj.WhichOneof("kind")
    if which is None:
        return "", {}
    message: Message = getattr(obj, which)
    return which, json_format.MessageToDict(message)


def name_of(obj: qos_service_pb2.PolicyObject) -> str:
    which = obj.WhichOneof("kind")
    if which is None:
        return ""
    return str(getattr(obj, which).metadata.name)


def _coerce(value: Any, descriptor: Descriptor | None) -> Any:
    """Numbers given for string fields become strings, recursively; anything else is left
    to ParseDict (which names what it rejects)."""
    if not isinstance(value, Mapping) or descriptor is None:
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = descriptor.fields_by_camelcase_name.get(str(key))
        if field is None:
            out[key] = item
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(item, list):
                out[key] = [_coerce(x, field.message_type) for x in item]
            else:
                out[key] = _coerce(item, field.message_type)
        elif field.type == FieldDescriptor.TYPE_STRING:
            out[key] = [_text(x) for x in item] if isinstance(item, list) else _text(item)
        else:
            out[key] = item
    return out


def _text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


# Where a request's violations say they come from (the file of file validation).
REQUEST_SOURCE = "request"


def model_from_request(obj: qos_service_pb2.PolicyObject) -> PolicyObject:
    """The validated model of a request's object; raises PolicyError with field paths
    as the files' validation gives them."""
    # Sized before it is turned into a document: the transport's own limit is larger.
    size = obj.ByteSize()
    if size > MAX_DOCUMENT_BYTES:
        reason = (
            f"document of {format_bytes(size)} encoded; at most {format_bytes(MAX_DOCUMENT_BYTES)}"
        )
        raise PolicyError([PolicyViolation(REQUEST_SOURCE, "object", reason)])
    which, document = document_from_object(obj)
    if not which:
        reason = "required field is missing: give a policy or an assignment"
        raise PolicyError([PolicyViolation(REQUEST_SOURCE, "object", reason)])
    return parse_document(document, REQUEST_SOURCE)
