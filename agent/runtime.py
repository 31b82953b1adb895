"""Assembling and running the agent: collectors, sampler, metrics server, signals."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from agent.collectors.base import Collector, CollectorContext, SharedResources, registrations
from agent.collectors.qos_stats import RECONCILER_KEY
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.exporter import ExpositionCache, MetricsServer
from agent.qos.policy import detect_cgroup2_root
from agent.qos.reconciler import QosSettings, Reconciler
from agent.sampler import Sampler
from agent.snapshot import Snapshot

log = logging.getLogger(__name__)

# Where the agent's reconciler lives in the shared resources.
QOS_RECONCILER = RECONCILER_KEY


def qos_settings(config: AgentConfig) -> QosSettings:
    return QosSettings(
        policy_dir=config.policy_dir,
        state_dir=config.state_dir,
        take_over=config.take_over,
        cgroup_root=config.cgroup_root or detect_cgroup2_root(),
    )


def build_collectors(config: AgentConfig, shared: SharedResources) -> list[Collector]:
    """Instantiate the configured collectors (all default-enabled ones when none named)."""
    known = registrations()
    if config.collectors:
        unknown = [name for name in config.collectors if name not in known]
        if unknown:
            raise ConfigError(
                "configuration",
                "collectors",
                f"unknown collector {unknown[0]!r} (known: {', '.join(sorted(known))})",
            )
        names: Sequence[str] = config.collectors
    else:
        names = [name for name, reg in sorted(known.items()) if reg.default_enabled]
    context = CollectorContext(config=config, shared=shared)
    return [known[name].factory(context) for name in names]


class Agent:
    """The running daemon: samples on a schedule and publishes each snapshot."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._shared = SharedResources()
        # Before the collectors: the qos collector reports on the reconciler's policies.
        self.reconciler = self._shared.get(
            QOS_RECONCILER, lambda: Reconciler(qos_settings(config)), Reconciler.close
        )
        collectors = build_collectors(config, self._shared)
        self.sampler = Sampler(
            collectors,
            node_name=config.node_name,
            interval_s=config.interval,
            timeout_s=config.collector_timeout_s,
        )
        self.cache = ExpositionCache(collectors)
        self.stop_event = threading.Event()
        self.first_snapshot = threading.Event()
        self._server: MetricsServer | None = None

    def publish(self, snapshot: Snapshot) -> None:
        self.cache.update(snapshot)
        self.first_snapshot.set()

    def start_metrics(self) -> MetricsServer:
        """Bind the metrics listener; raises ListenError when the port is taken."""
        self._server = MetricsServer(self.config.metrics_address, self.cache, self.config.interval)
        self._server.start()
        return self._server

    def run(self) -> None:
        """Sample and reconcile until stopped (SIGINT/SIGTERM or `stop()`); the metrics
        server must be started."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        reconciling = threading.Thread(
            target=self.reconciler.run,
            args=(self.stop_event, self.config.reconcile_interval),
            name="qos-reconcile",
            daemon=True,
        )
        reconciling.start()
        try:
            self.sampler.run(self.stop_event, self.publish)
        finally:
            self.stop_event.set()
            self.reconciler.wake.set()
            reconciling.join(timeout=30)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.sampler.close()
        if self.config.on_exit == "remove":
            log.info("removing the agent's qdiscs and nftables table (--on-exit remove)")
            self.reconciler.remove_all()
        self._shared.close()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            log.info("received SIGHUP, reloading QoS policies")
            self.reconciler.wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
