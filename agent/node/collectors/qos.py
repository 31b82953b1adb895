"""Per-class QoS statistics of the agent's HTB trees, and the reconciler's counters.

The classes come from the reconciler running in this process (or, for a one-off
`fabric-agent sample`, from the persisted QoS state); their counters from one class dump
per shaped device. Rates are the byte counters' change since the previous tick: the
kernel runs no rate estimator on the agent's classes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import FabricError
from agent.node.collectors.base import CollectorContext, Tick, register
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.qos.kernel import QosKernel
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import StateError, load_state

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


@dataclass(frozen=True)
class _Shaped:
    policy: str
    device: str
    minors: Mapping[str, int]


class QosCollector:
    name = "qos"

    def __init__(self, context: CollectorContext) -> None:
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
            state = load_state(self._context.config.state_dir)
        except StateError as exc:
            raise CollectorError(str(exc)) from exc
        if self._own_kernel is None:
            self._own_kernel = NetlinkKernel()
        shaped = [_Shaped(p.name, p.device, p.minors) for p in state.policies.values()]
        return shaped, self._own_kernel

    def collect(self, tick: Tick) -> tuple[Any, ...]:
        reconciler = self._reconciler()
        shaped, kernel = self._shaped(reconciler)
        now = time.monotonic()
        samples: list[Any] = []
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
                    if now > at and counters.bytes >= bytes_before:
                        rate = (counters.bytes - bytes_before) * 8 / (now - at)
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
                )
            )
        if failures:
            raise CollectorError("class statistics: " + "; ".join(failures))
        return tuple(samples)

    def metrics(self, samples: Sequence[Any]) -> Iterable[Family]:
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
            "Policies and assignments by source (file, api) and state (enforced, pending, failed).",
            ["source", "state"],
        )
        for sample in samples:
            if isinstance(sample, QosClassSample):
                key = [sample.device, sample.policy, sample.class_name]
                sent.add_metric(key, sample.sent_bytes)
                packets.add_metric(key, sample.sent_packets)
                dropped.add_metric(key, sample.dropped_packets)
                overlimits.add_metric(key, sample.overlimits)
                backlog.add_metric(key, sample.backlog_bytes)
            elif isinstance(sample, QosReconcileSample):
                for result in ("success", "invalid", "error"):
                    results.add_metric([result], sample.results.get(result, 0))
                for device, count in sorted(sample.drift_corrections.items()):
                    drift.add_metric([device], count)
                expirations.add_metric([], sample.lease_expirations)
                for source in ("file", "api"):
                    for state in ("enforced", "pending", "failed"):
                        policies.add_metric(
                            [source, state], sample.policies.get((source, state), 0)
                        )
        yield from (sent, packets, dropped, overlimits, backlog, results, drift)
        yield from (expirations, policies)

    def close(self) -> None:
        if self._own_kernel is not None:
            self._own_kernel.close()


@register("qos")
def _factory(context: CollectorContext) -> QosCollector:
    return QosCollector(context)
