"""`fabric-aggregator run`: the fleet aggregator in the foreground.

Serves `fabric.aggregator.v1.AggregatorService` on a unix socket (everything) and on
TCP (agents' streams and reads; mutations with mTLS and an allowed identity), health and
reflection on both, and its own Prometheus metrics. SIGTERM/SIGINT stop it gracefully;
SIGHUP re-reads the TLS certificates.

`fabric-aggregator init` makes the store `run` needs: `run` refuses a store that init
did not make (a missing SQLite file, one emptied to 0 bytes, a wiped etcd prefix), since
an empty desired state would have every agent remove its fleet policies.

Exit codes (agent/common/exits.py): 0 stopped, 1 runtime failure (a port in use, the
store unreachable, missing or not initialised at start), 2 bad configuration.
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
from grpc_health.v1 import health, health_pb2
from prometheus_client import start_http_server

from agent import __version__
from agent.aggregator.config import AggregatorConfig
from agent.aggregator.events import LOCAL_EVENT_WATCHERS, MAX_EVENT_WATCHERS
from agent.aggregator.fleet import Fleet
from agent.aggregator.limits import REGISTRATION_BURST, REGISTRATION_BURST_PER_PEER, RateLimiter
from agent.aggregator.metrics import FleetMetrics
from agent.aggregator.service import SERVICE_NAME, Access, AggregatorServicer
from agent.aggregator.store import Store, StoreError, StoreNotInitialised, open_store
from agent.common.addresses import format_host_port
from agent.common.config import configure_logging, load_model
from agent.common.errors import ConfigError, ListenError
from agent.common.exits import ExitCode
from agent.common.listeners import Listeners, TcpSettings, add_health_and_reflection
from agent.common.sdnotify import Notifier
from agent.common.security import AllowAll, Authorizer
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

log = logging.getLogger("agent.aggregator")

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGGREGATOR_SOCKET = "the aggregator's unix socket"
# A summary of a large node is a few KiB and a snapshot reply tens of KiB; the limit is
# what a full snapshot of the largest node may need.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

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
    "--max-nodes": "nodes kept, connected or not; new names past it are refused (default 20000)",
    "--registrations-per-peer-s": "agent registrations a second from one address (default 5)",
    "--registrations-per-s": "agent registrations a second in all (default 500)",
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
    run.add_argument(
        "--insecure-plaintext-agents",
        action="store_true",
        default=None,
        help="accept agent streams on TCP without mTLS: anyone reaching the port may "
        "register as any node (logged as a WARNING at every start)",
    )
    init = commands.add_parser(
        "init",
        help="make the desired-state store if it does not exist (run refuses a store "
        "init did not make); an existing store is left as it is",
    )
    init.add_argument("--config", type=Path, help="YAML file: its store is the one made")
    init.add_argument("--store", default=None, help=_FLAGS["--store"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        overrides: dict[str, Any] = {"store": args.store}
    else:
        keys = (flag.removeprefix("--").replace("-", "_") for flag in _FLAGS)
        overrides = {key: getattr(args, key) for key in keys}
        overrides["insecure_plaintext_agents"] = args.insecure_plaintext_agents
    try:
        config = load_model(AggregatorConfig, args.config, overrides)
    except ConfigError as exc:
        print(f"fabric-aggregator: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if args.command == "init":
        return asyncio.run(init_store(config.store))
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
        # One limiter for both listeners: the socket's callers count too.
        self.registrations = RateLimiter(
            config.registrations_per_peer_s,
            REGISTRATION_BURST_PER_PEER,
            config.registrations_per_s,
            REGISTRATION_BURST,
        )
        self.tcp = TcpSettings.from_config(config)
        self._listeners = Listeners(
            config.grpc_socket,
            self.tcp,
            self._server,
            name="agents and clients",
            socket_name=AGGREGATOR_SOCKET,
            socket_group=config.grpc_socket_group,
            max_send_bytes=MAX_MESSAGE_BYTES,
            max_receive_bytes=MAX_MESSAGE_BYTES,
        )

    def _server(
        self, options: Sequence[tuple[str, int]], authorizer: Authorizer, mtls: bool
    ) -> grpc.aio.Server:
        server = grpc.aio.server(options=list(options))
        # With mTLS an agent may register only under a name its certificate carries.
        # The unix socket's callers are local (its mode and group); TCP agents need mTLS
        # unless the operator said otherwise.
        tcp = not isinstance(authorizer, AllowAll)
        access = Access(
            authorizer,
            bind_node_names=mtls,
            agents_need_mtls=tcp and not self.config.insecure_plaintext_agents,
            max_watchers=MAX_EVENT_WATCHERS if tcp else LOCAL_EVENT_WATCHERS,
            listener="the TCP listener" if tcp else "the unix socket",
        )
        pb_grpc.add_AggregatorServiceServicer_to_server(
            AggregatorServicer(self.fleet, access, self.registrations), server
        )
        add_health_and_reflection(server, self.health, [SERVICE_NAME])
        return server

    @property
    def tcp_port(self) -> int | None:
        """The TCP port bound (the chosen one for port 0); None before start or without TCP."""
        return self._listeners.tcp_port

    async def start(self) -> None:
        """Bind and serve; ListenError when a listener cannot bind. Every start that
        accepts agents without mTLS says so loudly, in the log and in /metrics."""
        insecure = self.agents_without_mtls
        self.fleet.metrics.insecure_agent_streams.set(1 if insecure else 0)
        if insecure:
            log.warning(
                "insecure_plaintext_agents: agent streams on %s are accepted without mTLS; "
                "anyone who reaches the port can register as any node, receive its fleet "
                "policies and report for it. Configure grpc_tls_cert, grpc_tls_key and "
                "grpc_client_ca instead.",
                self.config.grpc_listen,
            )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._listeners.bind()
        for server in self._listeners.servers:
            await server.start()
        self._listeners.restrict_socket()

    @property
    def agents_without_mtls(self) -> bool:
        """Whether agents may stream over TCP without client certificates."""
        return self.tcp is not None and not self.tcp.mtls and self.config.insecure_plaintext_agents

    def describe_tcp(self) -> str:
        if self.tcp is None:
            return "no TCP listener"
        reads = "reads only, agent streams need mTLS"
        if self.agents_without_mtls:
            reads = "reads and INSECURE agent streams"
        described = self.tcp.describe(reads=reads, changes="fleet policy changes")
        if self.tcp.mtls:
            # An agent registers only under a name its certificate carries.
            return f"{described}; agents bound to their certificates' names"
        return described

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
        return self._listeners.reload_tls()

    async def stop(self, grace_s: float = 2.0) -> None:
        # Health first, so balancers see NOT_SERVING while calls drain.
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(grace_s) for server in self._listeners.servers))
        self._listeners.remove_socket()


async def init_store(url: str) -> int:
    """`fabric-aggregator init`: a missing store is made with a new store id; an
    existing one is left as it is (one from before store ids gets its id). A SQLite
    file that exists without the aggregator's schema is refused, never overwritten."""
    store = open_store(url, create=True)
    try:
        existing = await _initialised(store)
        identity = await store.identity(create=True)
    except StoreError as exc:
        print(f"fabric-aggregator: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        await store.close()
    state = "already initialised" if existing else "initialised a new, empty store"
    print(f"fabric-aggregator: {url}: {state} (store id {identity.store_id})")
    return ExitCode.OK


async def _initialised(store: Store) -> bool:
    try:
        await store.identity()
    except StoreNotInitialised:
        return False
    return True


async def serve(config: AggregatorConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    metrics = FleetMetrics()
    # Only a store that `init` made: a lost one must not look like an empty fleet.
    store = open_store(config.store, create=False)
    try:
        identity = await store.identity()
    except BaseException:
        await store.close()
        raise
    fleet = Fleet(
        store, config.liveness, metrics=metrics, max_nodes=config.max_nodes, identity=identity
    )
    notifier = Notifier.from_environment()
    try:
        await fleet.start()
        server = AggregatorServer(config, fleet)
        host, port = config.metrics_address
        try:
            http, _ = start_http_server(port, host, registry=metrics.registry)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {format_host_port(host, port)} for metrics: {exc}"
            ) from exc
        try:
            await server.start()
            log.info(
                "fabric-aggregator %s (replica %s): store %s (id %s), gRPC on %s port %s (%s) and "
                "unix:%s, metrics at http://%s/metrics, stale after %d missed %gs "
                "summaries, gone after %gs",
                __version__,
                config.replica_name,
                config.store,
                identity.store_id,
                config.grpc_listen,
                server.tcp_port,
                server.describe_tcp(),
                config.grpc_socket,
                format_host_port(host, http.server_port),
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
