"""The agent's compact node summary: rates and deltas over one interval, from snapshots.

Snapshots carry cumulative counters (since boot, since the agent started, since a class
was created); the aggregator wants what happened in the last interval. `SummaryBuilder`
keeps the previous snapshot's counters per device and turns each new snapshot into a
`NodeSummary`. It does no I/O, so the stream client calls it on every tick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.node.collectors.gpu import GpuCollector, GpuSample
from agent.node.collectors.nic import NicCollector, NicSample
from agent.node.collectors.nvlink import NvLinkCollector, NvLinkSample
from agent.node.collectors.qos import QosClassSample, QosCollector, QosReconcileSample
from agent.node.snapshot import Snapshot
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb

K = TypeVar("K")
V = TypeVar("V")

# A GPU is known by index and UUID: a different board in the same slot starts afresh.
_GpuKey = tuple[int, str]
_LinkKey = tuple[int, int]
# A re-created interface gets a new ifindex and counters from zero: it is a new device.
_NicKey = tuple[str, int]
_QosKey = tuple[str, str, str]


def _increase(new: int, old: int | None) -> int:
    """A counter's increase; 0 for a device first seen now. A counter below its previous
    value was reset (GPU reset, driver reload, class re-created, agent restart), so its
    value is what accrued since the reset: never a negative or wrapped-around delta."""
    if old is None:
        return 0
    return new - old if new >= old else new


def _elapsed_s(now_s: float, then_s: float | None, fallback_s: float) -> float:
    """Seconds between two snapshots; the nominal interval where there is no earlier one
    or the wall clock stepped back (a rate over a non-positive interval means nothing)."""
    if then_s is None or now_s <= then_s:
        return fallback_s
    return now_s - then_s


@dataclass(slots=True)
class _Section(Generic[K, V]):
    """One collector's counters as of the last snapshot that carried its section.

    A snapshot without the section (the collector failed that tick) leaves this as it
    was, so the next good tick's deltas cover the gap and its rates use the real elapsed
    time instead of the devices looking new (and their deltas lost).
    """

    at_s: float | None = None
    counters: dict[K, V] = field(default_factory=dict)


@dataclass(slots=True)
class _LinkTotals:
    """One GPU's NVLinks summed over this interval."""

    transmit_bytes_per_second: float = 0.0
    receive_bytes_per_second: float = 0.0
    links: int = 0
    down: list[int] = field(default_factory=list)
    errors: int = 0
    # (link, errors) of the links with errors this interval.
    erring: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _ReconcileCounters:
    results: Mapping[str, int]
    drift_corrections: int


class SummaryBuilder:
    """Turns consecutive snapshots into per-interval `NodeSummary` messages.

    Work and state are O(devices) per call. Devices that disappear are dropped from the
    state; devices that appear report zero deltas and rates from their second snapshot
    (except rates the snapshot measures itself, such as GPM's).
    """

    def __init__(self) -> None:
        self._completed_s: float | None = None
        self._gpus: _Section[_GpuKey, tuple[tuple[int, int], ...]] = _Section()
        self._links: _Section[_LinkKey, tuple[int | None, int | None, int | None]] = _Section()
        self._nics: _Section[_NicKey, tuple[int, int, int, int]] = _Section()
        self._qos: _Section[_QosKey, int] = _Section()
        self._reconcile: _ReconcileCounters | None = None

    def next(self, snapshot: Snapshot) -> pb.NodeSummary:
        """The summary of the interval since the previous call's snapshot."""
        summary = pb.NodeSummary(seq=snapshot.seq)
        summary.sampled_at.FromNanoseconds(round(snapshot.started_wall_s * 1e9))
        interval_s = _elapsed_s(snapshot.completed_wall_s, self._completed_s, snapshot.interval_s)
        summary.interval.FromNanoseconds(round(interval_s * 1e9))
        self._completed_s = snapshot.completed_wall_s

        sections = snapshot.sections
        links = self._link_totals(snapshot) if NvLinkCollector.name in sections else {}
        if GpuCollector.name in sections:
            self._add_gpus(summary, snapshot, links)
        if NicCollector.name in sections:
            self._add_nics(summary, snapshot)
        if QosCollector.name in sections:
            self._add_qos(summary, snapshot)
        return summary

    def _link_totals(self, snapshot: Snapshot) -> dict[int, _LinkTotals]:
        section = self._links
        elapsed_s = _elapsed_s(snapshot.completed_wall_s, section.at_s, snapshot.interval_s)
        counters: dict[_LinkKey, tuple[int | None, int | None, int | None]] = {}
        totals: dict[int, _LinkTotals] = {}
        for sample in snapshot.section(NvLinkCollector.name):
            if not isinstance(sample, NvLinkSample):
                continue
            key = (sample.gpu, sample.link)
            errors = _link_errors(sample)
            now = (sample.transmit_bytes, sample.receive_bytes, errors)
            before = section.counters.get(key)
            counters[key] = now
            gpu = totals.get(sample.gpu)
            if gpu is None:
                gpu = totals[sample.gpu] = _LinkTotals()
            gpu.links += 1
            if sample.up is False:
                gpu.down.append(sample.link)
            gpu.transmit_bytes_per_second += _link_rate(
                sample.gpm_transmit_bytes_per_second,
                now[0],
                None if before is None else before[0],
                elapsed_s,
            )
            gpu.receive_bytes_per_second += _link_rate(
                sample.gpm_receive_bytes_per_second,
                now[1],
                None if before is None else before[1],
                elapsed_s,
            )
            if errors is not None and before is not None:
                increase = _increase(errors, before[2])
                if increase:
                    gpu.errors += increase
                    gpu.erring.append((sample.link, increase))
        section.at_s = snapshot.completed_wall_s
        section.counters = counters
        return totals

    def _add_gpus(
        self, summary: pb.NodeSummary, snapshot: Snapshot, links: Mapping[int, _LinkTotals]
    ) -> None:
        section = self._gpus
        counters: dict[_GpuKey, tuple[tuple[int, int], ...]] = {}
        for sample in snapshot.section(GpuCollector.name):
            if not isinstance(sample, GpuSample):
                continue
            key = (sample.index, sample.uuid)
            counters[key] = sample.xid_errors
            message = summary.gpus.add(index=sample.index, uuid=sample.uuid, lost=sample.lost)
            if sample.utilization_gpu_ratio is not None:
                message.utilization_ratio = sample.utilization_gpu_ratio
            if sample.power_watts is not None:
                message.power_watts = sample.power_watts
            totals = links.get(sample.index)
            if totals is not None:
                message.nvlink_transmit_bytes_per_second = totals.transmit_bytes_per_second
                message.nvlink_receive_bytes_per_second = totals.receive_bytes_per_second
                message.nvlink_links = totals.links
                message.nvlink_links_down.extend(totals.down)
                message.nvlink_errors = totals.errors
                for link, errors in totals.erring:
                    message.nvlink_link_errors.add(link=link, errors=errors)
            before = section.counters.get(key)
            # Equal tuples, the usual case, raised nothing: skip building the lookup.
            if before is not None and before != sample.xid_errors:
                previous = dict(before)
                for xid, count in sample.xid_errors:
                    # An XID this GPU had not raised before counts fully.
                    raised = _increase(count, previous.get(xid, 0))
                    if raised:
                        message.new_xids.add(xid=xid, count=raised)
        section.at_s = snapshot.completed_wall_s
        section.counters = counters

    def _add_nics(self, summary: pb.NodeSummary, snapshot: Snapshot) -> None:
        section = self._nics
        elapsed_s = _elapsed_s(snapshot.completed_wall_s, section.at_s, snapshot.interval_s)
        counters: dict[_NicKey, tuple[int, int, int, int]] = {}
        for sample in snapshot.section(NicCollector.name):
            if not isinstance(sample, NicSample):
                continue
            key = (sample.device, sample.ifindex)
            now = (
                sample.receive_bytes,
                sample.transmit_bytes,
                sample.receive_errors + sample.transmit_errors,
                sample.receive_drops + sample.transmit_drops,
            )
            counters[key] = now
            message = summary.nics.add(device=sample.device, operstate=sample.operstate)
            before = section.counters.get(key)
            if before is None:
                continue
            message.receive_bytes_per_second = _increase(now[0], before[0]) / elapsed_s
            message.transmit_bytes_per_second = _increase(now[1], before[1]) / elapsed_s
            message.errors = _increase(now[2], before[2])
            message.drops = _increase(now[3], before[3])
        section.at_s = snapshot.completed_wall_s
        section.counters = counters

    def _add_qos(self, summary: pb.NodeSummary, snapshot: Snapshot) -> None:
        section = self._qos
        counters: dict[_QosKey, int] = {}
        reconcile: _ReconcileCounters | None = None
        for sample in snapshot.section(QosCollector.name):
            if isinstance(sample, QosClassSample):
                key = (sample.device, sample.policy, sample.class_name)
                counters[key] = sample.dropped_packets
                summary.qos_classes.add(
                    policy=sample.policy,
                    class_name=sample.class_name,
                    device=sample.device,
                    # The collector's own rate since its previous tick: the same interval.
                    sent_bits_per_second=sample.rate_bps or 0.0,
                    drops=_increase(sample.dropped_packets, section.counters.get(key)),
                )
            elif isinstance(sample, QosReconcileSample):
                reconcile = _ReconcileCounters(
                    sample.results, sum(sample.drift_corrections.values())
                )
                self._add_reconcile(summary, reconcile)
        section.at_s = snapshot.completed_wall_s
        section.counters = counters
        self._reconcile = reconcile

    def _add_reconcile(self, summary: pb.NodeSummary, now: _ReconcileCounters) -> None:
        message = summary.reconcile
        # Set even when nothing changed: an empty reconcile says "enforcing, no passes",
        # an absent one "this node reports no reconciler".
        message.SetInParent()
        before = self._reconcile
        if before is None:
            return
        for result, count in now.results.items():
            # A result first seen now (the first "error" pass) counts fully.
            passes = _increase(count, before.results.get(result, 0))
            if passes:
                message.passes[result] = passes
        message.drift_corrections = _increase(now.drift_corrections, before.drift_corrections)


def _link_errors(sample: NvLinkSample) -> int | None:
    """Replay, recovery and CRC errors together; None when the link reports none of them."""
    counts = (
        sample.replay_errors,
        sample.recovery_errors,
        sample.crc_flit_errors,
        sample.crc_data_errors,
    )
    if all(count is None for count in counts):
        return None
    return sum(count for count in counts if count is not None)


def _link_rate(
    measured: float | None, now: int | None, before: int | None, elapsed_s: float
) -> float:
    """A link's bytes/s: GPM's own measurement where the GPU has one (it is exact over its
    window); otherwise the counter's increase, 0 until a link has two readings."""
    if measured is not None:
        return measured
    if now is None or before is None:
        return 0.0
    return _increase(now, before) / elapsed_s
