"""``fabric.v1.TelemetryService``: the latest snapshot, a snapshot stream, the devices.

The runtime feeds a `SnapshotHub` with each snapshot (``hub.publish``); the hub keeps the
latest and fans it out to one bounded queue per stream. A consumer that reads too slowly
loses its oldest queued snapshots, counted and reported in the next response's
``missed``, so a stalled client costs at most ``queue_size`` snapshots of memory.

Every reader of one snapshot shares its encoding: the hub hands snapshots out as
`PublishedSnapshot`, which converts and serializes a section set the first time a
reader asks for it and keeps the bytes for the others. Snapshot responses are sent as
those bytes (a pass-through response serializer), so 200 streams and any number of
GetSnapshot calls cost one conversion per snapshot and section set, not one each. The
conversion runs on the first reader's thread, never on the sampling thread: publishing
stays a handful of operations per stream.

The servicer is thin: conversion lives in `agent.node.api.convert`, and this module maps
its errors and the hub's state to gRPC status codes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from agent.common.status import MAX_MESSAGE_CHARS, clip, rich_status
from agent.node.api import convert
from agent.node.snapshot import Snapshot
from agent.proto.fabric.v1 import telemetry_service_pb2

SERVICE_NAME = telemetry_service_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
# Snapshots queued per stream before the oldest is dropped: at the default 1 s sampling
# interval a consumer may stall for this many seconds without losing one.
DEFAULT_QUEUE_SIZE = 8
# WatchSnapshots streams served at once. Each holds one of the API server's worker
# threads while open (agent.node.api.server sizes its pool as this plus room for unary
# calls), so a client opening streams in a loop is refused with RESOURCE_EXHAUSTED
# instead of starving GetSnapshot and ListDevices. 256 covers an orchestrator's
# watchers plus one per pod on a dense node.
MAX_WATCH_STREAMS = 256
# Streams of the local unix socket, apart from those of TCP: a remote client holding every
# TCP slot never locks `fabricctl telemetry --watch` out on the node itself.
LOCAL_WATCH_STREAMS = 32
# How often a waiting stream checks that its client is still there. Cancellation,
# deadlines and disconnects wake it at once through a callback; this is the backstop.
# Longer than the sampling interval, so that idle streams do not all wake near a tick.
_POLL_S = 5.0


class IntervalError(ValueError):
    """A watch interval that is not a valid, non-negative duration."""


class StreamLimitError(RuntimeError):
    """Every one of the hub's watch slots is taken."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} snapshot streams are open, the most this agent serves")
        self.limit = limit


class StreamSlots:
    """The watch streams one listener may hold open at once; thread-safe."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit = limit
        self.where = where
        self._open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._open -= 1


class PublishedSnapshot:
    """A snapshot as the hub hands it out, with its serialized ``fabric.v1.Snapshot``
    messages by section set: made by the first reader that asks for a set, shared by the
    rest for as long as the hub or a stream's queue holds the snapshot."""

    __slots__ = ("_encoded", "_lock", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._encoded: dict[frozenset[str], bytes] = {}
        self._lock = threading.Lock()

    def encoded(self, sections: frozenset[str]) -> bytes:
        """The snapshot with these sections (names, as `convert.validate_sections`
        returns them), serialized."""
        data = self._encoded.get(sections)
        if data is None:
            # Streams wake together on a new snapshot: one converts, the others wait for
            # its bytes rather than converting the same snapshot side by side.
            with self._lock:
                data = self._encoded.get(sections)
                if data is None:
                    message = convert.snapshot_message(self.snapshot, sections)
                    data = self._encoded[sections] = message.SerializeToString()
        return data

    def encodings(self) -> int:
        """How many section sets have been converted (for tests and benchmarks)."""
        return len(self._encoded)


class Subscription:
    """One stream's queue: snapshots due to it, oldest dropped (and counted) when full.
    Closing it (or leaving its ``with`` block) removes it from the hub."""

    def __init__(self, hub: SnapshotHub, interval_s: float, queue_size: int) -> None:
        self._hub = hub
        self.interval_s = interval_s
        # Snapshots arrive one sampling interval apart, give or take jitter: take one
        # when at least half an interval short of `interval_s` has passed since the last.
        self._min_gap_s = interval_s - hub.interval_s / 2
        self._queue: deque[PublishedSnapshot] = deque(maxlen=queue_size)
        self._missed = 0
        self._last_taken_s: float | None = None
        self._closed = False
        self._changed = threading.Condition()

    def offer(self, published: PublishedSnapshot, now_s: float) -> None:
        with self._changed:
            if self._closed:
                return
            if self._last_taken_s is not None and now_s - self._last_taken_s < self._min_gap_s:
                return
            self._last_taken_s = now_s
            if len(self._queue) == self._queue.maxlen:
                self._missed += 1  # the append drops the oldest
            self._queue.append(published)
            self._changed.notify()  # one reader per subscription: its stream

    def count_missed(self, count: int) -> None:
        """Snapshots that never reached this subscription, told with the next one."""
        if count:
            with self._changed:
                self._missed += count

    def get(self, timeout_s: float) -> tuple[PublishedSnapshot, int] | None:
        """The oldest queued snapshot and how many were dropped before it; None when
        none came within timeout_s or the subscription is closed and drained."""
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._closed, timeout_s)
            if not self._queue:
                return None
            missed, self._missed = self._missed, 0
            return self._queue.popleft(), missed

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._changed:
            return len(self._queue)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SnapshotSource(Protocol):
    """What the servicer needs from the agent: the sampling interval, the latest
    snapshot, and subscriptions to the ones that follow."""

    @property
    def interval_s(self) -> float: ...

    def latest(self) -> Snapshot | None: ...

    def latest_published(self) -> PublishedSnapshot | None: ...

    def subscribe(self, interval_s: float) -> SubscriptionHandle: ...


class SubscriptionHandle(Protocol):
    def get(self, timeout_s: float) -> tuple[PublishedSnapshot, int] | None: ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> SubscriptionHandle: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SnapshotHub:
    """The latest snapshot and the streams that follow it; thread-safe."""

    def __init__(
        self,
        interval_s: float,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_subscriptions: int = MAX_WATCH_STREAMS + LOCAL_WATCH_STREAMS,
    ) -> None:
        if interval_s <= 0 or queue_size < 1 or max_subscriptions < 1:
            raise ValueError(
                f"interval_s {interval_s}, queue_size {queue_size} and max_subscriptions "
                f"{max_subscriptions} must be > 0"
            )
        self._interval_s = interval_s
        self._queue_size = queue_size
        self._max_subscriptions = max_subscriptions
        self._latest: PublishedSnapshot | None = None
        self._subscriptions: set[Subscription] = set()
        self._lock = threading.Lock()
        # Snapshots published and not yet offered to the streams, with when: the
        # fan-out thread's work. Bounded like a stream's queue; what it drops (only if
        # that thread were starved for queue_size intervals) is counted as missed.
        self._pending: deque[tuple[PublishedSnapshot, float]] = deque(maxlen=queue_size)
        self._pending_dropped = 0
        self._fan_out_wake = threading.Event()
        self._fan_out_thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def latest(self) -> Snapshot | None:
        published = self._latest
        return None if published is None else published.snapshot

    def latest_published(self) -> PublishedSnapshot | None:
        return self._latest

    def publish(self, snapshot: Snapshot) -> None:
        """Make snapshot the latest and queue it for the streams. Called on the sampling
        thread, so it wakes one thread, the hub's fan-out, and returns: waking every
        stream from here would have them contend for the GIL with the sampler on its
        way to sleep, and the sampler's next tick would start that much late."""
        published = PublishedSnapshot(snapshot)
        now_s = time.monotonic()
        with self._lock:
            self._latest = published
            if not self._subscriptions:
                return
            if len(self._pending) == self._pending.maxlen:
                self._pending_dropped += 1  # the append drops the oldest
            self._pending.append((published, now_s))
        self._fan_out_wake.set()

    def subscribe(self, interval_s: float) -> Subscription:
        """A subscription to every snapshot at least interval_s after the previous one
        (never more often than sampling); the latest, when there is one, comes first.
        Raises StreamLimitError when max_subscriptions are open."""
        subscription = Subscription(self, max(interval_s, self._interval_s), self._queue_size)
        with self._lock:
            if len(self._subscriptions) >= self._max_subscriptions:
                raise StreamLimitError(self._max_subscriptions)
            self._subscriptions.add(subscription)
            latest = self._latest
            if self._fan_out_thread is None:
                self._fan_out_thread = threading.Thread(
                    target=self._fan_out, name="snapshot-fan-out", daemon=True
                )
                self._fan_out_thread.start()
        if latest is not None:
            subscription.offer(latest, time.monotonic())
        return subscription

    def _fan_out(self) -> None:
        """Offer each published snapshot to every stream, until the hub is closed."""
        while True:
            self._fan_out_wake.wait()
            self._fan_out_wake.clear()
            with self._lock:
                if self._fan_out_thread is not threading.current_thread():
                    return
                pending = list(self._pending)
                self._pending.clear()
                dropped, self._pending_dropped = self._pending_dropped, 0
                subscriptions = list(self._subscriptions)
            for subscription in subscriptions:
                subscription.count_missed(dropped)
                for published, published_s in pending:
                    subscription.offer(published, published_s)

    def queue_lengths(self) -> list[int]:
        """The queued snapshots of each open subscription."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        return [len(s) for s in subscriptions]

    def close(self) -> None:
        """End every stream (after it drains) and the fan-out thread; for shutdown."""
        with self._lock:
            subscriptions = list(self._subscriptions)
            self._fan_out_thread = None
            self._pending.clear()
        self._fan_out_wake.set()
        for subscription in subscriptions:
            subscription.close()

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)


def watch_interval_s(interval: duration_pb2.Duration, sampling_interval_s: float) -> float:
    """The stream's interval: the requested one, never shorter than sampling."""
    seconds, nanos = interval.seconds, interval.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos or seconds < 0 < nanos):
        raise IntervalError(f"interval: invalid duration ({seconds} s, {nanos} ns)")
    if seconds < 0 or nanos < 0:
        raise IntervalError(f"interval: {interval.ToTimedelta()} is negative")
    return max(seconds + nanos / 1e9, sampling_interval_s)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _snapshot_field_tag(
    response_type: type[telemetry_service_pb2.GetSnapshotResponse]
    | type[telemetry_service_pb2.WatchSnapshotsResponse],
) -> bytes:
    number = response_type.DESCRIPTOR.fields_by_name["snapshot"].number
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


_GET_SNAPSHOT_TAG = _snapshot_field_tag(telemetry_service_pb2.GetSnapshotResponse)
_WATCH_SNAPSHOT_TAG = _snapshot_field_tag(telemetry_service_pb2.WatchSnapshotsResponse)


def get_snapshot_response(snapshot: bytes) -> bytes:
    """A serialized GetSnapshotResponse around a serialized fabric.v1.Snapshot."""
    return b"".join((_GET_SNAPSHOT_TAG, _varint(len(snapshot)), snapshot))


def watch_snapshots_response(snapshot: bytes, missed: int) -> bytes:
    """A serialized WatchSnapshotsResponse around a serialized fabric.v1.Snapshot."""
    # Serialized protobuf messages concatenate into their merge: the `missed` field is
    # appended as its own message, when it is not zero (proto3 leaves zero out).
    rest = (
        telemetry_service_pb2.WatchSnapshotsResponse(missed=missed).SerializeToString()
        if missed
        else b""
    )
    return b"".join((_WATCH_SNAPSHOT_TAG, _varint(len(snapshot)), snapshot, rest))


class TelemetryServicer:
    """The service's methods; snapshot responses are returned serialized (see
    `add_to_server`), so this is not the generated servicer class, whose signatures
    return messages."""

    def __init__(self, source: SnapshotSource, slots: StreamSlots | None = None) -> None:
        self._source = source
        self._slots = slots

    def GetSnapshot(
        self, request: telemetry_service_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> bytes:
        sections = _sections(request, context)
        published = self._source.latest_published()
        if published is None:
            _unavailable(context)
        return get_snapshot_response(published.encoded(sections))

    def WatchSnapshots(
        self, request: telemetry_service_pb2.WatchSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        sections = _sections(request, context)
        slots = self._slots
        if slots is not None and not slots.take():
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{slots.limit} snapshot streams are open on {slots.where}, the most it serves",
            )
        try:
            yield from self._watch(request, context, sections)
        finally:
            if slots is not None:
                slots.give_back()

    def _watch(
        self,
        request: telemetry_service_pb2.WatchSnapshotsRequest,
        context: grpc.ServicerContext,
        sections: frozenset[str],
    ) -> Iterator[bytes]:
        try:
            interval_s = watch_interval_s(request.interval, self._source.interval_s)
            subscription = self._source.subscribe(interval_s)
        except IntervalError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StreamLimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        with subscription:
            # Cancellation, deadlines and disconnects end the RPC; wake the wait at once.
            context.add_callback(subscription.close)
            while context.is_active():
                item = subscription.get(_POLL_S)
                if item is None:
                    if subscription.closed:
                        return
                    continue
                published, missed = item
                yield watch_snapshots_response(published.encoded(sections), missed)

    def ListDevices(
        self, request: telemetry_service_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> telemetry_service_pb2.ListDevicesResponse:
        snapshot = self._source.latest()
        if snapshot is None:
            _unavailable(context)
        try:
            devices, next_token = convert.page(
                convert.devices(snapshot), request.page_size, request.page_token
            )
        except convert.PageTokenError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return telemetry_service_pb2.ListDevicesResponse(
            devices=devices, next_page_token=next_token
        )


def _sections(
    request: telemetry_service_pb2.GetSnapshotRequest | telemetry_service_pb2.WatchSnapshotsRequest,
    context: grpc.ServicerContext,
) -> frozenset[str]:
    try:
        return convert.validate_sections(request.sections, request.section_names)
    except convert.SectionError as exc:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=clip(exc.reason)
        )
        detail = error_details_pb2.BadRequest(field_violations=[violation])
        context.abort_with_status(
            rich_status(grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc), MAX_MESSAGE_CHARS), detail)
        )


def _unavailable(context: grpc.ServicerContext) -> NoReturn:
    context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot yet: the agent is starting")


def _pre_serialized(response: bytes) -> bytes:
    return response


def method_handlers(
    source: SnapshotSource, slots: StreamSlots | None = None
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's method handlers over source: those of the generated code, except
    that snapshot responses go out as the bytes the servicer returns."""
    servicer = TelemetryServicer(source, slots)
    pb = telemetry_service_pb2
    return {
        "GetSnapshot": grpc.unary_unary_rpc_method_handler(
            servicer.GetSnapshot,
            request_deserializer=pb.GetSnapshotRequest.FromString,
            response_serializer=_pre_serialized,
        ),
        "WatchSnapshots": grpc.unary_stream_rpc_method_handler(
            servicer.WatchSnapshots,
            request_deserializer=pb.WatchSnapshotsRequest.FromString,
            response_serializer=_pre_serialized,
        ),
        "ListDevices": grpc.unary_unary_rpc_method_handler(
            servicer.ListDevices,
            request_deserializer=pb.ListDevicesRequest.FromString,
            response_serializer=pb.ListDevicesResponse.SerializeToString,
        ),
    }


def add_to_server(
    server: grpc.Server, source: SnapshotSource, slots: StreamSlots | None = None
) -> None:
    """Register fabric.v1.TelemetryService over source (a SnapshotHub) on server; its
    watch streams take `slots` (the listener's own) besides the hub's."""
    handlers = method_handlers(source, slots)
    # As the generated add_*_to_server does: the generic handler for lookup by name, the
    # registered handlers for grpcio's faster path.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
