"""`fabric-aggregator run`: the fleet aggregator in the foreground.

Serves `fabric.aggregator.v1.AggregatorService` on a unix socket (everything) and on
TCP (agents' streams and reads; mutations with mTLS and an allowed identity), health and
reflection on both, and its own Prometheus metrics. SIGTERM/SIGINT stop it gracefully;
SIGHUP re-reads the TLS certificates.

Exit codes (agent/common/exits.py): 0 stopped, 1 runtime failure (a port in use, the
store unreachable at start), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc_reflection.v1alpha.reflection as reflection
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from agent import __version__
from agent.aggregator.config import AggregatorConfig
from agent.aggregator.fleet import Fleet
from agent.aggregator.metrics import FleetMetrics
from agent.aggregator.service import SERVICE_NAME, Access, AggregatorServicer
from agent.aggregator.store import StoreError, open_store
from agent.common.channel import SERVER_KEEPALIVE_OPTIONS
from agent.common.config import configure_logging, load_model
from agent.common.errors import ConfigError, ListenError
from agent.common.exits import ExitCode
from agent.common.listeners import claim_socket_path, restrict_socket
from agent.common.sdnotify import Notifier
from agent.common.security import (
    AllowAll,
    AllowedClients,
    ReadOnly,
    ServerCertificates,
    TlsError,
    TlsFiles,
)
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

log = logging.getLogger("agent.aggregator")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGGREGATOR_SOCKET = "the aggregator's unix socket"
# A summary of a large node is a few KiB and a snapshot reply tens of KiB; the limit is
# what a full snapshot of the largest node may need.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *SERVER_KEEPALIVE_OPTIONS,
)
# Bind the TCP port exclusively: a second aggregator must fail, not share the port.
_TCP_OPTIONS = (*_SERVER_OPTIONS, ("grpc.so_reuseport", 0))

_FLAGS: dict[str, str] = {
    "--store": "desired-state store: sqlite:///path/state.db (default "
    "sqlite:///var/lib/fabric-aggregator/state.db) or etcd://host:port[,host:port]",
    "--grpc-listen": "HOST:PORT for agents and clients, or none (default 0.0.0.0:9480)",
    "--grpc-socket": "unix socket (default /run/fabric-aggregator/aggregator.sock)",
    "--grpc-socket-group": "group that may use the socket (default: the aggregator's)",
    "--grpc-tls-cert": "PEM server certificate for --grpc-listen (re-read on SIGHUP)",
    "--grpc-tls-key": "PEM private key of --grpc-tls-cert",
    "--grpc-client-ca": "PEM CA of agent and client certificates: requires them (mTLS)",
    "--grpc-allowed-identities": "comma-separated certificate identities that may apply "
    "and delete fleet policies over TCP (needs --grpc-client-ca)",
    "--metrics-listen": "HOST:PORT of the aggregator's /metrics (default 0.0.0.0:9481)",
    "--summary-interval": "summary interval agents keep (default 1s)",
    "--stale-after-missed": "missed summaries before a node is stale (default 3)",
    "--gone-after": "silence before a node is gone (default 60s)",
    "--replica-name": "this replica's name in logs (default: host name)",
    "--log-level": "debug, info, warning or error (default info)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabric-aggregator",
        description="Fleet aggregator: node summaries, liveness and fleet QoS policies.",
    )
    parser.add_argument("--version", action="version", version=f"fabric-aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the aggregator in the foreground")
    run.add_argument("--config", type=Path, help="YAML file; flags override its values")
    for flag, help_text in _FLAGS.items():
        run.add_argument(flag, help=help_text, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = (flag.removeprefix("--").replace("-", "_") for flag in _FLAGS)
    overrides: dict[str, Any] = {key: getattr(args, key) for key in keys}
    try:
        config = load_model(AggregatorConfig, args.config, overrides)
    except ConfigError as exc:
        print(f"fabric-aggregator: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    configure_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"fabric-aggregator: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    except (ListenError, StoreError) as exc:
        print(f"fabric-aggregator: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK


class AggregatorServer:
    """The aggregator's gRPC listeners over one `Fleet`."""

    def __init__(self, config: AggregatorConfig, fleet: Fleet) -> None:
        self.config = config
        self.fleet = fleet
        self.health = health.aio.HealthServicer()
        self.certificates: ServerCertificates | None = None
        self.tcp_port: int | None = None
        self._unix = self._server(_SERVER_OPTIONS, Access(AllowAll(), bind_node_names=False))
        self._tcp: grpc.aio.Server | None = None
        if config.grpc_address is not None:
            self._tcp = self._server(_TCP_OPTIONS, self._tcp_access())
            if config.grpc_tls_cert is not None and config.grpc_tls_key is not None:
                files = TlsFiles(config.grpc_tls_cert, config.grpc_tls_key, config.grpc_client_ca)
                try:
                    self.certificates = ServerCertificates(files)
                except TlsError as exc:
                    raise ConfigError("configuration", exc.option, exc.reason) from exc

    def _tcp_access(self) -> Access:
        if self.config.grpc_client_ca is None:
            return Access(ReadOnly(AGGREGATOR_SOCKET), bind_node_names=False)
        mutations = AllowedClients(self.config.grpc_allowed_identities, AGGREGATOR_SOCKET)
        return Access(mutations, bind_node_names=True)

    def _server(self, options: Sequence[tuple[str, int]], access: Access) -> grpc.aio.Server:
        server = grpc.aio.server(options=list(options))
        pb_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(self.fleet, access), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        return server

    async def start(self) -> None:
        """Bind and serve; ListenError when a listener cannot bind."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        address = self.config.grpc_address
        if self._tcp is not None and address is not None:
            host, port = address
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                if self.certificates is not None:
                    self.tcp_port = self._tcp.add_secure_port(
                        target, self.certificates.credentials()
                    )
                else:
                    self.tcp_port = self._tcp.add_insecure_port(target)
            except RuntimeError as exc:
                raise ListenError(
                    f"cannot listen on {target}: {exc} (port in use? set grpc_listen)"
                ) from exc
        path = self.config.grpc_socket
        claim_socket_path(path)
        try:
            self._unix.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on unix:{path}: {exc}") from exc
        await self._unix.start()
        if self._tcp is not None:
            await self._tcp.start()
        restrict_socket(path, self.config.grpc_socket_group)

    def describe_tcp(self) -> str:
        if self._tcp is None:
            return "no TCP listener"
        if self.certificates is None:
            return "plaintext: reads and agent streams only, agents not authenticated"
        if self.config.grpc_client_ca is None:
            return "TLS without client certificates: reads and agent streams only"
        allowed = len(self.config.grpc_allowed_identities)
        return f"mTLS: agents bound to their certificate's name, {allowed} identities may mutate"

    async def follow_store_health(self, period_s: float = 1.0) -> None:
        """The service is SERVING while the store watch follows desired state: a replica
        cut off from etcd would hand out stale policies, so balancers should skip it."""
        serving = True
        while True:
            if self.fleet.store_ok != serving:
                serving = self.fleet.store_ok
                status = health_pb2.HealthCheckResponse.SERVING if serving else _NOT_SERVING
                log.warning("desired-state store %s", "followed again" if serving else "lost")
                await self.health.set(SERVICE_NAME, status)
            await asyncio.sleep(period_s)

    def reload_tls(self) -> bool:
        return self.certificates is not None and self.certificates.reload()

    async def stop(self, grace_s: float = 2.0) -> None:
        # Health first, so balancers see NOT_SERVING while calls drain.
        await self.health.enter_graceful_shutdown()
        servers = [self._unix, *([self._tcp] if self._tcp is not None else [])]
        await asyncio.gather(*(server.stop(grace_s) for server in servers))
        self.config.grpc_socket.unlink(missing_ok=True)


async def serve(config: AggregatorConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    metrics = FleetMetrics()
    store = open_store(config.store)
    fleet = Fleet(store, config.liveness, metrics=metrics)
    notifier = Notifier.from_environment()
    try:
        await fleet.start()
        server = AggregatorServer(config, fleet)
        host, port = config.metrics_address
        try:
            http, _ = start_http_server(port, host, registry=metrics.registry)
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port} for metrics: {exc}") from exc
        try:
            await server.start()
            log.info(
                "fabric-aggregator %s (replica %s): store %s, gRPC on %s port %s (%s) and "
                "unix:%s, metrics at http://%s:%d/metrics, stale after %d missed %gs "
                "summaries, gone after %gs",
                __version__,
                config.replica_name,
                config.store,
                config.grpc_listen,
                server.tcp_port,
                server.describe_tcp(),
                config.grpc_socket,
                host,
                http.server_port,
                config.stale_after_missed,
                config.summary_interval,
                config.gone_after,
            )
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stopping.set)
            loop.add_signal_handler(
                signal.SIGHUP, lambda: loop.run_in_executor(None, server.reload_tls)
            )
            store_health = asyncio.create_task(server.follow_store_health())
            notifier.ready(f"serving {len(fleet.assignments)} fleet policies")
            await stopping.wait()
            store_health.cancel()
            log.info("stopping")
            notifier.stopping()
            await server.stop()
        finally:
            http.shutdown()
            http.server_close()
    finally:
        await fleet.stop()
        await store.close()
        notifier.close()


if __name__ == "__main__":
    sys.exit(main())
