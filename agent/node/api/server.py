"""The agent's gRPC listeners: a unix socket for local hooks, TCP for remote clients.

The unix socket serves everything: it is created with mode 0660 (group from the
config), so access is whatever the file system grants; a stale socket left by a crash
is replaced, a path that is not a socket is refused.

The TCP listener serves the same services, but who may change QoS there is decided by
its `Authorizer`: nobody without mTLS (`ReadOnly`), the allowed client identities with
it (`AllowedClients`). Its certificates are re-read on `reload_tls()` (SIGHUP).

Both serve grpc.health.v1 from one shared servicer ("" SERVING once started, each
service SERVING once its readiness event is set) and server reflection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc_health.v1.health as health
import grpc_reflection.v1alpha.reflection as reflection
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.common.channel import SERVER_KEEPALIVE_OPTIONS
from agent.common.errors import ConfigError, ListenError
from agent.common.listeners import claim_socket_path, restrict_socket
from agent.common.security import (
    AllowAll,
    AllowedClients,
    Authorizer,
    ReadOnly,
    ServerCertificates,
    TlsError,
    TlsFiles,
)
from agent.node.api import qos, telemetry
from agent.node.api.telemetry import SnapshotHub
from agent.node.config import AgentConfig
from agent.proto.fabric.v1 import qos_service_pb2, telemetry_service_pb2

if TYPE_CHECKING:
    from agent.node.qos.reconciler import Reconciler

log = logging.getLogger(__name__)

# Each open WatchSnapshots stream holds a worker for its lifetime. The hub refuses streams
# past telemetry.MAX_WATCH_STREAMS (both listeners together), so each listener keeps
# UNARY_WORKERS for unary calls even when every stream came through it. Threads start
# on demand: an idle agent has few.
UNARY_WORKERS = 16
MAX_WORKERS = telemetry.MAX_WATCH_STREAMS + UNARY_WORKERS
# Snapshots of large nodes stay far below this; a bigger message is a bug to surface.
MAX_SEND_BYTES = 16 * 1024 * 1024
# What clients send is small (a policy is a few KiB): 4 MiB, gRPC's default, said out
# loud so that nobody raises it by accident along with the send limit.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024

TELEMETRY_SERVICE = telemetry_service_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
QOS_SERVICE = qos_service_pb2.DESCRIPTOR.services_by_name["QosService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    # Clients must keep their keepalive time at or above the server's minimum ping
    # interval, or they get GOAWAY (too_many_pings): agent.common.channel has both halves.
    *SERVER_KEEPALIVE_OPTIONS,
)
# gRPC sets SO_REUSEPORT by default, so a second agent (or anything else that sets it)
# would share the port silently and take half the connections; bind exclusively.
_TCP_OPTIONS = (*_SERVER_OPTIONS, ("grpc.so_reuseport", 0))
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class TcpSettings:
    """The TCP listener: where, and with which certificates and allowed clients."""

    address: tuple[str, int]
    tls: TlsFiles | None = None
    allowed_identities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # AgentConfig refuses this too; a listener built by hand must not either.
        if self.allowed_identities and (self.tls is None or self.tls.client_ca is None):
            raise ValueError("allowed identities need TLS with a client CA (mTLS)")

    @classmethod
    def from_config(cls, config: AgentConfig) -> TcpSettings | None:
        """The listener config asks for, or None for grpc_listen: none."""
        address = config.grpc_address
        if address is None:
            return None
        tls = None
        if config.grpc_tls_cert is not None and config.grpc_tls_key is not None:
            tls = TlsFiles(config.grpc_tls_cert, config.grpc_tls_key, config.grpc_client_ca)
        return cls(address, tls, frozenset(config.grpc_allowed_identities))

    @property
    def target(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def authorizer(self) -> Authorizer:
        if self.tls is not None and self.tls.client_ca is not None:
            return AllowedClients(self.allowed_identities)
        return ReadOnly()

    def describe(self) -> str:
        if self.tls is None:
            return "plaintext, read-only"
        if self.tls.client_ca is None:
            return "TLS, read-only"
        allowed = ", ".join(sorted(self.allowed_identities)) or "nobody"
        return f"mTLS, QoS changes for {allowed}"


class ApiServer:
    """The gRPC API on `unix:<socket>` and, with `tcp`, on TCP.

    `readiness` maps a service's full name to an event set once it can answer (the
    first snapshot, the first reconcile pass); health reports NOT_SERVING before.
    QosService is served when `qos_backend` (the agent's Reconciler) is given.
    """

    def __init__(
        self,
        socket_path: Path,
        hub: SnapshotHub,
        *,
        group: str | None = None,
        qos_backend: Reconciler | None = None,
        tcp: TcpSettings | None = None,
        readiness: Mapping[str, threading.Event] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.hub = hub
        self.tcp = tcp
        self._group = group
        self._readiness = dict(readiness or {})
        self._tcp_port: int | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.health = health.HealthServicer()
        services = [TELEMETRY_SERVICE]
        if qos_backend is not None:
            services.append(QOS_SERVICE)
        unknown = set(self._readiness) - set(services)
        if unknown:
            raise ValueError(f"readiness for services not served: {sorted(unknown)}")
        self._services = services

        self._unix = self._server(_SERVER_OPTIONS, qos_backend, AllowAll())
        self._tcp: grpc.Server | None = None
        self.certificates: ServerCertificates | None = None
        if tcp is not None:
            self._tcp = self._server(_TCP_OPTIONS, qos_backend, tcp.authorizer())
            if tcp.tls is not None:
                try:
                    self.certificates = ServerCertificates(tcp.tls)
                except TlsError as exc:
                    # Checked with the config; only a file changed since gets here.
                    raise ConfigError("configuration", exc.option, exc.reason) from exc

    def _server(
        self,
        options: Iterable[tuple[str, int]],
        qos_backend: Reconciler | None,
        authorizer: Authorizer,
    ) -> grpc.Server:
        server = grpc.server(ThreadPoolExecutor(max_workers=MAX_WORKERS), options=list(options))
        telemetry.add_to_server(server, self.hub)
        if qos_backend is not None:
            qos.add_to_server(server, qos_backend, self.hub, authorizer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        return server

    @property
    def tcp_port(self) -> int | None:
        """The TCP port bound (the chosen one for port 0); None before start or without TCP."""
        return self._tcp_port

    def start(self) -> None:
        """Bind both listeners and serve; ListenError when either cannot bind."""
        # Statuses before serving: a client never sees a service missing from health.
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for service in self._services:
            ready = service not in self._readiness or self._readiness[service].is_set()
            status = health_pb2.HealthCheckResponse.SERVING if ready else _NOT_SERVING
            self.health.set(service, status)
        # TCP first: when its port is taken, no socket file is left behind.
        if self._tcp is not None and self.tcp is not None:
            self._tcp_port = self._bind_tcp(self._tcp, self.tcp)
        self._bind_unix()
        self._unix.start()
        if self._tcp is not None and self.tcp is not None:
            self._tcp.start()
            host, _ = self.tcp.address
            log.info("gRPC API on %s:%d (%s)", host, self._tcp_port, self.tcp.describe())
        try:
            restrict_socket(self.socket_path, self._group)
        except ListenError:
            self.stop()
            raise
        if any(not event.is_set() for event in self._readiness.values()):
            self._watcher = threading.Thread(
                target=self._watch_readiness, name="api-health", daemon=True
            )
            self._watcher.start()

    def _bind_tcp(self, server: grpc.Server, tcp: TcpSettings) -> int:
        try:
            if self.certificates is not None:
                return server.add_secure_port(tcp.target, self.certificates.credentials())
            return server.add_insecure_port(tcp.target)
        except RuntimeError as exc:
            # gRPC says only "Failed to bind"; in use is by far the likeliest cause.
            raise ListenError(
                f"cannot listen on {tcp.target} for the gRPC API: {exc} "
                "(port in use? set grpc_listen to another port, or none)"
            ) from exc

    def _bind_unix(self) -> None:
        claim_socket_path(self.socket_path)
        try:
            self._unix.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on unix:{self.socket_path}: {exc}") from exc

    def _watch_readiness(self) -> None:
        pending = {s: e for s, e in self._readiness.items() if not e.is_set()}
        while pending and not self._stopping.is_set():
            for service, event in list(pending.items()):
                if event.wait(0.05):
                    log.debug("health: %s SERVING", service)
                    # After enter_graceful_shutdown the servicer ignores this.
                    self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
                    del pending[service]

    def reload_tls(self) -> bool:
        """Re-read the TCP listener's certificate, key and client CA (SIGHUP): True when
        new connections will use new ones; bad files are logged and the old kept."""
        if self.certificates is None:
            return False
        return self.certificates.reload()

    def stop(self, grace_s: float = 2.0) -> None:
        self._stopping.set()
        # Health first, so balancers and watchers see NOT_SERVING while calls drain.
        self.health.enter_graceful_shutdown()
        # Streams end next, so the grace period is not spent waiting on watchers.
        self.hub.close()
        stopped = [self._unix.stop(grace_s)]
        if self._tcp is not None:
            stopped.append(self._tcp.stop(grace_s))
        for done in stopped:
            done.wait()
        if self._watcher is not None:
            self._watcher.join()
        self.socket_path.unlink(missing_ok=True)
