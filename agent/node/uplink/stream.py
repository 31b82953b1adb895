"""The agent's one stream to the fleet aggregator (`fabric-agent run --aggregator`).

The agent registers (node name, labels, capabilities, version), then sends a node
summary per sampling interval, answers snapshot requests, and applies the fleet
policies the aggregator assigns, reporting each outcome back. Fleet policies are API
objects of origin "fleet": enforced and persisted like any API object, so they survive
a restart and keep being enforced while the aggregator is away.

The agent remembers the aggregator store that gave it its fleet policies (the store id
in `Registered`, kept in the state directory). Registered by a store with another id (a
store lost and made again, which knows none of them), it keeps the fleet policies the
new store does not assign and reports each KEPT, instead of removing them, until the
aggregator says kept policies are released (`fabricctl fleet release-kept`): nothing an
operator put in place is stripped by a lost store.

While disconnected the agent keeps only the latest snapshot: the first summary after a
reconnect covers the whole gap (its deltas since the last one sent, its rates averaged
over it), so nothing queues up. Reconnects back off exponentially with jitter, 1 s to
1 min, so a restarted aggregator is not stormed by the whole fleet at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from agent import __version__
from agent.common.channel import CLIENT_KEEPALIVE_OPTIONS
from agent.common.errors import FabricError
from agent.common.files import FileTooLarge, NotRegularFile, read_regular, replace_atomically
from agent.common.policy.documents import model_from_request
from agent.common.policy.model import PolicyError
from agent.node.api.convert import validate_sections
from agent.node.api.telemetry import SnapshotSource, get_snapshot_response
from agent.node.collectors.gpu import GPU
from agent.node.qos.api_objects import ORIGIN_FLEET, NotFoundError, Precondition, RefusedError
from agent.node.snapshot import Snapshot
from agent.node.uplink.summary import SummaryBuilder
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from agent.proto.fabric.v1 import qos_service_pb2

if TYPE_CHECKING:
    from agent.node.qos.reconciler import Reconciler

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
# Fleet policies one node holds. Each enforcement pass covers every policy, so a pass
# costs in proportion and each apply makes one: at 1,000 fleet objects an apply took
# 0.5 s and rising (on the fake kernel), at 256 a few tens of ms. A real node holds a
# handful (one per job); past this, a new one is refused (FAILED, type LIMIT).
MAX_FLEET_POLICIES = 256
# Assignments and removals received but not yet applied: past this the stream is not
# read until the worker catches up, and gRPC's flow control holds the aggregator back,
# so an aggregator that sends faster than the node applies cannot grow its memory.
MAX_PENDING_FLEET_WORK = 64
# Snapshot replies waiting to be sent: a request past this is not answered (the
# aggregator reports the node as not answering in time), so an aggregator that asks
# without reading cannot make this node build and keep snapshot after snapshot.
MAX_PENDING_SNAPSHOTS = 4
# Control messages (reports, snapshot replies) waiting to be sent: past this the
# aggregator is not reading, and the stream is ended (the next one resyncs).
MAX_PENDING_CONTROL = 1024
# Summaries are small; a snapshot reply for a large node is tens of KiB.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *CLIENT_KEEPALIVE_OPTIONS,
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)


class FleetPolicies(Protocol):
    """Where fleet policies are enforced (the agent's reconciler)."""

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        """Enforce the object; raises PolicyError or FabricError (why it cannot)."""
        ...

    def delete_fleet(self, name: str) -> bool:
        """Remove it; False when the node did not hold it."""
        ...

    def fleet_names(self) -> set[str]: ...


class ReconcilerPolicies:
    """FleetPolicies on the agent's Reconciler: API objects of origin "fleet"."""

    def __init__(self, reconciler: Reconciler) -> None:
        self._reconciler = reconciler

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        model = model_from_request(obj)
        name = model.metadata.name
        # Fleet objects are applied by the one uplink worker: the count cannot change
        # between this check and the apply.
        held = self._reconciler.fleet_names()
        if name not in held and len(held) >= MAX_FLEET_POLICIES:
            reason = (
                f"this node holds {len(held)} fleet policies, at most {MAX_FLEET_POLICIES}: "
                "a new one is refused until one is deleted"
            )
            raise RefusedError([Precondition("LIMIT", name, reason)])
        self._reconciler.apply_object(model, origin=ORIGIN_FLEET)

    def delete_fleet(self, name: str) -> bool:
        try:
            self._reconciler.delete_object(name, origin=ORIGIN_FLEET)
        except NotFoundError:
            return False
        return True

    def fleet_names(self) -> set[str]:
        return self._reconciler.fleet_names()


@dataclass(frozen=True)
class UplinkTls:
    """The aggregator's CA; this node's certificate and key for mTLS (both or neither)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


# A store id as the aggregator makes it: 32 hex digits.
_STORE_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_STORE_ID_BYTES = 64


class StoreIdFile:
    """The id of the aggregator store that gave this agent its fleet policies, in one
    small file. An unreadable or corrupt file is set aside (`.corrupt`) and treated as
    none, never a failure loop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        try:
            raw = read_regular(self.path, _MAX_STORE_ID_BYTES, follow_symlinks=False)
            text = raw.decode("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, NotRegularFile, FileTooLarge) as exc:
            self._set_aside(f"unreadable: {exc}")
            return None
        if not _STORE_ID.match(text):
            self._set_aside(f"not a store id: {text[:40]!r}")
            return None
        return text

    def write(self, store_id: str) -> None:
        """Atomically: a crash leaves the old id or the new one."""
        replace_atomically(self.path, (store_id + "\n").encode("ascii"))

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".corrupt")
        log.error("%s: %s; set aside as %s", self.path, why, aside)
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)


@dataclass(frozen=True)
class UplinkSettings:
    target: str
    node_name: str
    labels: Mapping[str, str]
    capabilities: Sequence[str]
    summary_interval_s: float
    tls: UplinkTls | None = None
    # Where the id of the store that gave this node its fleet policies is kept (the
    # state directory); None: not remembered, every registration resyncs.
    store_id_path: Path | None = None
    backoff_min_s: float = BACKOFF_MIN_S
    backoff_max_s: float = BACKOFF_MAX_S


class Backoff:
    """Exponential delays between `low` and `high`, each drawn from its upper half:
    agents that lost the aggregator together spread out as they retry."""

    def __init__(self, low_s: float, high_s: float, rng: Callable[[], float] = random.random):
        self.low_s, self.high_s = low_s, high_s
        self._rng = rng
        self._next_s = low_s

    def next(self) -> float:
        ceiling = self._next_s
        self._next_s = min(self._next_s * 2, self.high_s)
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self._next_s = self.low_s


class _Outbox:
    """One stream's outgoing messages, as the request iterator gRPC consumes: control
    messages (registration, reports, snapshot replies) first, then a summary of the
    latest snapshot whenever a new one has been offered."""

    def __init__(self, uplink: Uplink, register: pb.Register) -> None:
        self._uplink = uplink
        self._control: deque[pb.AgentMessage] = deque([pb.AgentMessage(register=register)])
        self.snapshots = 0  # snapshot replies in _control
        self.closed = False

    def put(self, message: pb.AgentMessage) -> None:
        """Queue a control message; past MAX_PENDING_CONTROL the outbox closes instead,
        which ends the stream."""
        with self._uplink.changed:
            if len(self._control) >= MAX_PENDING_CONTROL:
                if not self.closed:
                    log.warning(
                        "aggregator %s reads nothing of this stream (%d messages waiting): "
                        "ending it",
                        self._uplink.settings.target,
                        len(self._control),
                    )
                self.closed = True
            else:
                self._control.append(message)
                if message.WhichOneof("kind") == "snapshot":
                    self.snapshots += 1
            self._uplink.changed.notify_all()

    def close(self) -> None:
        with self._uplink.changed:
            self.closed = True
            self._uplink.changed.notify_all()

    def __iter__(self) -> Iterator[pb.AgentMessage]:
        return self

    def __next__(self) -> pb.AgentMessage:
        uplink = self._uplink
        with uplink.changed:
            while True:
                if self.closed:
                    raise StopIteration
                if self._control:
                    message = self._control.popleft()
                    if message.WhichOneof("kind") == "snapshot":
                        self.snapshots -= 1
                    return message
                if uplink.latest is not None:
                    snapshot, uplink.latest = uplink.latest, None
                    break
                uplink.changed.wait()
        summary = uplink.builder.next(snapshot)
        uplink.summaries_sent += 1
        return pb.AgentMessage(summary=summary)


class Uplink:
    """The connection loop (`run`, on its own thread) and its state."""

    def __init__(
        self,
        settings: UplinkSettings,
        policies: FleetPolicies,
        snapshots: SnapshotSource,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self._policies = policies
        self._snapshots = snapshots
        self.backoff = Backoff(settings.backoff_min_s, settings.backoff_max_s, rng)
        self.builder = SummaryBuilder()
        self.changed = threading.Condition()
        self.latest: Snapshot | None = None
        self.summaries_sent = 0
        self.registrations = 0
        self.connected = threading.Event()
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue(MAX_PENDING_FLEET_WORK)
        # Fleet policies this node refused, tried again when a removal frees what one
        # may have wanted (an interface another fleet policy held). The worker's alone.
        self._refused: dict[str, pb.PolicyAssignment] = {}
        self._call: grpc.Future[object] | None = None
        self._outbox: _Outbox | None = None
        path = settings.store_id_path
        self.store_ids = StoreIdFile(path) if path is not None else None

    def offer(self, snapshot: Snapshot) -> None:
        """A new snapshot (the sampling loop's tick): the next summary is made from it.
        Only the latest is kept."""
        with self.changed:
            self.latest = snapshot
            self.changed.notify_all()

    def run(self, stop: threading.Event) -> None:
        """Connect, stream, reconnect with backoff, until `stop` is set."""
        worker = threading.Thread(target=self._apply_loop, name="fleet-policies", daemon=True)
        worker.start()
        canceller = threading.Thread(
            target=self._cancel_on, args=(stop,), name="uplink-stop", daemon=True
        )
        canceller.start()
        try:
            while not stop.is_set():
                try:
                    self._stream(stop)
                    reason = "the aggregator ended the stream"
                except grpc.RpcError as exc:
                    reason = f"{exc.code().name}: {exc.details()}"
                if stop.is_set():
                    break
                delay_s = self.backoff.next()
                log.warning(
                    "aggregator %s: %s; reconnecting in %.1fs",
                    self.settings.target,
                    reason,
                    delay_s,
                )
                stop.wait(delay_s)
        finally:
            # Stopping: what was not applied yet is sent again at the next registration.
            with contextlib.suppress(queue.Empty):
                while True:
                    self._work.get_nowait()
            self._work.put(None)
            worker.join(timeout=10)

    def _cancel_on(self, stop: threading.Event) -> None:
        stop.wait()
        with self.changed:
            outbox, call = self._outbox, self._call
        if outbox is not None:
            outbox.close()
        if call is not None:
            call.cancel()

    def _register(self) -> pb.Register:
        published = self._snapshots.latest_published()
        gpus = 0
        if published is not None:
            gpus = len(published.snapshot.samples(GPU))
        register = pb.Register(
            node_name=self.settings.node_name,
            labels=dict(self.settings.labels),
            agent_version=__version__,
            capabilities=list(self.settings.capabilities),
            gpu_count=gpus,
        )
        register.summary_interval.FromNanoseconds(round(self.settings.summary_interval_s * 1e9))
        return register

    def _stream(self, stop: threading.Event) -> None:
        """One stream, until it ends or fails (grpc.RpcError)."""
        settings = self.settings
        if settings.tls is not None:
            channel = grpc.secure_channel(
                settings.target, settings.tls.credentials(), options=list(_CHANNEL_OPTIONS)
            )
        else:
            channel = grpc.insecure_channel(settings.target, options=list(_CHANNEL_OPTIONS))
        outbox = _Outbox(self, self._register())
        try:
            call = pb_grpc.AggregatorServiceStub(channel).Connect(outbox)
            with self.changed:
                self._outbox, self._call = outbox, call  # type: ignore[assignment]
            if stop.is_set():
                return
            expected: int | None = None
            names: set[str] = set()
            for message in call:
                if outbox.closed:
                    return  # stopping, or the aggregator reads nothing: a new stream
                which = message.WhichOneof("kind")
                if which == "registered":
                    registered = message.registered
                    expected, names = registered.assignments, set()
                    self._registered(expected)
                    resync = partial(
                        self._resync,
                        outbox=outbox,
                        store_id=registered.store_id,
                        released=registered.kept_released,
                    )
                    if expected == 0:
                        self._work.put(partial(resync, set()))
                elif which == "assignment":
                    assignment = message.assignment
                    self._work.put(partial(self._apply, outbox, assignment))
                    if expected is not None and len(names) < expected:
                        names.add(assignment.name)
                        if len(names) == expected:
                            self._work.put(partial(resync, set(names)))
                elif which == "removal":
                    name = message.removal.name
                    self._work.put(partial(self._remove, outbox, name))
                elif which == "snapshot_request" and outbox.snapshots < MAX_PENDING_SNAPSHOTS:
                    # Past the bound a request goes unanswered: the aggregator times out.
                    outbox.put(self._snapshot_reply(message.snapshot_request.request_id))
        finally:
            self.connected.clear()
            outbox.close()
            with self.changed:
                self._outbox = self._call = None
            channel.close()

    def _registered(self, assignments: int) -> None:
        self.registrations += 1
        self.connected.set()
        self.backoff.reset()
        log.info(
            "registered with aggregator %s as %s (%d fleet policies)",
            self.settings.target,
            self.settings.node_name,
            assignments,
        )

    def _snapshot_reply(self, request_id: int) -> pb.AgentMessage:
        reply = pb.SnapshotReply(request_id=request_id)
        published = self._snapshots.latest_published()
        if published is None:
            reply.error = "no snapshot taken yet"
        else:
            every = validate_sections(())
            reply.snapshot = get_snapshot_response(published.encoded(every))
        return pb.AgentMessage(snapshot=reply)

    # --- fleet policies, applied in order on one worker thread ---

    def _apply_loop(self) -> None:
        while (job := self._work.get()) is not None:
            try:
                job()
            except Exception:
                # The stream waits on this worker (its queue is bounded): one job's bug
                # must not stop every later one.
                log.exception("fleet policy work failed")

    def _apply(self, outbox: _Outbox, assignment: pb.PolicyAssignment) -> None:
        report = pb.PolicyReport(name=assignment.name, revision=assignment.revision)
        try:
            self._policies.apply_fleet(assignment.object)
        except (PolicyError, FabricError) as exc:
            report.outcome = pb.POLICY_OUTCOME_FAILED
            report.message = str(exc)
            log.warning("fleet policy %s refused: %s", assignment.name, exc)
            self._refused.pop(assignment.name, None)
            if len(self._refused) >= MAX_FLEET_POLICIES:
                self._refused.pop(next(iter(self._refused)))  # the oldest
            self._refused[assignment.name] = assignment
        else:
            self._refused.pop(assignment.name, None)
            report.outcome = pb.POLICY_OUTCOME_APPLIED
            log.info("fleet policy %s revision %d applied", assignment.name, assignment.revision)
        outbox.put(pb.AgentMessage(policy_report=report))

    def _remove(self, outbox: _Outbox, name: str) -> None:
        report = pb.PolicyReport(name=name, outcome=pb.POLICY_OUTCOME_REMOVED)
        try:
            held = self._policies.delete_fleet(name)
        except FabricError as exc:
            report.outcome = pb.POLICY_OUTCOME_FAILED
            report.message = str(exc)
            log.warning("fleet policy %s not removed: %s", name, exc)
        else:
            if held:
                log.info("fleet policy %s removed", name)
        self._refused.pop(name, None)
        outbox.put(pb.AgentMessage(policy_report=report))
        if held:
            # What it held is free: a policy refused for wanting it may now be applied
            # (a fleet policy replaced by one of another name on the same interface).
            for waiting in list(self._refused.values()):
                self._apply(outbox, waiting)

    def _resync(
        self, assigned: set[str], *, outbox: _Outbox, store_id: str = "", released: bool = False
    ) -> None:
        """After registration: drop fleet policies the aggregator no longer assigns (it
        deleted them, or the node's labels stopped matching, while this node was away).

        Unless they came from another store: a store that does not know them (lost, and
        made again) keeps them enforced and reported KEPT until it says they are
        released. The store's id is remembered once nothing is kept from another."""
        unassigned = sorted(self._policies.fleet_names() - assigned)
        remembered = self.store_ids.read() if self.store_ids is not None else None
        other_store = bool(store_id) and remembered is not None and remembered != store_id
        if other_store and unassigned and not released:
            for name in unassigned:
                log.warning(
                    "fleet policy %s came from aggregator store %s; store %s does not "
                    "assign it: kept until an operator releases kept policies",
                    name,
                    remembered,
                    store_id,
                )
                report = pb.PolicyReport(
                    name=name,
                    outcome=pb.POLICY_OUTCOME_KEPT,
                    message=f"from store {remembered}, not assigned by store {store_id}",
                )
                outbox.put(pb.AgentMessage(policy_report=report))
            return
        if store_id and self.store_ids is not None and remembered != store_id:
            try:
                self.store_ids.write(store_id)
            except OSError as exc:
                log.error("cannot remember aggregator store %s: %s", store_id, exc)
        for name in unassigned:
            try:
                self._policies.delete_fleet(name)
                log.info("fleet policy %s no longer assigned to this node: removed", name)
            except FabricError as exc:
                log.error("fleet policy %s no longer assigned, but not removed: %s", name, exc)
