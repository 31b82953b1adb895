"""The aggregator's fleet: agent sessions, desired state, and where the two meet.

`Fleet` owns everything one aggregator replica knows and is driven by its event loop
(single-threaded: no locks). Desired state lives in the store; the fleet follows it
with a watch, so a policy written through any replica reaches the agents connected to
this one. Node summaries live only in memory (the registry): they are rebuilt within
one summary interval after a restart, and their history belongs to Prometheus.

Which fleet policies a node holds is decided here and sent down its stream: on
registration the full set (`Registered.assignments` says how many follow, and the
agent drops fleet policies not among them), then each change as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf import timestamp_pb2

from agent.aggregator.events import EventHub
from agent.aggregator.limits import DEFAULT_MAX_NODES, LimitError, check_report, check_summary
from agent.aggregator.metrics import STATUS_LABELS, FleetMetrics, event_label
from agent.aggregator.registry import Clock, Liveness, NodeRecord, NodeRegistry
from agent.aggregator.store import (
    Assignment,
    Change,
    ChangeKind,
    Store,
    StoreError,
    StoreIdentity,
)
from agent.aggregator.store.base import check_node_name, selector_matches
from agent.common.policy import documents as objects
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.v1 import qos_service_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

APPLIED, FAILED, PENDING, UNREACHABLE = (
    pb.NODE_POLICY_STATE_APPLIED,
    pb.NODE_POLICY_STATE_FAILED,
    pb.NODE_POLICY_STATE_PENDING,
    pb.NODE_POLICY_STATE_UNREACHABLE,
)
# The longest an orchestrator may make ApplyPolicy or DeletePolicy wait for reports.
MAX_WAIT_S = 60.0
# A snapshot request the agent has not answered by then is reported as failed.
SNAPSHOT_TIMEOUT_S = 10.0
# Store failures are logged at most once per operation per this many seconds (a store
# outage at fleet scale would otherwise log every node's every refresh).
STORE_ERROR_LOG_INTERVAL_S = 10.0
# Retry delays of the store watch after a failure.
WATCH_RETRY_MIN_S, WATCH_RETRY_MAX_S = 1.0, 30.0


class UnknownNode(LookupError):
    """No node of that name, here or in the store."""


class UnknownPolicy(LookupError):
    """No fleet policy of that name."""


class NodeAlreadyConnected(Exception):
    """A second stream for a node whose first stream is still live. Mapped to gRPC
    ALREADY_EXISTS: the real agent keeps its stream; an impostor (or a duplicate agent)
    does not take it over."""


class FleetFull(Exception):
    """A new node past the aggregator's max_nodes. Mapped to RESOURCE_EXHAUSTED."""


# Bytes queued to one agent's stream and not yet written to it: an agent that does not
# read (stuck, or hostile) would otherwise grow the aggregator by every assignment and
# snapshot request meant for it. Past this the stream ends (RESOURCE_EXHAUSTED) and the
# agent, registering again, resyncs. The registration's own burst is not held to it.
MAX_OUTBOX_BYTES = 64 * 1024 * 1024
# How often the store's nodes without a record here are checked for liveness (a listing
# of the store's live nodes), to forget those not live for forget_after.
FORGET_CHECK_S = 60.0
# Kept policies recorded per node (an agent holds at most its policy store's objects).
MAX_KEPT_PER_NODE = 1024
# How often a replica whose agents keep policies from another store checks for a release.
RELEASE_CHECK_S = 10.0
# Refused duplicate streams, and dropped summaries, are logged at most once per this
# many seconds.
DUPLICATE_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class NodeReport:
    """A node's last word on one fleet policy."""

    revision: int
    state: pb.NodePolicyState.ValueType
    message: str = ""


@dataclass
class AgentSession:
    """One agent's open stream on this replica."""

    node: str
    labels: dict[str, str]
    outbox: asyncio.Queue[pb.AggregatorMessage] = field(default_factory=asyncio.Queue)
    # Fleet policy name -> the revision sent down this stream.
    sent: dict[str, int] = field(default_factory=dict)
    snapshots: dict[int, asyncio.Future[pb.SnapshotReply]] = field(default_factory=dict)
    # Set when the session ends from this side (a newer stream for the same node).
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    # Bytes in `outbox`; set `overflowed` when they would pass MAX_OUTBOX_BYTES.
    queued_bytes: int = 0
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: pb.AggregatorMessage, *, bounded: bool = True) -> None:
        """Queue `message` for the stream; past MAX_OUTBOX_BYTES (when `bounded`) the
        session is marked overflowed instead, and nothing more is queued."""
        if self.overflowed.is_set():
            return
        size = message.ByteSize()
        if bounded and self.queued_bytes + size > MAX_OUTBOX_BYTES:
            self.overflowed.set()
            return
        self.queued_bytes += size
        self.outbox.put_nowait(message)

    async def next_message(self) -> pb.AggregatorMessage:
        """The next queued message, taken off the byte count."""
        message = await self.outbox.get()
        self.queued_bytes -= message.ByteSize()
        return message


@dataclass(frozen=True)
class NodeView:
    """A node as the orchestrator calls show it: this replica's record, or what the
    store says of a node connected to another replica."""

    name: str
    labels: Mapping[str, str]
    status: pb.NodeStatus.ValueType
    record: NodeRecord | None = None
    # Fleet policies the node kept from another store.
    kept: tuple[str, ...] = ()

    def to_proto(self, *, with_summary: bool = True) -> pb.Node:
        node = pb.Node(
            name=self.name, labels=dict(self.labels), status=self.status, kept_policies=self.kept
        )
        record = self.record
        if record is not None:
            node.last_seen.CopyFrom(_timestamp(record.last_seen_s))
            node.agent_version = record.agent_version
            node.capabilities.extend(record.capabilities)
            if with_summary and record.summary is not None:
                node.summary.CopyFrom(record.summary)
        return node


class Fleet:
    """One replica's view of the fleet and its part in enforcing desired state."""

    def __init__(
        self,
        store: Store,
        liveness: Liveness,
        *,
        metrics: FleetMetrics | None = None,
        clock: Clock = time.time,
        max_nodes: int = DEFAULT_MAX_NODES,
        identity: StoreIdentity | None = None,
    ) -> None:
        self.store = store
        self.max_nodes = max_nodes
        # The store's identity, sent to every agent (`fabric-aggregator run` reads it
        # before serving; without it, start() reads it, making one for a new store).
        self.identity = identity
        # Node -> fleet policies it kept from another store (its KEPT reports).
        self.kept: dict[str, set[str]] = {}
        self.liveness = liveness
        self.metrics = metrics or FleetMetrics()
        self._clock = clock
        self.events = EventHub(self._labels_of)
        self.registry = NodeRegistry(liveness, clock=clock, on_event=self._on_event)
        self.sessions: dict[str, AgentSession] = {}
        self.assignments: dict[str, Assignment] = {}
        # Node labels as the store has them: every node of the fleet, whichever replica
        # it is connected to.
        self.store_labels: dict[str, dict[str, str]] = {}
        # Policy name -> node -> report, for the revision each node was last sent.
        self.reports: dict[str, dict[str, NodeReport]] = {}
        # Policy name -> nodes that reported its removal, while a DeletePolicy of it
        # waits: only those names, so removals an agent makes up cost nothing here.
        self.removed: dict[str, set[str]] = {}
        self._objects: dict[str, tuple[int, qos_service_pb2.PolicyObject]] = {}
        self._reported = asyncio.Event()
        self._request_ids = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._error_logged: dict[str, float] = {}
        self._duplicate_logged = -math.inf
        self._dropped_logged = -math.inf
        # Nodes forgotten here whose labels the store still has to forget.
        self._forgetting: set[str] = set()
        # The store's nodes without a record here: since when each is not live.
        self._unlive_since: dict[str, float] = {}
        self._unlive_checked_s = -math.inf
        # Whether the store watch is following desired state now (health reports it).
        self.store_ok = False
        # Liveness leases in the store outlive a silent node until it is gone.
        self._lease_ttl_s = max(1, math.ceil(liveness.gone_after_s))

    # --- lifecycle ---

    async def start(self) -> None:
        """Load desired state and follow the store; raises StoreError when the store
        cannot be read at all (a replica without desired state must not serve)."""
        if self.identity is None:
            self.identity = await self.store.identity(create=True)
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._follow_store(loaded), name="store-watch"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="liveness-sweep"))
        self._tasks.append(asyncio.create_task(self._follow_release(), name="kept-release"))
        try:
            await loaded
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.events.close()

    async def _follow_store(self, loaded: asyncio.Future[None]) -> None:
        retry_s = WATCH_RETRY_MIN_S
        while True:
            try:
                # Watch first, then list: changes made in between are in the watch.
                async with self.store.watch() as changes:
                    assignments = await self.store.list_assignments()
                    labels = await self.store.list_nodes()
                    self._replace_desired(assignments, labels)
                    self.store_ok = True
                    if not loaded.done():
                        loaded.set_result(None)
                    retry_s = WATCH_RETRY_MIN_S
                    async for change in changes:
                        self._on_change(change)
                return
            except StoreError as exc:
                self.store_ok = False
                self.metrics.store_errors.labels("watch").inc()
                if not loaded.done():
                    loaded.set_exception(exc)
                    return
                log.error("store watch failed, retrying in %.0fs: %s", retry_s, exc)
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, WATCH_RETRY_MAX_S)

    async def _follow_release(self, period_s: float = RELEASE_CHECK_S) -> None:
        """While agents here keep policies from another store, look for a release made
        through another replica (or before a restart) and pass it on to them."""
        while True:
            await asyncio.sleep(period_s)
            if not self.kept or self.identity is None or self.identity.kept_released:
                continue
            with contextlib.suppress(StoreError):
                identity = await self._store("read the store identity", self.store.identity())
                if identity.kept_released:
                    self.identity = identity
                    self._resend_to_keepers()

    async def _sweep_loop(self) -> None:
        period_s = min(0.5, self.liveness.summary_interval_s / 2)
        while True:
            await asyncio.sleep(period_s)
            self.sweep()
            await self.forget_silent()

    async def forget_silent(self) -> list[str]:
        """Forget the nodes gone for longer than liveness.forget_after_s, here and in
        the store (unless another replica holds the node's stream now); their names.
        The store's nodes this replica has no record of (another replica's, or from
        before a restart) are forgotten once not live for that long as this replica has
        seen them, checked every FORGET_CHECK_S. A store that fails is tried again at
        the next sweep."""
        forgotten = self.registry.forget_silent(keep=self.sessions)
        self._forgetting.update(forgotten)
        now = self._clock()
        scan = bool(self.store_labels) and now - self._unlive_checked_s >= FORGET_CHECK_S
        if self._forgetting or scan:
            try:
                live = await self._store("list live nodes", self.store.live_nodes())
                if scan:
                    self._unlive_checked_s = now
                    forgotten += self._unlive_too_long(live, now)
                for node in sorted(self._forgetting):
                    if node not in live and self.registry.get(node) is None:
                        await self._store("forget node", self.store.forget_node(node))
                        self.store_labels.pop(node, None)
                    self._forgetting.discard(node)
            except StoreError:
                pass  # counted and logged by _store; tried again at the next sweep
        for node in forgotten:
            self.kept.pop(node, None)
            for reports in self.reports.values():
                reports.pop(node, None)
        if forgotten:
            log.info(
                "forgot %d node(s) silent for more than %.0fs: %s",
                len(forgotten),
                self.liveness.forget_after_s,
                ", ".join(forgotten[:10]) + (" ..." if len(forgotten) > 10 else ""),
            )
        return forgotten

    def _unlive_too_long(self, live: set[str], now: float) -> list[str]:
        """The store's nodes without a record here, not live since forget_after_s ago;
        queued to be forgotten."""
        unlive = (n for n in self.store_labels if n not in live and self.registry.get(n) is None)
        self._unlive_since = {n: self._unlive_since.get(n, now) for n in unlive}
        expired = [
            n
            for n, since in self._unlive_since.items()
            if now - since > self.liveness.forget_after_s
        ]
        for node in expired:
            del self._unlive_since[node]
        self._forgetting.update(expired)
        return expired

    def sweep(self) -> None:
        self.registry.sweep()
        for status, count in self.registry.status_counts().items():
            self.metrics.nodes.labels(STATUS_LABELS[status]).set(count)
        self.metrics.streams.set(len(self.sessions))
        self.metrics.assignments.set(len(self.assignments))
        self.metrics.kept_policies.set(sum(len(names) for names in self.kept.values()))
        self.metrics.event_watchers.set(len(self.events))

    # --- desired state from the store ---

    def _replace_desired(
        self, assignments: Iterable[Assignment], labels: Mapping[str, dict[str, str]]
    ) -> None:
        """Converge on a full listing (at start and after a watch failure)."""
        self.store_labels = {node: dict(value) for node, value in labels.items()}
        fresh = {a.name: a for a in assignments}
        for name in list(self.assignments):
            if name not in fresh:
                self._assignment_removed(name)
        for assignment in fresh.values():
            self._assignment_changed(assignment)

    def _on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.NODE_LABELS:
            if change.labels is None:
                self.store_labels.pop(change.key, None)
            else:
                self.store_labels[change.key] = dict(change.labels)
        elif change.assignment is not None:
            self._assignment_changed(change.assignment)
        elif change.key in self.assignments:
            self._assignment_removed(change.key)

    def _assignment_changed(self, assignment: Assignment) -> None:
        known = self.assignments.get(assignment.name)
        if known is not None and known.revision >= assignment.revision:
            return  # this replica's own write, already fanned out
        self.assignments[assignment.name] = assignment
        self.removed.pop(assignment.name, None)
        for session in self.sessions.values():
            self._sync(session, assignment.name)

    def _assignment_removed(self, name: str) -> None:
        if self.assignments.pop(name, None) is None:
            return
        self._objects.pop(name, None)
        self.reports.pop(name, None)
        for session in self.sessions.values():
            self._sync(session, name)

    def _sync(self, session: AgentSession, name: str) -> None:
        """Send `session` the assignment or removal that makes it hold what it should."""
        assignment = self.assignments.get(name)
        wanted = assignment is not None and assignment.matches(session.labels)
        if assignment is not None and wanted:
            if session.sent.get(name) != assignment.revision:
                self._send_assignment(session, assignment)
        elif name in session.sent:
            del session.sent[name]
            self.reports.get(name, {}).pop(session.node, None)
            session.send(pb.AggregatorMessage(removal=pb.PolicyRemoval(name=name)))

    def _send_assignment(
        self, session: AgentSession, assignment: Assignment, *, bounded: bool = True
    ) -> None:
        message = pb.PolicyAssignment(
            name=assignment.name, object=self._object_of(assignment), revision=assignment.revision
        )
        session.sent[assignment.name] = assignment.revision
        reports = self.reports.setdefault(assignment.name, {})
        reports[session.node] = NodeReport(assignment.revision, PENDING, "sent, no report yet")
        session.send(pb.AggregatorMessage(assignment=message), bounded=bounded)

    def _object_of(self, assignment: Assignment) -> qos_service_pb2.PolicyObject:
        """The message form of a stored policy, converted once per revision."""
        cached = self._objects.get(assignment.name)
        if cached is None or cached[0] != assignment.revision:
            obj = objects.encode_document(assignment.policy)
            cached = (assignment.revision, obj)
            self._objects[assignment.name] = cached
        return cached[1]

    # --- agent streams ---

    async def attach(self, register: pb.Register) -> AgentSession:
        """A registered agent's stream. A second stream for the node is refused
        (NodeAlreadyConnected) while the first is live, and replaces it once the first
        is stale (no summary for the node's stale threshold): an agent that lost its
        connection without the aggregator noticing gets back in within a few summary
        intervals, and nobody takes over a node that is reporting. The registration,
        then every fleet policy for the node, are queued to it."""
        node = register.node_name
        check_node_name(node)
        labels = dict(register.labels)
        known = self.registry.get(node) is not None or node in self.store_labels
        if not known and max(len(self.registry), len(self.store_labels)) >= self.max_nodes:
            raise FleetFull(
                f"node {node}: this aggregator keeps at most {self.max_nodes} nodes "
                "(max_nodes), connected or not"
            )
        previous = self.sessions.get(node)
        if previous is not None:
            self._refuse_if_live(node)
            log.info("node %s connected again: closing its previous, silent stream", node)
            self.detach(previous)
            previous.replaced.set()
        session = AgentSession(node, labels)
        self._send_registration(session)
        self.kept.pop(node, None)  # the agent reports what it keeps after registering
        self.sessions[node] = session
        self.registry.register(register)
        self.metrics.registrations.inc()
        self.metrics.streams.set(len(self.sessions))
        # Labels are desired state (other replicas select on them); liveness too.
        if self.store_labels.get(node) != labels:
            self.store_labels[node] = labels
            await self._best_effort("set node labels", self.store.set_node_labels(node, labels))
        await self._best_effort("node alive", self.store.node_alive(node, self._lease_ttl_s))
        return session

    def _send_registration(self, session: AgentSession) -> None:
        """`registered`, then every fleet policy for the node: what the agent resyncs on.
        No await here: a store change cannot slip in between the count in `registered`
        and the assignments that follow it."""
        identity = self.identity or StoreIdentity("")
        matching = [a for a in self.assignments.values() if a.matches(session.labels)]
        registered = pb.Registered(
            assignments=len(matching),
            store_id=identity.store_id,
            kept_released=identity.kept_released,
        )
        session.send(pb.AggregatorMessage(registered=registered), bounded=False)
        for assignment in sorted(matching, key=lambda a: a.name):
            self._send_assignment(session, assignment, bounded=False)

    def _resend_to_keepers(self) -> list[str]:
        """Send the registration again to the connected nodes that keep policies from
        another store: with kept_released, they drop what this store does not assign."""
        told = []
        for node in sorted(self.kept):
            session = self.sessions.get(node)
            if session is not None:
                self._send_registration(session)
                # Released, the agent drops them (a resync reports nothing back).
                del self.kept[node]
                told.append(node)
        return told

    async def release_kept(self) -> list[pb.NodePolicyStatus]:
        """An operator's word that kept policies may go: recorded in the store (agents
        that register later drop theirs), then told to the connected nodes keeping any."""
        self.identity = await self._store("release kept policies", self.store.release_kept())
        holders = {node: sorted(names) for node, names in self.kept.items()}
        told = set(self._resend_to_keepers())
        statuses = []
        for node, names in sorted(holders.items()):
            if node in told:
                state, message = PENDING, f"told to drop {', '.join(names)}"
            else:
                state, message = UNREACHABLE, "not connected here: drops them when it registers"
            statuses.append(pb.NodePolicyStatus(node=node, state=state, message=message))
        return statuses

    def _refuse_if_live(self, node: str) -> None:
        record = self.registry.get(node)
        if record is None:
            return
        silent_s = self._clock() - record.last_seen_s
        stale_after_s, _ = self.liveness.thresholds(record.interval_s)
        if silent_s > stale_after_s:
            return
        self.metrics.refused.labels("duplicate").inc()
        now = time.monotonic()
        if now - self._duplicate_logged >= DUPLICATE_LOG_INTERVAL_S:
            self._duplicate_logged = now
            log.warning(
                "refused a second stream for node %s: its stream is live (last summary "
                "%.1fs ago); further refusals logged every %.0fs, counted in "
                'fabric_aggregator_agents_refused{reason="duplicate"}',
                node,
                silent_s,
                DUPLICATE_LOG_INTERVAL_S,
            )
        raise NodeAlreadyConnected(
            f"node {node} already has a live stream on this aggregator (last summary "
            f"{silent_s:.1f}s ago): a second stream is refused until the first has been "
            f"silent for {stale_after_s:g}s"
        )

    def detach(self, session: AgentSession) -> None:
        """The stream ended. The node's record stays: liveness turns it stale, then gone,
        unless it connects again."""
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            self.metrics.streams.set(len(self.sessions))
        for future in session.snapshots.values():
            if not future.done():
                future.set_result(pb.SnapshotReply(error="the agent's stream closed"))
        session.snapshots.clear()

    async def receive(self, session: AgentSession, message: pb.AgentMessage) -> None:
        which = message.WhichOneof("kind")
        if which == "summary":
            # A dropped summary does not keep the node live: it turns stale here and in
            # the store alike.
            if self.summary(session, message.summary):
                alive = self.store.node_alive(session.node, self._lease_ttl_s)
                await self._best_effort("node alive", alive)
        elif which == "policy_report":
            self.report(session, message.policy_report)
        elif which == "snapshot":
            future = session.snapshots.pop(message.snapshot.request_id, None)
            if future is not None and not future.done():
                future.set_result(message.snapshot)
        elif which == "register":
            raise ValueError("register: only the stream's first message may register")

    def summary(self, session: AgentSession, summary: pb.NodeSummary) -> bool:
        """A summary into the fleet view; one over a bound, or with a value that cannot
        be true, is dropped and counted (agent/aggregator/limits.py): False."""
        try:
            check_summary(summary)
        except LimitError as exc:
            self.metrics.summaries_dropped.labels(exc.kind).inc()
            now = time.monotonic()
            if now - self._dropped_logged >= DUPLICATE_LOG_INTERVAL_S:
                self._dropped_logged = now
                log.warning(
                    "dropped a summary of node %s: %s (further drops logged every %.0fs, "
                    "counted in fabric_aggregator_summaries_dropped)",
                    session.node,
                    exc,
                    DUPLICATE_LOG_INTERVAL_S,
                )
            return False
        self.registry.summary(session.node, summary)
        self.metrics.summaries.inc()
        if summary.HasField("sampled_at"):
            delay_s = self._clock() - summary.sampled_at.ToNanoseconds() / 1e9
            self.metrics.summary_delay.observe(max(0.0, delay_s))
        return True

    def report(self, session: AgentSession, report: pb.PolicyReport) -> None:
        """An agent's report on a fleet policy; one naming no possible policy is dropped
        and counted, a long message is cut (agent/aggregator/limits.py)."""
        try:
            check_report(report)
        except LimitError:
            self.metrics.policy_reports.labels("invalid").inc()
            return
        name, node = report.name, session.node
        if report.outcome == pb.POLICY_OUTCOME_KEPT:
            self.metrics.policy_reports.labels("kept").inc()
            kept = self.kept.setdefault(node, set())
            if name not in kept and len(kept) < MAX_KEPT_PER_NODE:
                kept.add(name)
                self._emit_policy(node, name, f"kept from another store: {report.message}")
            return
        if node in self.kept:
            self.kept[node].discard(name)
            if not self.kept[node]:
                del self.kept[node]
        if report.outcome == pb.POLICY_OUTCOME_REMOVED:
            self.metrics.policy_reports.labels("removed").inc()
            waiting = self.removed.get(name)
            if waiting is not None:
                waiting.add(node)
            self._emit_policy(node, name, "removed")
            self._notify_reports()
            return
        if report.outcome not in (pb.POLICY_OUTCOME_APPLIED, pb.POLICY_OUTCOME_FAILED):
            return
        applied = report.outcome == pb.POLICY_OUTCOME_APPLIED
        self.metrics.policy_reports.labels("applied" if applied else "failed").inc()
        if session.sent.get(name) != report.revision:
            return  # about a revision since replaced or removed
        state = APPLIED if applied else FAILED
        previous = self.reports.setdefault(name, {}).get(node)
        self.reports[name][node] = NodeReport(report.revision, state, report.message)
        if previous is None or previous.state != state or previous.message != report.message:
            what = "applied" if applied else f"failed: {report.message}"
            self._emit_policy(node, name, f"revision {report.revision} {what}")
        self._notify_reports()

    async def snapshot(self, node: str, timeout_s: float = SNAPSHOT_TIMEOUT_S) -> pb.SnapshotReply:
        """The node's agent's current snapshot through its stream; the reply's error says
        why there is none."""
        session = self.sessions.get(node)
        if session is None:
            where = "connected to another replica" if node in self.store_labels else "offline"
            record = self.registry.get(node)
            if record is not None:
                where = STATUS_LABELS[record.status] + ", no open stream on this replica"
            return pb.SnapshotReply(error=f"node {node} is {where}")
        self._request_ids += 1
        request_id = self._request_ids
        future: asyncio.Future[pb.SnapshotReply] = asyncio.get_running_loop().create_future()
        session.snapshots[request_id] = future
        request = pb.SnapshotRequest(request_id=request_id)
        session.send(pb.AggregatorMessage(snapshot_request=request))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return pb.SnapshotReply(error=f"node {node} did not answer within {timeout_s:g}s")
        finally:
            session.snapshots.pop(request_id, None)

    # --- orchestrator calls ---

    async def apply(
        self, assignment: Assignment, *, validate_only: bool, wait_s: float
    ) -> tuple[int, list[pb.NodePolicyStatus]]:
        """Store a fleet policy, send it to this replica's matching agents, wait up to
        `wait_s` for their reports; the revision and every matching node's status."""
        if validate_only:
            nodes = await self._matching(assignment.selector)
            statuses = [
                pb.NodePolicyStatus(node=n.name, state=PENDING, message="validate only: not sent")
                for n in nodes
            ]
            return 0, statuses
        started = time.monotonic()
        stored = await self._store("put assignment", self.store.put_assignment(assignment))
        self._assignment_changed(stored)
        waiting = self._awaiting(stored.name, stored.revision)
        if await self._wait(lambda: not waiting(), wait_s) and self.reports.get(stored.name):
            self.metrics.fanout.observe(time.monotonic() - started)
        return stored.revision, await self._statuses(stored)

    async def delete(self, name: str, *, wait_s: float) -> list[pb.NodePolicyStatus]:
        """Delete a fleet policy and wait up to `wait_s` for its holders to report the
        removal. UnknownPolicy when there is none."""
        assignment = self.assignments.get(name)
        # Before the delete: the store's watch may deliver it, and agents report the
        # removal, while the delete is awaited.
        sent_to = {node for node, session in self.sessions.items() if name in session.sent}
        removed: set[str] = set()
        self.removed[name] = removed
        try:
            return await self._delete(name, assignment, sent_to, removed, wait_s)
        finally:
            if self.removed.get(name) is removed:
                del self.removed[name]

    async def _delete(
        self,
        name: str,
        assignment: Assignment | None,
        sent_to: set[str],
        removed: set[str],
        wait_s: float,
    ) -> list[pb.NodePolicyStatus]:
        if not await self._store("delete assignment", self.store.delete_assignment(name)):
            raise UnknownPolicy(f"no fleet policy named {name!r}")
        self._assignment_removed(name)

        def outstanding() -> set[str]:
            return {n for n in sent_to if n in self.sessions} - removed

        await self._wait(lambda: not outstanding(), wait_s)
        left = outstanding()
        statuses: list[pb.NodePolicyStatus] = []
        views: dict[str, NodeView] = {}
        if assignment is not None:
            views = {view.name: view for view in await self._matching(assignment.selector)}
        for node in sorted(sent_to | set(views)):
            view = views.get(node)
            elsewhere = (
                view is not None and view.record is None and view.status == pb.NODE_STATUS_CONNECTED
            )
            if node in left:
                status = pb.NodePolicyStatus(
                    node=node, state=PENDING, message="removal sent, no report yet"
                )
            elif node in removed:
                status = pb.NodePolicyStatus(node=node, state=APPLIED, message="removed")
            elif elsewhere:
                # As in ApplyPolicy: the replica holding its stream sends the removal.
                status = pb.NodePolicyStatus(
                    node=node,
                    state=PENDING,
                    message="connected to another replica, which removes it",
                )
            else:
                status = pb.NodePolicyStatus(
                    node=node,
                    state=UNREACHABLE,
                    message="not connected here: removed when it registers",
                )
            statuses.append(status)
        return statuses

    async def page(
        self,
        selector: Mapping[str, str],
        statuses: Iterable[pb.NodeStatus.ValueType],
        after: str,
        limit: int,
    ) -> tuple[list[NodeView], bool]:
        """Up to `limit` matching nodes named after `after`, in name order, and whether
        more follow. Costs the page, not the fleet: a listing of 10,000 nodes in pages
        does not build 10,000 views per page."""
        wanted = set(statuses)
        remote = sorted(
            name
            for name, labels in self.store_labels.items()
            if name > after
            and self.registry.get(name) is None
            and selector_matches(selector, labels)
        )
        live = await self._store("list live nodes", self.store.live_nodes()) if remote else set()
        local = (self._local_view(r) for r in self.registry.after(after) if r.matches(selector))
        others = (NodeView(n, self.store_labels[n], _remote_status(n, live)) for n in remote)
        page: list[NodeView] = []
        for view in heapq.merge(local, others, key=lambda v: v.name):
            if wanted and view.status not in wanted:
                continue
            if len(page) == limit:
                return page, True
            page.append(view)
        return page, False

    async def node(self, name: str) -> NodeView:
        record = self.registry.get(name)
        if record is not None:
            return self._local_view(record)
        labels = self.store_labels.get(name)
        if labels is None:
            raise UnknownNode(f"no node named {name!r}")
        live = await self._store("list live nodes", self.store.live_nodes())
        return NodeView(name, labels, _remote_status(name, live))

    # --- helpers ---

    def _local_view(self, record: NodeRecord) -> NodeView:
        kept = tuple(sorted(self.kept.get(record.name, ())))
        return NodeView(record.name, record.labels, record.status, record, kept)

    async def _matching(self, selector: Mapping[str, str]) -> list[NodeView]:
        """Every node matching `selector`, by name: this replica's records and the
        store's other nodes with their status from the store's liveness leases."""
        views, _ = await self.page(selector, (), "", len(self.registry) + len(self.store_labels))
        return views

    async def _statuses(self, assignment: Assignment) -> list[pb.NodePolicyStatus]:
        statuses = []
        reports = self.reports.get(assignment.name, {})
        for view in await self._matching(assignment.selector):
            session = self.sessions.get(view.name)
            report = reports.get(view.name)
            if session is not None:
                state, message = PENDING, "sent, no report yet"
                if report is not None and report.revision == assignment.revision:
                    state, message = report.state, report.message
            elif view.record is not None:
                status = STATUS_LABELS[view.status]
                state, message = UNREACHABLE, f"{status}: gets the policy when it reconnects"
            elif view.status == pb.NODE_STATUS_CONNECTED:
                state, message = PENDING, "connected to another replica, which sends it"
            else:
                state, message = UNREACHABLE, "not connected: gets the policy when it registers"
            statuses.append(pb.NodePolicyStatus(node=view.name, state=state, message=message))
        return statuses

    def _awaiting(self, name: str, revision: int) -> Callable[[], bool]:
        """Whether any of this replica's connected nodes sent `revision` has not reported."""

        def waiting() -> bool:
            for node, report in self.reports.get(name, {}).items():
                if (
                    report.revision == revision
                    and report.state == PENDING
                    and node in self.sessions
                ):
                    return True
            return False

        return waiting

    async def _wait(self, done: Callable[[], bool], wait_s: float) -> bool:
        """Wait until `done()` or `wait_s` passes; whether it is done."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self._reported
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return done()
        return True

    def _notify_reports(self) -> None:
        self._reported.set()
        self._reported = asyncio.Event()

    def _labels_of(self, node: str) -> Mapping[str, str]:
        record = self.registry.get(node)
        if record is not None:
            return record.labels
        return self.store_labels.get(node, {})

    def _on_event(self, event: pb.Event) -> None:
        self.metrics.events.labels(event_label(event.kind)).inc()
        self.events.publish(event)

    def _emit_policy(self, node: str, name: str, message: str) -> None:
        event = pb.Event(
            kind=pb.EVENT_KIND_POLICY_STATUS,
            node=node,
            time=_timestamp(self._clock()),
            subject=name,
            message=message,
        )
        self._on_event(event)

    async def _store(self, operation: str, call: Awaitable[T]) -> T:
        """A store call, its failure counted and logged (throttled) before it is raised."""
        try:
            return await call
        except StoreError as exc:
            self.metrics.store_errors.labels(operation).inc()
            now = time.monotonic()
            if now - self._error_logged.get(operation, -math.inf) >= STORE_ERROR_LOG_INTERVAL_S:
                self._error_logged[operation] = now
                log.error(
                    "%s (further failures of this operation logged every %.0fs)",
                    exc,
                    STORE_ERROR_LOG_INTERVAL_S,
                )
            raise

    async def _best_effort(self, operation: str, call: Awaitable[object]) -> None:
        """A store write the agents' streams must not depend on (labels, liveness): a
        failure is counted and logged by `_store`, and the stream goes on; the next
        registration or refresh writes again."""
        with contextlib.suppress(StoreError):
            await self._store(operation, call)


def _remote_status(name: str, live: set[str]) -> pb.NodeStatus.ValueType:
    return pb.NODE_STATUS_CONNECTED if name in live else pb.NODE_STATUS_UNREACHABLE


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp
