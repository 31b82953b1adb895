"""`fabricctl policy apply|delete|list|status|plan|renew`: QoS policies and assignments
on an agent through fabric.v1.QosService.

Documents are the YAML of policy files (`apiVersion: fabric.qos/v1alpha1`, kind
QosPolicy or QosAssignment), several per file allowed, `-f -` for stdin. Every document
of every file is parsed before the first RPC, so a typo applies nothing; then they are
applied in order and the first refusal stops the rest. The RPC functions raise
grpc.RpcError for `main` to report, except where a document is named in the message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc
import yaml
from google.protobuf import duration_pb2

from agent.common.config import parse_duration
from agent.common.exits import ExitCode
from agent.common.policy.bounded import load_yaml_documents
from agent.common.policy.documents import name_of, object_from_document
from agent.common.policy.limits import MAX_DOCUMENT_BYTES, format_bytes
from agent.ctl.client import (
    Target,
    UsageError,
    describe_failure,
    failure_from_error,
)
from agent.ctl.output import expiry, human_bps, human_bytes, human_duration, or_dash, table, to_json
from agent.proto.fabric.v1 import qos_service_pb2, qos_service_pb2_grpc

STDIN = "-"
# How stdin is named in messages.
STDIN_NAME = "stdin"


@dataclass(frozen=True)
class Document:
    """One policy document: where it came from (`FILE` or `FILE (document N)`, as
    `fabric-agent policy validate` names it) and the object it holds."""

    where: str
    object: qos_service_pb2.PolicyObject

    @property
    def name(self) -> str:
        return name_of(self.object)


def load_documents(files: Sequence[str], stdin: TextIO | None = None) -> list[Document]:
    """The documents of `files` in order; raises UsageError for a file that cannot be read
    or is not YAML, PolicyError naming the file, document and field of a document the
    policy model refuses."""
    documents: list[Document] = []
    for file in files:
        label = STDIN_NAME if file == STDIN else file
        # No further than the limit on a document (characters here, a bound on its bytes):
        # what the agent would refuse is not read, parsed or sent.
        try:
            if file == STDIN:
                text = (stdin if stdin is not None else sys.stdin).read(MAX_DOCUMENT_BYTES + 1)
            else:
                with open(file, encoding="utf-8") as handle:
                    text = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"{label}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{label}: not UTF-8 text: {exc}") from None
        if len(text) > MAX_DOCUMENT_BYTES:
            limit = format_bytes(MAX_DOCUMENT_BYTES)
            raise UsageError(f"{label}: a document of more than {limit}; at most {limit}")
        documents.extend(_parse(label, text))
    if not documents:
        raise UsageError(f"{', '.join(files) or 'no files'}: no policy documents")
    return documents


def _parse(label: str, text: str) -> Iterator[Document]:
    try:
        parsed = [doc for doc in load_yaml_documents(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where}: invalid YAML: {problem}") from None
    several = len(parsed) > 1
    for number, document in enumerate(parsed, start=1):
        where = f"{label} (document {number})" if several else label
        # The agent's own parse (PolicyError): refused here as `policy validate` refuses
        # a file, before anything is sent.
        obj = object_from_document(document, label, number=number if several else None)
        yield Document(where, obj)


def parse_ttl(text: str | None) -> duration_pb2.Duration | None:
    """`--ttl 1h` -> Duration; None when not given. Raises UsageError."""
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if seconds <= 0:
        raise UsageError(f"--ttl: {text!r} must be positive")
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(seconds * 1e9))
    return ttl


def _stub(channel: grpc.Channel) -> qos_service_pb2_grpc.QosServiceStub:
    return qos_service_pb2_grpc.QosServiceStub(channel)


def _changes(count: int) -> str:
    return f"{count} change{'' if count == 1 else 's'}"


def _print_changes(changes: Sequence[str]) -> None:
    for change in changes:
        print(f"  {change}")


def _report(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def apply(
    channel: grpc.Channel,
    documents: Sequence[Document],
    *,
    target: Target,
    ttl: duration_pb2.Duration | None,
    dry_run: bool,
    output: str,
    timeout_s: float,
) -> int:
    """Apply each document in turn; stop at the first error, with its exit code."""
    stub = _stub(channel)
    for document in documents:
        request = qos_service_pb2.ApplyPolicyRequest(object=document.object, validate_only=dry_run)
        if ttl is not None:
            request.lease_ttl.CopyFrom(ttl)
        try:
            response = stub.ApplyPolicy(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            failure = failure_from_error(exc)
            _report(describe_failure(failure, document.where, target))
            return failure.exit_code
        if output == "json":
            print(to_json(response, one_line=True), flush=True)
            continue
        name = response.policy.name or document.name
        count = _changes(len(response.changes))
        line = (
            f"{name}: would apply ({count}, dry run)" if dry_run else f"{name}: applied ({count})"
        )
        info = response.policy
        if info.state in (
            qos_service_pb2.POLICY_STATE_PENDING,
            qos_service_pb2.POLICY_STATE_FAILED,
        ):
            line += f", {_state(info.state)}"
            if info.message:
                line += f": {info.message}"
        if not dry_run and info.HasField("lease_expire_time"):
            line += f", lease expires {_expiry(info)}"
        print(line)
        _print_changes(response.changes)
    return ExitCode.OK


def plan(
    channel: grpc.Channel,
    documents: Sequence[Document],
    *,
    target: Target,
    output: str,
    timeout_s: float,
) -> int:
    """What applying each document would change, like `kubectl diff`: 0 none, 1 changes,
    2 a document refused (the others are still planned), 3 agent unreachable."""
    stub = _stub(channel)
    changed = refused = False
    for document in documents:
        request = qos_service_pb2.PlanPolicyRequest(object=document.object)
        try:
            response = stub.PlanPolicy(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            failure = failure_from_error(exc)
            _report(describe_failure(failure, document.where, target))
            if failure.exit_code != ExitCode.INVALID:
                return failure.exit_code
            refused = True
            continue
        changed = changed or bool(response.changes)
        if output == "json":
            print(to_json(response, one_line=True), flush=True)
            continue
        count = len(response.changes)
        print(f"{document.name} ({document.where}): {_changes(count) if count else 'no changes'}")
        _print_changes(response.changes)
    if refused:
        return ExitCode.INVALID
    return ExitCode.CHANGES if changed else ExitCode.OK


def delete(
    channel: grpc.Channel,
    name: str,
    *,
    dry_run: bool,
    output: str,
    timeout_s: float,
    ignore_not_found: bool = False,
) -> int:
    """Delete an API policy; with ignore_not_found a policy already gone (an expired
    lease) is success, as `kubectl delete --ignore-not-found` has it."""
    request = qos_service_pb2.DeletePolicyRequest(name=name, validate_only=dry_run)
    try:
        response = _stub(channel).DeletePolicy(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        gone = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND
        if not (ignore_not_found and gone):
            raise
        if output == "json":
            print(to_json(qos_service_pb2.DeletePolicyResponse()))
        else:
            print(f"{name}: not found, nothing to delete")
        return ExitCode.OK
    if output == "json":
        print(to_json(response))
        return ExitCode.OK
    count = _changes(len(response.changes))
    print(f"{name}: would delete ({count}, dry run)" if dry_run else f"{name}: deleted ({count})")
    _print_changes(response.changes)
    return ExitCode.OK


def renew(
    channel: grpc.Channel,
    name: str,
    *,
    ttl: duration_pb2.Duration | None,
    output: str,
    timeout_s: float,
) -> int:
    request = qos_service_pb2.RenewLeaseRequest(name=name)
    if ttl is not None:
        request.lease_ttl.CopyFrom(ttl)
    response = _stub(channel).RenewLease(request, timeout=timeout_s)
    if output == "json":
        print(to_json(response))
        return ExitCode.OK
    info = response.policy
    until = _expiry(info) if info.HasField("lease_expire_time") else "no lease"
    print(f"{info.name or name}: lease renewed, expires {until}")
    return ExitCode.OK


def list_policies(channel: grpc.Channel, *, output: str, timeout_s: float) -> int:
    """Every policy, all pages; a table or one ListPoliciesResponse as JSON."""
    stub = _stub(channel)
    policies: list[qos_service_pb2.PolicyInfo] = []
    token = ""
    while True:
        response = stub.ListPolicies(
            qos_service_pb2.ListPoliciesRequest(page_token=token), timeout=timeout_s
        )
        policies.extend(response.policies)
        token = response.next_page_token
        if not token:
            break
    if output == "json":
        print(to_json(qos_service_pb2.ListPoliciesResponse(policies=policies)))
        return ExitCode.OK
    if not policies:
        print("no QoS policies")
        return ExitCode.OK
    rows = [
        (
            info.name,
            _source(info),
            _state(info.state),
            or_dash(info.device),
            _expiry(info) if info.HasField("lease_expire_time") else "-",
            info.message,
        )
        for info in policies
    ]
    print(table(("NAME", "SOURCE", "STATE", "DEVICE", "LEASE-EXPIRES", "MESSAGE"), rows))
    return ExitCode.OK


def status(channel: grpc.Channel, name: str, *, output: str, timeout_s: float) -> int:
    response = _stub(channel).GetPolicyStatus(
        qos_service_pb2.GetPolicyStatusRequest(name=name), timeout=timeout_s
    )
    if output == "json":
        print(to_json(response))
        return ExitCode.OK
    info = response.policy
    kind = info.object.WhichOneof("kind") or "policy"
    line = f"{kind} {info.name or name}: {_state(info.state)}, {_source(info)}"
    if info.device:
        line += f", on {info.device}"
    if info.HasField("lease_expire_time"):
        line += f", lease expires {_expiry(info)}"
        if info.HasField("lease_ttl"):
            line += f" (ttl {human_duration(info.lease_ttl.ToNanoseconds() / 1e9)})"
    print(line)
    if info.message:
        print(f"  {info.message}")
    if not response.classes:
        print("no classes")
        return ExitCode.OK
    rows = [
        (
            cls.name,
            or_dash(cls.device),
            human_bps(cls.rate_bps),
            human_bps(cls.ceil_bps),
            human_bps(cls.throughput_bps) if cls.HasField("throughput_bps") else "-",
            human_bytes(cls.sent_bytes),
            str(cls.dropped_packets),
            str(cls.overlimits),
        )
        for cls in response.classes
    ]
    header = ("CLASS", "DEVICE", "RATE", "CEIL", "THROUGHPUT", "SENT", "DROPS", "OVERLIMITS")
    print(table(header, rows))
    return ExitCode.OK


def _source(info: qos_service_pb2.PolicyInfo) -> str:
    if info.source == qos_service_pb2.POLICY_SOURCE_FILE:
        return f"file {info.file}" if info.file else "file"
    if info.source == qos_service_pb2.POLICY_SOURCE_API:
        return "api"
    if info.source == qos_service_pb2.POLICY_SOURCE_FLEET:
        return "fleet"
    if info.source == qos_service_pb2.POLICY_SOURCE_SLURM:
        return "slurm"
    return "-"


def _state(state: qos_service_pb2.PolicyState.ValueType) -> str:
    name = qos_service_pb2.PolicyState.Name(state)
    return name.removeprefix("POLICY_STATE_").lower() if state else "-"


def _expiry(info: qos_service_pb2.PolicyInfo) -> str:
    return expiry(info.lease_expire_time.ToNanoseconds() / 1e9)
