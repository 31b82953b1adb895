"""The aggregator's fleet view: every node's registration, latest summary and liveness,
the events they imply, and the queries over them (list by selector and status, top N).

Plain, single-threaded state: the aggregator's event loop owns it, and the clock is
injected, so liveness is tested without sleeping. Memory per node is one latest
summary plus the non-zero deltas (errors, drops, XIDs) of the longest query window;
those are rare, so a healthy fleet stores almost nothing beyond its latest summaries.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from agent.aggregator.limits import MAX_DELTA_ENTRIES_PER_NODE
from agent.aggregator.store.base import selector_matches
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb

CONNECTED, STALE, UNREACHABLE = (
    pb.NODE_STATUS_CONNECTED,
    pb.NODE_STATUS_STALE,
    pb.NODE_STATUS_UNREACHABLE,
)
# Windowed top-N queries look back at most this far.
MAX_WINDOW_S = 3600.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class Liveness:
    """When a silent node turns stale, then unreachable ("gone")."""

    summary_interval_s: float = 1.0
    # Missed summaries before a node is stale.
    stale_after_missed: int = 3
    gone_after_s: float = 60.0
    # A gone node is forgotten (its record, its labels in the store) once silent this
    # long: nodes that come and go under new names (autoscaling, re-imaging) would
    # otherwise fill max_nodes with ghosts and lock every new node out.
    forget_after_s: float = 7 * 24 * 3600.0

    @property
    def stale_after_s(self) -> float:
        return self.summary_interval_s * self.stale_after_missed

    def interval_for(self, registered_s: float) -> float:
        """A node's summary interval: the one it registered with when longer than the
        fleet's (an agent sampling every 5 s is not late every second)."""
        return max(self.summary_interval_s, registered_s)

    def thresholds(self, registered_s: float) -> tuple[float, float]:
        """(stale after, gone after) seconds of silence for a node's interval."""
        interval_s = self.interval_for(registered_s)
        stale_s = interval_s * self.stale_after_missed
        return stale_s, max(self.gone_after_s, stale_s + interval_s)

    def __post_init__(self) -> None:
        if self.summary_interval_s <= 0 or self.stale_after_missed < 1:
            raise ValueError("summary interval must be positive and stale_after_missed >= 1")
        if self.gone_after_s <= self.stale_after_s:
            raise ValueError(
                f"gone after {self.gone_after_s:g}s must be longer than stale after "
                f"{self.stale_after_s:g}s"
            )
        if self.forget_after_s <= self.gone_after_s:
            raise ValueError(
                f"forget after {self.forget_after_s:g}s must be longer than gone after "
                f"{self.gone_after_s:g}s"
            )


@dataclass
class NodeRecord:
    name: str
    labels: dict[str, str]
    agent_version: str = ""
    capabilities: tuple[str, ...] = ()
    status: pb.NodeStatus.ValueType = CONNECTED
    last_seen_s: float = 0.0
    # The summary interval the agent registered with (0: not given).
    interval_s: float = 0.0
    summary: pb.NodeSummary | None = None
    # (time, {(entity kind, entity, metric): delta}) for the summaries with any delta.
    deltas: deque[tuple[float, dict[tuple[str, str, str], float]]] = field(default_factory=deque)
    # Entries in `deltas`, kept under MAX_DELTA_ENTRIES_PER_NODE (oldest dropped first).
    delta_entries: int = 0

    def matches(self, selector: Mapping[str, str]) -> bool:
        return selector_matches(selector, self.labels)


# Metrics of QueryTop: (entity kind, metric) -> how to read it from the latest summary.
_LATEST: dict[
    tuple[pb.TopEntity.ValueType, str], Callable[[pb.NodeSummary], Iterator[tuple[str, float]]]
] = {
    (pb.TOP_ENTITY_NODE, "gpu_utilization_ratio"): lambda s: iter(
        [("", _mean(g.utilization_ratio for g in s.gpus if g.HasField("utilization_ratio")))]
    ),
    (pb.TOP_ENTITY_NODE, "gpu_power_watts"): lambda s: iter(
        [("", sum(g.power_watts for g in s.gpus if g.HasField("power_watts")))]
    ),
    (pb.TOP_ENTITY_NODE, "nic_transmit_bytes_per_second"): lambda s: iter(
        [("", sum(n.transmit_bytes_per_second for n in s.nics))]
    ),
    (pb.TOP_ENTITY_NODE, "nic_receive_bytes_per_second"): lambda s: iter(
        [("", sum(n.receive_bytes_per_second for n in s.nics))]
    ),
    (pb.TOP_ENTITY_GPU, "gpu_utilization_ratio"): lambda s: (
        (str(g.index), g.utilization_ratio) for g in s.gpus if g.HasField("utilization_ratio")
    ),
    (pb.TOP_ENTITY_GPU, "gpu_power_watts"): lambda s: (
        (str(g.index), g.power_watts) for g in s.gpus if g.HasField("power_watts")
    ),
    (pb.TOP_ENTITY_GPU, "nvlink_transmit_bytes_per_second"): lambda s: (
        (str(g.index), g.nvlink_transmit_bytes_per_second) for g in s.gpus
    ),
    (pb.TOP_ENTITY_GPU, "nvlink_receive_bytes_per_second"): lambda s: (
        (str(g.index), g.nvlink_receive_bytes_per_second) for g in s.gpus
    ),
    (pb.TOP_ENTITY_NVLINK, "nvlink_down"): lambda s: (
        (f"{g.index}/{link}", 1.0) for g in s.gpus for link in g.nvlink_links_down
    ),
    (pb.TOP_ENTITY_NIC, "nic_transmit_bytes_per_second"): lambda s: (
        (n.device, n.transmit_bytes_per_second) for n in s.nics
    ),
    (pb.TOP_ENTITY_NIC, "nic_receive_bytes_per_second"): lambda s: (
        (n.device, n.receive_bytes_per_second) for n in s.nics
    ),
}
# Delta metrics, summed over a window: (entity kind, metric) -> key kind in `deltas`.
_DELTAS: dict[tuple[pb.TopEntity.ValueType, str], str] = {
    (pb.TOP_ENTITY_NODE, "nvlink_errors"): "node",
    (pb.TOP_ENTITY_NODE, "nic_errors"): "node",
    (pb.TOP_ENTITY_NODE, "xids"): "node",
    (pb.TOP_ENTITY_NODE, "qos_drops"): "node",
    (pb.TOP_ENTITY_GPU, "nvlink_errors"): "gpu",
    (pb.TOP_ENTITY_GPU, "xids"): "gpu",
    (pb.TOP_ENTITY_NVLINK, "nvlink_errors"): "nvlink",
    (pb.TOP_ENTITY_NIC, "nic_errors"): "nic",
    (pb.TOP_ENTITY_NIC, "nic_drops"): "nic",
}


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


class QueryError(ValueError):
    """A top-N query the registry cannot answer (unknown metric for the entity)."""


class NodeRegistry:
    """Nodes by name. `on_event` receives every event as it happens."""

    def __init__(
        self,
        liveness: Liveness,
        *,
        clock: Clock = time.time,
        on_event: Callable[[pb.Event], None] = lambda event: None,
    ) -> None:
        self.liveness = liveness
        self._clock = clock
        self._on_event = on_event
        self._nodes: dict[str, NodeRecord] = {}
        # Node names in order, for pages of a listing without sorting the fleet each time.
        self._names: list[str] = []

    # --- agents ---

    def register(self, message: pb.Register) -> NodeRecord:
        """A node (re)connected: connected from now, its labels and version as given."""
        now = self._clock()
        record = self._nodes.get(message.node_name)
        if record is None:
            record = NodeRecord(message.node_name, dict(message.labels))
            self._nodes[record.name] = record
            bisect.insort(self._names, record.name)
        record.labels = dict(message.labels)
        record.agent_version = message.agent_version
        record.capabilities = tuple(message.capabilities)
        record.interval_s = message.summary_interval.ToNanoseconds() / 1e9
        record.status = CONNECTED
        record.last_seen_s = now
        self._emit(pb.EVENT_KIND_NODE_REGISTERED, record.name, "", "registered", now)
        return record

    def summary(self, node: str, summary: pb.NodeSummary) -> None:
        """A summary arrived: the node is seen, its events are raised, its deltas kept."""
        record = self._nodes.get(node)
        if record is None:
            raise KeyError(f"summary from unregistered node {node!r}")
        now = self._clock()
        previous = record.summary
        if record.status != CONNECTED:
            self._emit(pb.EVENT_KIND_NODE_REGISTERED, node, "", "summaries resumed", now)
        record.status = CONNECTED
        record.last_seen_s = now
        record.summary = summary
        self._events_of(node, previous, summary, now)
        deltas = _deltas_of(summary)
        if deltas:
            record.deltas.append((now, deltas))
            record.delta_entries += len(deltas)
        while record.deltas and (
            record.deltas[0][0] < now - MAX_WINDOW_S
            or record.delta_entries > MAX_DELTA_ENTRIES_PER_NODE
        ):
            record.delta_entries -= len(record.deltas.popleft()[1])

    def sweep(self) -> list[tuple[str, pb.NodeStatus.ValueType]]:
        """Mark silent nodes stale or unreachable; returns the (node, status) changes."""
        now = self._clock()
        changed = []
        for record in self._nodes.values():
            silent_s = now - record.last_seen_s
            if record.status == UNREACHABLE or silent_s <= self.liveness.stale_after_s:
                continue  # the usual case: no per-node thresholds to work out
            stale_after_s, gone_after_s = self.liveness.thresholds(record.interval_s)
            if record.status == CONNECTED and silent_s > stale_after_s:
                record.status = STALE
                missed = int(silent_s / self.liveness.interval_for(record.interval_s))
                self._emit(
                    pb.EVENT_KIND_NODE_STALE, record.name, "", f"{missed} summaries missed", now
                )
                changed.append((record.name, STALE))
            if record.status == STALE and silent_s > gone_after_s:
                record.status = UNREACHABLE
                self._emit(
                    pb.EVENT_KIND_NODE_GONE, record.name, "", f"silent for {silent_s:.0f}s", now
                )
                changed.append((record.name, UNREACHABLE))
        return changed

    def forget_silent(self, keep: Container[str] = ()) -> list[str]:
        """Forget the gone nodes silent for longer than forget_after_s (and than their
        own gone threshold), except those in `keep`; their names."""
        now = self._clock()
        forgotten = []
        for record in self._nodes.values():
            if record.status != UNREACHABLE or record.name in keep:
                continue
            _, gone_after_s = self.liveness.thresholds(record.interval_s)
            if now - record.last_seen_s > max(self.liveness.forget_after_s, gone_after_s):
                forgotten.append(record.name)
        for name in forgotten:
            del self._nodes[name]
            del self._names[bisect.bisect_left(self._names, name)]
        return forgotten

    # --- queries ---

    def get(self, name: str) -> NodeRecord | None:
        return self._nodes.get(name)

    def __len__(self) -> int:
        return len(self._nodes)

    def after(self, name: str) -> Iterator[NodeRecord]:
        """Every node whose name sorts after `name`, in name order."""
        for index in range(bisect.bisect_right(self._names, name), len(self._names)):
            yield self._nodes[self._names[index]]

    def status_counts(self) -> dict[pb.NodeStatus.ValueType, int]:
        counts = dict.fromkeys((CONNECTED, STALE, UNREACHABLE), 0)
        for record in self._nodes.values():
            counts[record.status] += 1
        return counts

    def nodes(
        self,
        selector: Mapping[str, str] = {},
        statuses: Sequence[pb.NodeStatus.ValueType] = (),
    ) -> list[NodeRecord]:
        """Matching nodes by name."""
        wanted = set(statuses)
        return [
            record
            for record in self.after("")
            if record.matches(selector) and (not wanted or record.status in wanted)
        ]

    def top(
        self,
        entity: pb.TopEntity.ValueType,
        metric: str,
        limit: int,
        *,
        window_s: float | None = None,
        selector: Mapping[str, str] = {},
    ) -> list[tuple[str, str, float]]:
        """The `limit` largest (node, entity, value), largest first; ties by name."""
        if limit <= 0:
            return []
        if (entity, metric) in _DELTAS:
            values = self._windowed(entity, metric, window_s, selector)
        elif (entity, metric) in _LATEST:
            read = _LATEST[(entity, metric)]
            values = (
                (record.name, key, value)
                for record in self._nodes.values()
                if record.summary is not None and record.matches(selector)
                for key, value in read(record.summary)
            )
        else:
            known = sorted({m for (e, m) in [*_LATEST, *_DELTAS] if e == entity})
            raise QueryError(
                f"unknown metric {metric!r} for {pb.TopEntity.Name(entity)} "
                f"(known: {', '.join(known) or 'none'})"
            )
        return heapq.nsmallest(limit, values, key=lambda item: (-item[2], item[0], item[1]))

    def _windowed(
        self,
        entity: pb.TopEntity.ValueType,
        metric: str,
        window_s: float | None,
        selector: Mapping[str, str],
    ) -> Iterator[tuple[str, str, float]]:
        kind = _DELTAS[(entity, metric)]
        since = self._clock() - min(window_s or 0.0, MAX_WINDOW_S)
        for record in self._nodes.values():
            if not record.matches(selector):
                continue
            sums: dict[str, float] = {}
            for at, deltas in reversed(record.deltas):
                # Without a window: the latest summary's deltas only.
                if at < since if window_s else at != record.last_seen_s:
                    break
                for (key_kind, key, name), value in deltas.items():
                    if name == metric and key_kind == kind:
                        sums[key] = sums.get(key, 0.0) + value
            for key, value in sums.items():
                if value:
                    yield record.name, key, value

    # --- events ---

    def _events_of(
        self, node: str, previous: pb.NodeSummary | None, summary: pb.NodeSummary, now: float
    ) -> None:
        before: dict[int, pb.GpuSummary] | None = None
        for gpu in summary.gpus:
            # The usual GPU (not lost, no link down, no XID) raises nothing: skip the
            # lookups, which cost more than the rest of a summary's handling here.
            if not (gpu.lost or gpu.nvlink_links_down or gpu.new_xids):
                continue
            if before is None:
                before = {g.index: g for g in previous.gpus} if previous is not None else {}
            old = before.get(gpu.index)
            if gpu.lost and (old is None or not old.lost):
                self._emit(pb.EVENT_KIND_GPU_LOST, node, f"gpu {gpu.index}", gpu.uuid, now)
            was_down = set(old.nvlink_links_down) if old is not None else set()
            for link in gpu.nvlink_links_down:
                if link not in was_down:
                    subject = f"gpu {gpu.index} link {link}"
                    self._emit(pb.EVENT_KIND_NVLINK_DOWN, node, subject, "link down", now)
            for xid in gpu.new_xids:
                message = f"XID {xid.xid} x{xid.count}"
                self._emit(pb.EVENT_KIND_XID, node, f"gpu {gpu.index}", message, now)
        if summary.reconcile.drift_corrections:
            message = f"{summary.reconcile.drift_corrections} drift correction(s)"
            self._emit(pb.EVENT_KIND_DRIFT, node, "qos", message, now)

    def _emit(
        self, kind: pb.EventKind.ValueType, node: str, subject: str, message: str, now: float
    ) -> None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(now * 1e9))
        self._on_event(pb.Event(kind=kind, node=node, time=stamp, subject=subject, message=message))


def _deltas_of(summary: pb.NodeSummary) -> dict[tuple[str, str, str], float]:
    """The non-zero deltas of a summary, by (entity kind, entity, metric)."""
    deltas: dict[tuple[str, str, str], float] = {}

    def add(kind: str, key: str, metric: str, value: float) -> None:
        if value:
            deltas[(kind, key, metric)] = deltas.get((kind, key, metric), 0.0) + value
            deltas[("node", "", metric)] = deltas.get(("node", "", metric), 0.0) + value

    # Healthy devices have no deltas: each check below skips the calls that would add
    # nothing (a summary arrives from every node every interval).
    for gpu in summary.gpus:
        if not (gpu.nvlink_errors or gpu.new_xids or gpu.nvlink_link_errors):
            continue
        add("gpu", str(gpu.index), "nvlink_errors", gpu.nvlink_errors)
        add("gpu", str(gpu.index), "xids", sum(x.count for x in gpu.new_xids))
        # Per link only: the GPU's total above already counts them for the node.
        for link in gpu.nvlink_link_errors:
            key = ("nvlink", f"{gpu.index}/{link.link}", "nvlink_errors")
            deltas[key] = deltas.get(key, 0.0) + link.errors
    for nic in summary.nics:
        if nic.errors or nic.drops:
            add("nic", nic.device, "nic_errors", nic.errors)
            add("nic", nic.device, "nic_drops", nic.drops)
    for cls in summary.qos_classes:
        if cls.drops:
            add("qos", f"{cls.policy}/{cls.class_name}", "qos_drops", cls.drops)
    return deltas
