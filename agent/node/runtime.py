"""Assembling and running the agent: collectors, sampler, metrics server, signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from agent.common.errors import ConfigError
from agent.common.listeners import TcpSettings
from agent.common.sdnotify import Notifier, watchdog_interval_s
from agent.node.api.server import QOS_SERVICE, TELEMETRY_SERVICE, ApiServer
from agent.node.api.telemetry import SnapshotHub
from agent.node.collectors.base import (
    Collector,
    Registration,
    SharedResources,
    find_registration,
    registrations,
)
from agent.node.collectors.qos import RECONCILER_KEY
from agent.node.config import AgentConfig
from agent.node.exporter import ExpositionCache, MetricsServer
from agent.node.jobs import JOB_FILE_PATTERN, shared_job_directory
from agent.node.qos.pipeline import QosSettings
from agent.node.qos.reconciler import Reconciler
from agent.node.sampler import Sampler
from agent.node.snapshot import Snapshot
from agent.node.uplink.stream import ReconcilerPolicies, Uplink, UplinkSettings, UplinkTls
from agent.node.watch import Directories, LinuxInotify, PathWatcher

log = logging.getLogger(__name__)

# Where the agent's reconciler lives in the shared resources.
QOS_RECONCILER = RECONCILER_KEY

# The watchdog is fed only while the sampling loop has ticked within this many intervals:
# a tick is bounded by the collector timeout, so a longer silence means the loop hangs.
WATCHDOG_STALE_TICKS = 3


def uplink_settings(config: AgentConfig, collectors: Sequence[Collector]) -> UplinkSettings:
    """How the agent reaches the aggregator (config.aggregator must be set)."""
    assert config.aggregator is not None
    tls = None
    if config.aggregator_tls_ca is not None:
        tls = UplinkTls(
            config.aggregator_tls_ca, config.aggregator_tls_cert, config.aggregator_tls_key
        )
    return UplinkSettings(
        target=config.aggregator,
        node_name=config.node_name,
        labels=config.labels,
        # What the node runs, and that it enforces the fleet's QoS policies.
        capabilities=(*(c.name for c in collectors), "qos-enforce"),
        summary_interval_s=config.interval,
        tls=tls,
        store_id_path=config.state_dir / "fleet-store-id",
    )


def start_watcher(reconciler: Reconciler, stop: threading.Event) -> bool:
    """Wake `reconciler`'s passes when a job file changes or a cgroup a pending
    assignment waits for appears (agent.node.watch), until `stop`; False when inotify is
    unavailable: the passes then find them every reconcile interval."""
    try:
        inotify = LinuxInotify()
    except OSError as exc:
        log.warning("inotify unavailable (%s): jobs and cgroups are found by polling", exc)
        return False
    watcher = PathWatcher(inotify, reconciler.wake.set)
    reconciler.after_pass.append(inotify.poke)
    jobs: Directories = ()
    if reconciler.jobs is not None:
        jobs = ((reconciler.jobs.directory, lambda name: bool(JOB_FILE_PATTERN.match(name))),)

    def wanted() -> tuple[frozenset[Path], Directories]:
        return reconciler.waiting_cgroups, jobs

    def run() -> None:
        try:
            watcher.run(stop, wanted)
        except Exception:
            log.exception("the job and cgroup watcher failed: found by polling from now")
        finally:
            reconciler.after_pass.remove(inotify.poke)
            inotify.close()

    threading.Thread(target=run, name="path-watch", daemon=True).start()
    return True


def build_collectors(config: AgentConfig, shared: SharedResources) -> list[Collector]:
    """Instantiate the configured collectors (all default-enabled ones when none named),
    each with its options taken from `config`."""
    known = registrations()
    chosen: dict[str, Registration[Any]] = {}
    if config.collectors:
        for name in config.collectors:
            found = find_registration(name)
            if found is None:
                raise ConfigError(
                    "configuration",
                    "collectors",
                    f"unknown collector {name!r} (known: {', '.join(sorted(known))})",
                )
            # A former name and the current one select the collector once.
            chosen.setdefault(found.name, found)
    else:
        chosen = {name: reg for name, reg in sorted(known.items()) if reg.default_enabled}
    return [registration.create(config, shared) for registration in chosen.values()]


class Agent:
    """The running daemon: samples on a schedule and publishes each snapshot."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._shared = SharedResources()
        # One job directory for the reconciler and the jobs collector: a job file is read
        # once, and a job's class and its GPUs come from the same reading.
        jobs = shared_job_directory(self._shared, config.job_dir)
        # Before the collectors: the qos collector reports on the reconciler's policies.
        self.reconciler = self._shared.get(
            QOS_RECONCILER,
            lambda: Reconciler(QosSettings.from_config(config), jobs=jobs),
            Reconciler.close,
        )
        # What traffic control can do, probed before the API and the loops start: the
        # first pass needs it, and a start-up that fails does so before serving anything.
        try:
            self.reconciler.kernel.capabilities()
        except Exception:
            log.exception("traffic control capability probe failed; the first pass retries")
        collectors = build_collectors(config, self._shared)
        self.sampler = Sampler(
            collectors,
            node_name=config.node_name,
            interval_s=config.interval,
            timeout_s=config.collector_timeout_s,
        )
        self.cache = ExpositionCache(collectors)
        self.hub = SnapshotHub(config.interval)
        self.uplink: Uplink | None = None
        if config.aggregator is not None:
            self.uplink = Uplink(
                uplink_settings(config, collectors), ReconcilerPolicies(self.reconciler), self.hub
            )
        self._api: ApiServer | None = None
        self.stop_event = threading.Event()
        self.first_snapshot = threading.Event()
        self._server: MetricsServer | None = None
        self.notifier = Notifier.from_environment()
        self._last_tick_s = time.monotonic()
        self._ready = threading.Event()
        self._reload_requested = threading.Event()

    def publish(self, snapshot: Snapshot) -> None:
        self.cache.update(snapshot)
        self.hub.publish(snapshot)
        if self.uplink is not None:
            self.uplink.offer(snapshot)
        self._last_tick_s = time.monotonic()
        self.first_snapshot.set()

    def start_api(self) -> ApiServer:
        """Serve the gRPC API on the unix socket and on TCP (grpc_listen); raises
        ListenError when either cannot bind."""
        api = ApiServer(
            self.config.grpc_socket,
            self.hub,
            group=self.config.grpc_socket_group,
            qos_backend=self.reconciler,
            tcp=TcpSettings.from_config(self.config),
            # Health reports each service SERVING once it has something to answer with.
            readiness={
                TELEMETRY_SERVICE: self.first_snapshot,
                QOS_SERVICE: self.reconciler.first_pass,
            },
        )
        api.start()
        self._api = api
        return api

    def start_metrics(self) -> MetricsServer:
        """Bind the metrics listener; raises ListenError when the port is taken."""
        self._server = MetricsServer(self.config.metrics_address, self.cache, self.config.interval)
        self._server.start()
        return self._server

    def run(self) -> None:
        """Sample and reconcile until stopped (SIGINT/SIGTERM or `stop()`); the metrics
        server must be started."""
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Enforcement goes on without a record; each save logs and counts its failure.
            log.error("state directory %s: %s", self.config.state_dir, exc)
        reconciling = threading.Thread(
            target=self.reconciler.run,
            args=(self.stop_event, self.config.reconcile_interval),
            name="qos-reconcile",
            daemon=True,
        )
        reconciling.start()
        start_watcher(self.reconciler, self.stop_event)
        self._last_tick_s = time.monotonic()
        if self.uplink is not None:
            threading.Thread(
                target=self.uplink.run, args=(self.stop_event,), name="uplink", daemon=True
            ).start()
        for target, name in (
            (self._notify_ready, "sd-ready"),
            (self._notify_reloads, "sd-reload"),
            (self._feed_watchdog, "sd-watchdog"),
        ):
            threading.Thread(target=target, name=name, daemon=True).start()
        try:
            self.sampler.run(self.stop_event, self.publish)
        finally:
            self.stop_event.set()
            self.notifier.stopping()
            self.reconciler.wake.set()
            reconciling.join(timeout=30)

    # --- systemd notifications (no-ops unless started with Type=notify) ---

    def _notify_ready(self) -> None:
        """READY=1 once metrics are being served and QoS has been reconciled once."""
        for event in (self.first_snapshot, self.reconciler.first_pass):
            while not event.wait(0.1):
                if self.stop_event.is_set():
                    return
        self.notifier.ready(self._status())
        self._ready.set()

    def _notify_reloads(self) -> None:
        """READY=1 again after the first reconcile pass that began after a SIGHUP."""
        while not self.stop_event.is_set():
            if not self._reload_requested.wait(0.5):
                continue
            self._reload_requested.clear()
            # The reconcile loop clears `wake` just before the pass that re-reads the
            # policies; any pass that ends after that includes the reload. Reading the
            # count after the clear errs late (one more pass), never early.
            while self.reconciler.wake.is_set():
                if self.stop_event.wait(0.02):
                    return
            passes = self._reconcile_passes()
            while self._reconcile_passes() <= passes:
                if self.stop_event.wait(0.02):
                    return
            self.notifier.ready(self._status())

    def _feed_watchdog(self) -> None:
        """WATCHDOG=1 every WatchdogSec/2 while the sampling loop ticks, so systemd
        restarts an agent whose loop hangs."""
        interval_s = watchdog_interval_s()
        if interval_s is None:
            return
        stale_after_s = WATCHDOG_STALE_TICKS * self.config.interval
        # systemd arms the watchdog when start-up completes; TimeoutStartSec covers before.
        while not self._ready.wait(0.1):
            if self.stop_event.is_set():
                return
        feeding = True
        while not self.stop_event.wait(interval_s):
            silent_s = time.monotonic() - self._last_tick_s
            if silent_s <= stale_after_s:
                self.notifier.watchdog()
                if not feeding:
                    log.info("sampling loop ticks again, feeding the watchdog")
            elif feeding:
                log.warning("sampling loop silent for %.1fs, not feeding the watchdog", silent_s)
            feeding = silent_s <= stale_after_s

    def _reconcile_passes(self) -> int:
        return sum(list(self.reconciler.results.values()))

    def _status(self) -> str:
        return (
            f"sampling {len(self.sampler.collectors)} collector(s) every "
            f"{self.config.interval:g}s, {len(self.reconciler.managed)} QoS policies enforced"
        )

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self._api is not None:
            self._api.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.sampler.close()
        self.notifier.close()
        if self.config.on_exit == "remove":
            log.info("removing the agent's qdiscs and nftables table (--on-exit remove)")
            self.reconciler.remove_all()
        self._shared.close()

    def install_signal_handlers(self) -> None:
        agent_pid = os.getpid()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if os.getpid() != agent_pid:
                # A child forked by a library (pyroute2's namespace helpers) that is
                # being ended: end as the signal says, not as the agent stopping.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            log.info("received SIGHUP, reloading QoS policies")
            if self._api is not None:
                # TLS certificates too (it logs the outcome; bad files keep the old
                # ones). Off the signal handler: a second SIGHUP must not interrupt a
                # reload holding its lock.
                threading.Thread(
                    target=self._api.reload_tls, name="tls-reload", daemon=True
                ).start()
            # Before the first READY=1 a reload is part of starting up.
            reloading = self._ready.is_set() and self.notifier.reloading()
            self.reconciler.wake.set()
            # After `wake`: the reload thread must find it set, or consumed by a new pass.
            if reloading:
                self._reload_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
