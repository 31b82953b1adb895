"""``fabric.v1.TelemetryService``: the latest snapshot, a snapshot stream, the devices.

The runtime feeds a `SnapshotHub` with each snapshot (``hub.publish``); the hub keeps the
latest and fans it out to one bounded queue per stream. A consumer that reads too slowly
loses its oldest queued snapshots, counted and reported in the next response's
``missed``, so a stalled client costs at most ``queue_size`` snapshots of memory.

The servicer is thin: conversion lives in `agent.api.convert`, and this module maps
its errors and the hub's state to gRPC status codes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Protocol

import grpc
from google.protobuf import duration_pb2

from agent.api import convert
from agent.proto.fabric.v1 import telemetry_service_pb2, telemetry_service_pb2_grpc
from agent.snapshot import Snapshot

# Snapshots queued per stream before the oldest is dropped: at the default 1 s sampling
# interval a consumer may stall for this many seconds without losing one.
DEFAULT_QUEUE_SIZE = 8
# How often a waiting stream checks that its client is still there (cancellation and
# deadlines also wake it through a callback; this is the backstop).
_POLL_S = 1.0


class IntervalError(ValueError):
    """A watch interval that is not a valid, non-negative duration."""


class Subscription:
    """One stream's queue: snapshots due to it, oldest dropped (and counted) when full.
    Closing it (or leaving its ``with`` block) removes it from the hub."""

    def __init__(self, hub: SnapshotHub, interval_s: float, queue_size: int) -> None:
        self._hub = hub
        self.interval_s = interval_s
        # Snapshots arrive one sampling interval apart, give or take jitter: take one
        # when at least half an interval short of `interval_s` has passed since the last.
        self._min_gap_s = interval_s - hub.interval_s / 2
        self._queue: deque[Snapshot] = deque(maxlen=queue_size)
        self._missed = 0
        self._last_taken_s: float | None = None
        self._closed = False
        self._changed = threading.Condition()

    def offer(self, snapshot: Snapshot, now_s: float) -> None:
        with self._changed:
            if self._closed:
                return
            if self._last_taken_s is not None and now_s - self._last_taken_s < self._min_gap_s:
                return
            self._last_taken_s = now_s
            if len(self._queue) == self._queue.maxlen:
                self._missed += 1  # the append drops the oldest
            self._queue.append(snapshot)
            self._changed.notify_all()

    def get(self, timeout_s: float) -> tuple[Snapshot, int] | None:
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

    def subscribe(self, interval_s: float) -> SubscriptionHandle: ...


class SubscriptionHandle(Protocol):
    def get(self, timeout_s: float) -> tuple[Snapshot, int] | None: ...

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

    def __init__(self, interval_s: float, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if interval_s <= 0 or queue_size < 1:
            raise ValueError(f"interval_s {interval_s} and queue_size {queue_size} must be > 0")
        self._interval_s = interval_s
        self._queue_size = queue_size
        self._latest: Snapshot | None = None
        self._subscriptions: set[Subscription] = set()
        self._lock = threading.Lock()

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def latest(self) -> Snapshot | None:
        return self._latest

    def publish(self, snapshot: Snapshot) -> None:
        now_s = time.monotonic()
        with self._lock:
            self._latest = snapshot
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.offer(snapshot, now_s)

    def subscribe(self, interval_s: float) -> Subscription:
        """A subscription to every snapshot at least interval_s after the previous one
        (never more often than sampling); the latest, when there is one, comes first."""
        subscription = Subscription(self, max(interval_s, self._interval_s), self._queue_size)
        with self._lock:
            self._subscriptions.add(subscription)
            latest = self._latest
        if latest is not None:
            subscription.offer(latest, time.monotonic())
        return subscription

    def queue_lengths(self) -> list[int]:
        """The queued snapshots of each open subscription."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        return [len(s) for s in subscriptions]

    def close(self) -> None:
        """End every stream (after it drains); for shutdown."""
        with self._lock:
            subscriptions = list(self._subscriptions)
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


class TelemetryServicer(telemetry_service_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def GetSnapshot(
        self, request: telemetry_service_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> telemetry_service_pb2.GetSnapshotResponse:
        sections = _sections(request.sections, context)
        snapshot = convert.snapshot_to_proto(_latest(self._source, context), sections)
        return telemetry_service_pb2.GetSnapshotResponse(snapshot=snapshot)

    def WatchSnapshots(
        self, request: telemetry_service_pb2.WatchSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[telemetry_service_pb2.WatchSnapshotsResponse]:
        sections = _sections(request.sections, context)
        try:
            interval_s = watch_interval_s(request.interval, self._source.interval_s)
        except IntervalError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._source.subscribe(interval_s) as subscription:
            # Cancellation and deadlines end the RPC; wake the wait below at once.
            context.add_callback(subscription.close)
            while context.is_active():
                item = subscription.get(_POLL_S)
                if item is None:
                    if subscription.closed:
                        return
                    continue
                snapshot, missed = item
                yield telemetry_service_pb2.WatchSnapshotsResponse(
                    snapshot=convert.snapshot_to_proto(snapshot, sections), missed=missed
                )

    def ListDevices(
        self, request: telemetry_service_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> telemetry_service_pb2.ListDevicesResponse:
        found = convert.devices(_latest(self._source, context))
        try:
            devices, next_token = convert.page(found, request.page_size, request.page_token)
        except convert.PageTokenError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return telemetry_service_pb2.ListDevicesResponse(
            devices=devices, next_page_token=next_token
        )


def _sections(
    requested: Iterable[int], context: grpc.ServicerContext
) -> frozenset[convert.Section]:
    try:
        return convert.validate_sections(requested)
    except convert.SectionError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _latest(source: SnapshotSource, context: grpc.ServicerContext) -> Snapshot:
    snapshot = source.latest()
    if snapshot is None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot yet: the agent is starting")
    return snapshot


def add_to_server(server: grpc.Server, source: SnapshotSource) -> None:
    """Register fabric.v1.TelemetryService over source (a SnapshotHub) on server."""
    telemetry_service_pb2_grpc.add_TelemetryServiceServicer_to_server(
        TelemetryServicer(source), server
    )
