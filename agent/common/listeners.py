"""What the agent's and the aggregator's gRPC listeners share.

Each daemon serves its services twice: on a unix socket for local hooks, where access
is the socket file's mode (0660) and group, so whoever can connect may do everything
(`AllowAll`); and, unless grpc_listen is none, on TCP, where reads are open and
mutations need mTLS and an allowed client identity (agent/common/security.py).

`Listeners` builds both servers with the same limits (messages, and connections each
listener holds at once where the daemon gives a bound) and keepalive, binds them (TCP
first, so a taken port leaves no socket file behind), restricts the socket and reloads
the TCP certificates on SIGHUP. What each daemon serves, and starting and stopping,
stay with it: the agent's servers are synchronous `grpc.server`s, the aggregator's
`grpc.aio` ones, which bind alike but start and stop differently.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc
import grpc_reflection.v1alpha.reflection as reflection
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.common.addresses import format_host_port
from agent.common.channel import SERVER_KEEPALIVE_OPTIONS
from agent.common.config import DaemonConfig
from agent.common.errors import ConfigError, ListenError
from agent.common.security import (
    AGENT_SOCKET,
    AllowAll,
    AllowedClients,
    Authorizer,
    ReadOnly,
    ServerCertificates,
    TlsError,
    TlsFiles,
)

SOCKET_MODE = 0o660
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# gRPC sets SO_REUSEPORT by default, so a second daemon (or anything else that sets it)
# would share the port silently and take half the connections; bind exclusively.
_TCP_ONLY_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.so_reuseport", 0),)


def claim_socket_path(path: Path) -> None:
    """Make way for a unix socket at `path`: its directory exists and a stale socket
    (left by a crash) is gone. ListenError for a path that is not a socket."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ListenError(f"{path}: exists and is not a socket; refusing to replace it")
            path.unlink()
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc}") from exc


def restrict_socket(path: Path, group: str | None) -> None:
    """Mode 0660 and, when given, the group that may connect."""
    try:
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            shutil.chown(path, group=group)
    except (OSError, LookupError) as exc:
        raise ListenError(f"{path}: cannot set mode or group {group!r}: {exc}") from exc


def server_options(
    *, max_send_bytes: int, max_receive_bytes: int, max_connections: int | None = None
) -> list[tuple[str, int]]:
    """A server's message limits and keepalive, and with `max_connections` the
    connections it holds at once (gRPC closes those past it as they arrive). Clients
    must keep their keepalive time at or above the server's minimum ping interval, or
    they get GOAWAY (too_many_pings): agent/common/channel.py has both halves."""
    options = [
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
        *SERVER_KEEPALIVE_OPTIONS,
    ]
    if max_connections is not None:
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    return options


@dataclass(frozen=True)
class TcpSettings:
    """The TCP listener: where, and with which certificates and allowed clients."""

    address: tuple[str, int]
    tls: TlsFiles | None = None
    allowed_identities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # The configs refuse this too; a listener built by hand must not either.
        if self.allowed_identities and not self.mtls:
            raise ValueError("allowed identities need TLS with a client CA (mTLS)")

    @classmethod
    def from_config(cls, config: DaemonConfig) -> TcpSettings | None:
        """The listener `config` asks for, or None for grpc_listen: none."""
        address = config.grpc_address
        if address is None:
            return None
        tls = None
        if config.grpc_tls_cert is not None and config.grpc_tls_key is not None:
            tls = TlsFiles(config.grpc_tls_cert, config.grpc_tls_key, config.grpc_client_ca)
        return cls(address, tls, frozenset(config.grpc_allowed_identities))

    @property
    def target(self) -> str:
        return format_host_port(*self.address)

    @property
    def mtls(self) -> bool:
        """Whether clients must present a certificate the client CA signed."""
        return self.tls is not None and self.tls.client_ca is not None

    def authorizer(self, socket_name: str = AGENT_SOCKET) -> Authorizer:
        """Who may mutate over this listener; refusals point at `socket_name` instead."""
        if self.mtls:
            return AllowedClients(self.allowed_identities, socket_name)
        return ReadOnly(socket_name)

    def describe(self, *, reads: str = "read-only", changes: str = "QoS changes") -> str:
        """For the log: the transport security, then what clients may do over it."""
        if self.tls is None:
            return f"plaintext, {reads}"
        if not self.mtls:
            return f"TLS, {reads}"
        allowed = ", ".join(sorted(self.allowed_identities)) or "nobody"
        return f"mTLS, {changes} for {allowed}"

    def certificates(self) -> ServerCertificates | None:
        """The listener's certificates, loaded and checked; None without TLS."""
        if self.tls is None:
            return None
        try:
            return ServerCertificates(self.tls)
        except TlsError as exc:
            # Checked with the config; only a file changed since gets here.
            raise ConfigError("configuration", exc.option, exc.reason) from exc


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server,
    health: health_pb2_grpc.HealthServicer,
    services: Iterable[str],
) -> None:
    """grpc.health.v1 from `health` (the daemons share one across both listeners) and
    reflection listing `services`, health and reflection itself."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )


ServerT = TypeVar("ServerT", grpc.Server, grpc.aio.Server)


class Listeners(Generic[ServerT]):
    """A daemon's unix socket listener and, with `tcp`, its TCP listener.

    `build(options, authorizer, mtls)` makes one server with the daemon's services: the
    socket's gets `AllowAll`, the TCP one the authorizer `tcp` calls for and whether its
    clients have verified certificates. `name` says what is served, for errors.
    """

    def __init__(
        self,
        socket_path: Path,
        tcp: TcpSettings | None,
        build: Callable[[Sequence[tuple[str, int]], Authorizer, bool], ServerT],
        *,
        name: str,
        socket_name: str,
        socket_group: str | None = None,
        max_send_bytes: int,
        max_receive_bytes: int,
        max_connections: int | None = None,
    ) -> None:
        self.socket_path: Path = socket_path
        self.tcp: TcpSettings | None = tcp
        self.name: str = name
        self._group: str | None = socket_group
        options: list[tuple[str, int]] = server_options(
            max_send_bytes=max_send_bytes,
            max_receive_bytes=max_receive_bytes,
            max_connections=max_connections,
        )
        self.unix: ServerT = build(options, AllowAll(), False)
        self.tcp_server: ServerT | None = None
        self.certificates: ServerCertificates | None = None
        # The TCP port bound (the chosen one for port 0); None before bind() or without TCP.
        self.tcp_port: int | None = None
        if tcp is not None:
            tcp_options = [*options, *_TCP_ONLY_OPTIONS]
            self.tcp_server = build(tcp_options, tcp.authorizer(socket_name), tcp.mtls)
            self.certificates = tcp.certificates()

    @property
    def servers(self) -> list[ServerT]:
        servers = [self.unix]
        if self.tcp_server is not None:
            servers.append(self.tcp_server)
        return servers

    def bind(self) -> None:
        """Bind TCP, then the socket (a taken port then leaves no socket file behind);
        ListenError when either cannot."""
        if self.tcp_server is not None and self.tcp is not None:
            self.tcp_port = self._bind_tcp(self.tcp_server, self.tcp)
        claim_socket_path(self.socket_path)
        try:
            self.unix.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on unix:{self.socket_path}: {exc}") from exc

    def _bind_tcp(self, server: ServerT, tcp: TcpSettings) -> int:
        try:
            if self.certificates is not None:
                return server.add_secure_port(tcp.target, self.certificates.credentials())
            return server.add_insecure_port(tcp.target)
        except RuntimeError as exc:
            # gRPC says only "Failed to bind"; in use is by far the likeliest cause.
            raise ListenError(
                f"cannot listen on {tcp.target} for {self.name}: {exc} "
                "(port in use? set grpc_listen to another port, or none)"
            ) from exc

    def restrict_socket(self) -> None:
        """After the servers started (the socket file exists): mode 0660 and the group."""
        restrict_socket(self.socket_path, self._group)

    def bound_tcp(self) -> str | None:
        """The TCP listener's host:port as bound (the chosen port for 0), for the log."""
        if self.tcp is None or self.tcp_port is None:
            return None
        return format_host_port(self.tcp.address[0], self.tcp_port)

    def reload_tls(self) -> bool:
        """Re-read the TCP listener's certificate, key and client CA (SIGHUP): True when
        new connections will use new ones; bad files are logged and the old kept."""
        return self.certificates is not None and self.certificates.reload()

    def remove_socket(self) -> None:
        self.socket_path.unlink(missing_ok=True)
