"""Per-class QoS statistics of the agent's HTB trees (the `qos` section), and the
reconciler's counters (the `qos_reconcile` section).

The classes come from the reconciler running in this process (or, for a one-off
`fabric-agent sample`, from the persisted QoS state); their counters from one class dump
per shaped device. Rates are the byte counters' change since the previous tick: the
kernel runs no rate estimator on the agent's classes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.common import rates
from agent.common.errors import FabricError
from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    register,
)
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.qos.api_objects import API_FILE
from agent.node.qos.kernel import QosKernel
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import STATE_FILE, StateError, load_state
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

# The key agent.node.runtime registers its reconciler under.
RECONCILER_KEY = "qos.reconciler"


@dataclass(frozen=True, slots=True)
class QosClassSample:
    """One policy class on its device at one tick."""

    device: str
    policy: str
    class_name: str
    minor: int
    sent_bytes: int
    sent_packets: int
    dropped_packets: int
    overlimits: int
    backlog_bytes: int
    # Bits per second since the previous tick; None on the first.
    rate_bps: float | None


@dataclass(frozen=True, slots=True)
class QosReconcileSample:
    """The reconciler's pass results and drift corrections since the agent started."""

    results: Mapping[str, int]
    drift_corrections: Mapping[str, int]
    lease_expirations: int = 0
    # (source, state) -> how many policies and assignments are in it.
    policies: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # State files set aside as unusable, and failed saves, by file name.
    quarantined: Mapping[str, int] = field(default_factory=dict)
    save_failures: Mapping[str, int] = field(default_factory=dict)


class QosClassSummarizer:
    """Each class's throughput in the fleet summary, and its drops since the previous
    one."""

    def __init__(self) -> None:
        # (device, policy, class) -> dropped packets
        self._drops: dict[tuple[str, str, str], int] = {}

    def summarize(
        self, samples: tuple[QosClassSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        drops: dict[tuple[str, str, str], int] = {}
        for sample in samples:
            key = (sample.device, sample.policy, sample.class_name)
            drops[key] = sample.dropped_packets
            summary.qos_classes.add(
                policy=sample.policy,
                class_name=sample.class_name,
                device=sample.device,
                # The collector's own rate since its previous tick: the same interval.
                sent_bits_per_second=sample.rate_bps or 0.0,
                drops=rates.increase(sample.dropped_packets, self._drops.get(key)),
            )
        self._drops = drops


@dataclass(frozen=True, slots=True)
class _ReconcileCounters:
    results: Mapping[str, int]
    drift_corrections: int


class ReconcileSummarizer:
    """The reconciler's passes by result and its drift corrections since the previous
    summary."""

    def __init__(self) -> None:
        self._before: _ReconcileCounters | None = None

    def summarize(
        self, samples: tuple[QosReconcileSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        now: _ReconcileCounters | None = None
        for sample in samples:
            now = _ReconcileCounters(sample.results, sum(sample.drift_corrections.values()))
            self._add(summary, now)
        self._before = now

    def _add(self, summary: NodeSummary, now: _ReconcileCounters) -> None:
        message = summary.reconcile
        # Set even when nothing changed: an empty reconcile says "enforcing, no passes",
        # an absent one "this node reports no reconciler".
        message.SetInParent()
        before = self._before
        if before is None:
            return
        for result, count in now.results.items():
            # A result first seen now (the first "error" pass) counts fully.
            passes = rates.increase(count, before.results.get(result, 0))
            if passes:
                message.passes[result] = passes
        message.drift_corrections = rates.increase(now.drift_corrections, before.drift_corrections)


QOS_CLASSES = Section(
    "qos",
    QosClassSample,
    snapshot_field=SnapshotField("qos_classes", telemetry_pb2.QosClassSample),
    summarizer=QosClassSummarizer,
)
# API clients read the reconciler's state through QosService; the counters reach
# /metrics and the fleet summary.
QOS_RECONCILE = Section(
    "qos_reconcile", QosReconcileSample, exported=False, summarizer=ReconcileSummarizer
)


@dataclass(frozen=True, slots=True)
class QosOptions:
    """What the qos collector takes from the configuration."""

    # Where the persisted QoS state is, for a process without a reconciler.
    state_dir: Path


@dataclass(frozen=True)
class _Shaped:
    policy: str
    device: str
    minors: Mapping[str, int]


class QosCollector:
    name = "qos"
    sections = (QOS_CLASSES, QOS_RECONCILE)

    def __init__(self, context: CollectorContext[QosOptions]) -> None:
        self._context = context
        self._previous: dict[tuple[str, int], tuple[int, float]] = {}
        self._own_kernel: NetlinkKernel | None = None

    def _reconciler(self) -> Reconciler | None:
        found = self._context.shared.find(RECONCILER_KEY)
        return found if isinstance(found, Reconciler) else None

    def _shaped(self, reconciler: Reconciler | None) -> tuple[list[_Shaped], QosKernel]:
        """The shaped classes and the kernel that holds them: the reconciler's, or (a
        one-off `fabric-agent sample`) the persisted state's on this host's kernel."""
        if reconciler is not None:
            shaped = [_Shaped(m.name, m.device, m.minors) for m in reconciler.managed]
            return shaped, reconciler.kernel
        try:
            state = load_state(self._context.options.state_dir)
        except StateError as exc:
            raise CollectorError(str(exc)) from exc
        if self._own_kernel is None:
            self._own_kernel = NetlinkKernel()
        shaped = [_Shaped(p.name, p.device, p.minors) for p in state.policies.values()]
        return shaped, self._own_kernel

    def collect(self, tick: Tick) -> tuple[QosClassSample | QosReconcileSample, ...]:
        reconciler = self._reconciler()
        shaped, kernel = self._shaped(reconciler)
        now = time.monotonic()
        samples: list[QosClassSample | QosReconcileSample] = []
        failures: list[str] = []
        previous, self._previous = self._previous, {}
        for item in shaped:
            try:
                stats = kernel.class_stats(item.device)
            except FabricError as exc:
                failures.append(f"{item.device}: {exc}")
                continue
            for class_name, minor in sorted(item.minors.items(), key=lambda kv: kv[1]):
                counters = stats.get(minor)
                if counters is None:
                    continue
                key = (item.device, minor)
                rate = None
                if key in previous:
                    bytes_before, at = previous[key]
                    bytes_per_s = rates.rate(counters.bytes, bytes_before, now - at)
                    rate = None if bytes_per_s is None else bytes_per_s * 8
                self._previous[key] = (counters.bytes, now)
                samples.append(
                    QosClassSample(
                        device=item.device,
                        policy=item.policy,
                        class_name=class_name,
                        minor=minor,
                        sent_bytes=counters.bytes,
                        sent_packets=counters.packets,
                        dropped_packets=counters.drops,
                        overlimits=counters.overlimits,
                        backlog_bytes=counters.backlog_bytes,
                        rate_bps=rate,
                    )
                )
        if reconciler is not None:
            samples.append(
                QosReconcileSample(
                    dict(reconciler.results),
                    dict(reconciler.drift),
                    reconciler.lease_expirations,
                    dict(reconciler.policy_counts),
                    dict(reconciler.quarantine.counts),
                    dict(reconciler.save_failures),
                )
            )
        if failures:
            raise CollectorError("class statistics: " + "; ".join(failures))
        return tuple(samples)

    def metrics(self, samples: Sequence[QosClassSample | QosReconcileSample]) -> Iterable[Family]:
        labels = ["device", "policy", "class"]
        sent = CounterFamily("fabric_qos_class_sent_bytes_total", "Bytes the class sent.", labels)
        packets = CounterFamily(
            "fabric_qos_class_sent_packets_total", "Packets the class sent.", labels
        )
        dropped = CounterFamily(
            "fabric_qos_class_dropped_packets_total", "Packets the class dropped.", labels
        )
        overlimits = CounterFamily(
            "fabric_qos_class_overlimits_total",
            "Times the class had a packet to send over its rate or ceiling.",
            labels,
        )
        backlog = GaugeFamily(
            "fabric_qos_class_backlog_bytes", "Bytes queued in the class.", labels
        )
        results = CounterFamily(
            "fabric_qos_reconcile_total",
            "Reconcile passes by result: success, invalid (policy files rejected, nothing "
            "changed) or error (a kernel change failed and was rolled back).",
            ["result"],
        )
        drift = CounterFamily(
            "fabric_qos_drift_corrections_total",
            "Reconcile passes that found the kernel changed behind the agent's back and "
            "restored it.",
            ["device"],
        )
        expirations = CounterFamily(
            "fabric_qos_lease_expirations_total",
            "API policies and assignments removed because their lease ran out unrenewed.",
            [],
        )
        policies = GaugeFamily(
            "fabric_qos_policies",
            "Policies and assignments by source (file, api, slurm) and state"
            " (enforced, pending, failed).",
            ["source", "state"],
        )
        quarantined = CounterFamily(
            "fabric_agent_state_files_quarantined_total",
            "State files found unusable at start (corrupt, another version, too big) and "
            "set aside as <file>.corrupt-<time>.",
            ["file"],
        )
        save_failures = CounterFamily(
            "fabric_agent_state_save_failures_total",
            "Failed writes of a state file (a read-only or full state directory).",
            ["file"],
        )
        for cls in QOS_CLASSES.select(samples):
            key = [cls.device, cls.policy, cls.class_name]
            sent.add_metric(key, cls.sent_bytes)
            packets.add_metric(key, cls.sent_packets)
            dropped.add_metric(key, cls.dropped_packets)
            overlimits.add_metric(key, cls.overlimits)
            backlog.add_metric(key, cls.backlog_bytes)
        for reconcile in QOS_RECONCILE.select(samples):
            for result in ("success", "invalid", "error"):
                results.add_metric([result], reconcile.results.get(result, 0))
            for device, count in sorted(reconcile.drift_corrections.items()):
                drift.add_metric([device], count)
            expirations.add_metric([], reconcile.lease_expirations)
            for source in ("file", "api", "slurm"):
                for state in ("enforced", "pending", "failed"):
                    policies.add_metric([source, state], reconcile.policies.get((source, state), 0))
            for file in (STATE_FILE, API_FILE):
                quarantined.add_metric([file], reconcile.quarantined.get(file, 0))
                save_failures.add_metric([file], reconcile.save_failures.get(file, 0))
        yield from (sent, packets, dropped, overlimits, backlog, results, drift)
        yield from (expirations, policies, quarantined, save_failures)

    def close(self) -> None:
        if self._own_kernel is not None:
            self._own_kernel.close()


@register(QosCollector, options=QosOptions)
def _factory(context: CollectorContext[QosOptions]) -> QosCollector:
    return QosCollector(context)
