"""The channel to an agent, and gRPC errors turned into messages and exit codes.

A target is the agent's unix socket (`unix:///run/fabric-agent/agent.sock`,
`unix:/path`) or `host:port`. Over TCP, `--tls-ca` with a client certificate and key
makes an mTLS channel; without `--tls-ca` the channel is plaintext, which the agent
serves read-only (its QoS mutations need a client certificate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status.rpc_status import from_call

from agent.common.addresses import parse_host_port
from agent.common.channel import CLIENT_KEEPALIVE_OPTIONS, CLIENT_MAX_RECEIVE_BYTES
from agent.common.exits import ExitCode

# agent/ctl/telemetry.py's name for ExitCode.OK, until it imports ExitCode itself.
EXIT_OK = ExitCode.OK

DEFAULT_AGENT = "unix:///run/fabric-agent/agent.sock"
# Deadline of each unary RPC; streams have none.
DEFAULT_TIMEOUT_S = 10.0
# Keepalive pings (the contract with the agent's minimum ping interval lives in
# agent/common/channel.py) and the receive limit matching the agent's send limit: above
# gRPC's 4 MiB default, so a large node's snapshot does not fail on the client first.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *CLIENT_KEEPALIVE_OPTIONS,
    ("grpc.max_receive_message_length", CLIENT_MAX_RECEIVE_BYTES),
)

# Codes that say the agent could not be reached or did not answer in time: exit 3.
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class UsageError(ValueError):
    """Bad input found before any RPC (flags, files): exit 2."""


@dataclass(frozen=True)
class Target:
    """Where the agent listens: `address` is what gRPC dials."""

    address: str
    unix: bool

    def __str__(self) -> str:
        return self.address


def parse_target(text: str, flag: str = "--agent") -> Target:
    """`unix:///path`, `unix:/path` or `host:port` (IPv6 as `[addr]:port`); UsageError
    naming `flag` (where the text came from) otherwise."""
    text = text.strip()
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path.startswith("/"):
            raise UsageError(f"{flag} {text!r}: unix:// needs an absolute path (unix:///path)")
        return Target(f"unix:{path}", unix=True)
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise UsageError(f"{flag} {text!r}: no socket path")
        return Target(f"unix:{path}", unix=True)
    if ":" not in text:
        raise UsageError(f"{flag} {text!r}: use HOST:PORT or unix:///path/to/socket")
    try:
        address = parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return Target(address.target, unix=False)


@dataclass(frozen=True)
class TlsFiles:
    """mTLS over TCP: the CA that signed the agent's certificate, and this client's
    certificate and key (PEM files). `server_name` overrides the name checked against
    the agent's certificate (default: the target's host)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if self.ca is None and (self.cert is not None or self.server_name is not None):
            raise UsageError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")

    @property
    def enabled(self) -> bool:
        return self.ca is not None


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None


def open_channel(target: Target, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel to `target`; plaintext on a unix socket, mTLS over TCP when `tls` has a
    CA. Raises UsageError for TLS on a unix socket or unreadable certificate files."""
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(target.address, options=options)
    if target.unix:
        raise UsageError("--tls-* apply to HOST:PORT targets; a unix socket needs no TLS")
    assert tls.ca is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "--tls-ca"),
        private_key=_read(tls.key, "--tls-key") if tls.key is not None else None,
        certificate_chain=_read(tls.cert, "--tls-cert") if tls.cert is not None else None,
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target.address, credentials, options=options)


@dataclass(frozen=True)
class RpcFailure:
    """A failed RPC: its code and message, and the google.rpc details it carried."""

    code: grpc.StatusCode
    message: str
    # (field, reason) from google.rpc.BadRequest
    field_violations: Sequence[tuple[str, str]] = field(default_factory=tuple)
    # (type, subject, description) from google.rpc.PreconditionFailure
    precondition_violations: Sequence[tuple[str, str, str]] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        return ExitCode.UNREACHABLE if self.code in UNREACHABLE_CODES else ExitCode.INVALID


def failure_from_error(exc: grpc.RpcError) -> RpcFailure:
    """The code, message and rich-status details of an RPC error."""
    if not isinstance(exc, grpc.Call):
        return RpcFailure(grpc.StatusCode.UNKNOWN, str(exc))
    code, message = exc.code(), exc.details() or ""
    status: status_pb2.Status | None
    try:
        status = from_call(exc)
    except ValueError:
        # Details that contradict the call's own status are ignored, not trusted.
        status = None
    fields: list[tuple[str, str]] = []
    preconditions: list[tuple[str, str, str]] = []
    if status is not None:
        fields, preconditions = _details(status)
    return RpcFailure(code, message, tuple(fields), tuple(preconditions))


def _details(
    status: status_pb2.Status,
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    fields: list[tuple[str, str]] = []
    preconditions: list[tuple[str, str, str]] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        precondition = error_details_pb2.PreconditionFailure()
        if detail.Unpack(bad_request):
            fields.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Unpack(precondition):
            preconditions.extend(
                (v.type, v.subject, v.description) for v in precondition.violations
            )
    return fields, preconditions


def describe_failure(
    failure: RpcFailure, where: str, target: Target, peer: str = "agent"
) -> list[str]:
    """Lines for stderr: `WHERE: FIELD: REASON` per field violation, the message and
    each failed precondition otherwise; an unreachable `peer` (the agent, the aggregator)
    named by its target."""
    if failure.code in UNREACHABLE_CODES:
        what = "did not answer in time" if failure.code is grpc.StatusCode.DEADLINE_EXCEEDED else (
            "is unreachable"
        )  # fmt: skip
        return [f"{where}: {peer} at {target} {what}: {failure.message}"]
    if failure.field_violations:
        return [f"{where}: {path}: {reason}" for path, reason in failure.field_violations]
    lines = [f"{where}: {failure.message or failure.code.name}"]
    for kind, subject, description in failure.precondition_violations:
        lines.append(f"  {kind} {subject}: {description}")
    refused = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    if failure.code in refused and not target.unix:
        lines.append(
            "  (changes over TCP need mTLS (--tls-ca, --tls-cert, --tls-key) with a client "
            f"identity the {peer} allows)"
        )
    return lines
