"""Assembling and running the agent: collectors, sampler, metrics server, signals."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from agent.collectors.base import Collector, CollectorContext, SharedResources, registrations
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.exporter import ExpositionCache, MetricsServer
from agent.sampler import Sampler
from agent.snapshot import Snapshot

log = logging.getLogger(__name__)


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
        """Sample until stopped (SIGINT/SIGTERM or `stop()`); the server must be started."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.sampler.run(self.stop_event, self.publish)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.sampler.close()
        self._shared.close()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
