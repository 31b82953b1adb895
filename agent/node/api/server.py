"""The agent's gRPC API: TelemetryService and QosService on a unix socket for local hooks
and on TCP for remote clients (the listeners themselves: agent/common/listeners.py).

The unix socket serves everything. On TCP who may change QoS, or ask for what costs the
agent (PlanPolicy), is decided by the listener's `Authorizer`: nobody without mTLS
(`ReadOnly`), the allowed client identities with it (`AllowedClients`). Its certificates
are re-read on `reload_tls()` (SIGHUP). Each listener has its own watch-stream slots and
worker pool, and at most qos.MAX_CONCURRENT_PLANS plans run at once over both.

Both serve grpc.health.v1 from one shared servicer ("" SERVING once started, each
service SERVING once its readiness event is set) and server reflection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc_health.v1.health as health
from grpc_health.v1 import health_pb2

from agent.common.errors import ListenError
from agent.common.listeners import Listeners, TcpSettings, add_health_and_reflection
from agent.common.security import AGENT_SOCKET, AllowAll, Authorizer
from agent.node.api import qos, telemetry
from agent.node.api.telemetry import SnapshotHub
from agent.proto.fabric.v1 import qos_service_pb2, telemetry_service_pb2

if TYPE_CHECKING:
    from agent.node.qos.reconciler import Reconciler

log = logging.getLogger(__name__)

# Each open WatchSnapshots stream holds a worker for its lifetime. Each listener refuses
# streams past its own slots (TCP: telemetry.MAX_WATCH_STREAMS, the unix socket:
# telemetry.LOCAL_WATCH_STREAMS), so it keeps UNARY_WORKERS for unary calls even when
# every slot is taken. Threads start on demand: an idle agent has few.
UNARY_WORKERS = 16
MAX_WORKERS = telemetry.MAX_WATCH_STREAMS + UNARY_WORKERS
LOCAL_WORKERS = telemetry.LOCAL_WATCH_STREAMS + UNARY_WORKERS
# Snapshots of large nodes stay far below this; a bigger message is a bug to surface.
MAX_SEND_BYTES = 16 * 1024 * 1024
# A policy document is at most 1 MiB; a request is that plus its envelope. gRPC refuses
# a bigger one with RESOURCE_EXHAUSTED before it is parsed, so no client makes the agent
# hold many large messages at once.
MAX_RECEIVE_BYTES = 2 * 1024 * 1024
# Connections each listener holds at once; gRPC closes those past it as they arrive.
# Each is a file descriptor, and the agent runs with systemd's 1,024: 1,016 connections
# from anyone who reaches the TCP port left it none to read a policy file, talk to the
# kernel or save its state. Clients are a node's hooks and a few operators.
MAX_CONNECTIONS = 128

TELEMETRY_SERVICE = telemetry_service_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
QOS_SERVICE = qos_service_pb2.DESCRIPTOR.services_by_name["QosService"].full_name
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        self._qos_backend = qos_backend
        self._readiness = dict(readiness or {})
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
        self._plans = threading.BoundedSemaphore(qos.MAX_CONCURRENT_PLANS)
        self._listeners = Listeners(
            socket_path,
            tcp,
            self._server,
            name="the gRPC API",
            socket_name=AGENT_SOCKET,
            socket_group=group,
            max_send_bytes=MAX_SEND_BYTES,
            max_receive_bytes=MAX_RECEIVE_BYTES,
            max_connections=MAX_CONNECTIONS,
        )

    def _server(
        self, options: Sequence[tuple[str, int]], authorizer: Authorizer, mtls: bool
    ) -> grpc.Server:
        # The unix socket is the listener that allows everyone who can open it.
        local = isinstance(authorizer, AllowAll)
        if local:
            workers = LOCAL_WORKERS
            slots = telemetry.StreamSlots(telemetry.LOCAL_WATCH_STREAMS, "the unix socket")
            listener = "the unix socket"
        else:
            workers = MAX_WORKERS
            slots = telemetry.StreamSlots(telemetry.MAX_WATCH_STREAMS, "the TCP listener")
            described = self.tcp.describe() if self.tcp is not None else "TCP"
            listener = f"the TCP listener ({described})"
        server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=list(options))
        telemetry.add_to_server(server, self.hub, slots)
        if self._qos_backend is not None:
            qos.add_to_server(
                server, self._qos_backend, self.hub, authorizer, self._plans, listener
            )
        add_health_and_reflection(server, self.health, self._services)
        return server

    @property
    def tcp_port(self) -> int | None:
        """The TCP port bound (the chosen one for port 0); None before start or without TCP."""
        return self._listeners.tcp_port

    def start(self) -> None:
        """Bind both listeners and serve; ListenError when either cannot bind."""
        # Statuses before serving: a client never sees a service missing from health.
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for service in self._services:
            ready = service not in self._readiness or self._readiness[service].is_set()
            status = health_pb2.HealthCheckResponse.SERVING if ready else _NOT_SERVING
            self.health.set(service, status)
        self._listeners.bind()
        for server in self._listeners.servers:
            server.start()
        if self.tcp is not None:
            log.info("gRPC API on %s (%s)", self._listeners.bound_tcp(), self.tcp.describe())
        try:
            self._listeners.restrict_socket()
        except ListenError:
            self.stop()
            raise
        if any(not event.is_set() for event in self._readiness.values()):
            self._watcher = threading.Thread(
                target=self._watch_readiness, name="api-health", daemon=True
            )
            self._watcher.start()

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
        return self._listeners.reload_tls()

    def stop(self, grace_s: float = 2.0) -> None:
        self._stopping.set()
        # Health first, so balancers and watchers see NOT_SERVING while calls drain.
        self.health.enter_graceful_shutdown()
        # Streams end next, so the grace period is not spent waiting on watchers.
        self.hub.close()
        for done in [server.stop(grace_s) for server in self._listeners.servers]:
            done.wait()
        if self._watcher is not None:
            self._watcher.join()
        self._listeners.remove_socket()
