"""Fleet events to WatchEvents subscribers: one bounded queue per subscriber.

A subscriber that reads too slowly loses the oldest events, never the aggregator's
time: publishing is a non-blocking append, and the subscriber is told how many it
missed with the next event it gets.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Mapping

from agent.aggregator.store.base import selector_matches
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb

# Events kept per subscriber: minutes of a busy fleet's events (an XID storm on a few
# nodes), a few hundred KiB at most.
EVENT_QUEUE_SIZE = 1024
# WatchEvents streams on the TCP listener, and kept apart for the unix socket: TCP
# readers need no identity, so taking every TCP slot must not lock the operator's
# local tools out.
MAX_EVENT_WATCHERS = 256
LOCAL_EVENT_WATCHERS = 16


class WatcherLimitError(RuntimeError):
    def __init__(self, limit: int, where: str = "") -> None:
        super().__init__(f"at most {limit} WatchEvents streams at once{where}")


class EventSubscription:
    """One subscriber's filter and queue; `next()` waits for the next event."""

    def __init__(
        self,
        hub: EventHub,
        kinds: Collection[pb.EventKind.ValueType],
        selector: Mapping[str, str],
        size: int,
    ) -> None:
        self._hub = hub
        self.kinds = frozenset(kinds)
        self.selector = dict(selector)
        self._queue: deque[pb.Event] = deque()
        self._size = size
        self._missed = 0
        self._ready = asyncio.Event()
        self.closed = False

    def wants(self, event: pb.Event, labels: Mapping[str, str]) -> bool:
        if self.kinds and event.kind not in self.kinds:
            return False
        return selector_matches(self.selector, labels)

    def offer(self, event: pb.Event) -> None:
        if len(self._queue) >= self._size:
            self._queue.popleft()
            self._missed += 1
        self._queue.append(event)
        self._ready.set()

    async def next(self) -> tuple[pb.Event, int] | None:
        """The next event and how many were dropped before it; None once closed."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        missed, self._missed = self._missed, 0
        return self._queue.popleft(), missed

    def __len__(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._hub.discard(self)


class EventHub:
    """Subscribers by identity. Owned by the event loop: not thread-safe."""

    def __init__(
        self,
        labels_of: Callable[[str], Mapping[str, str]],
        *,
        queue_size: int = EVENT_QUEUE_SIZE,
        max_watchers: int = MAX_EVENT_WATCHERS + LOCAL_EVENT_WATCHERS,
    ) -> None:
        self._labels_of = labels_of
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._subscriptions: set[EventSubscription] = set()

    def subscribe(
        self, kinds: Collection[pb.EventKind.ValueType] = (), selector: Mapping[str, str] = {}
    ) -> EventSubscription:
        if len(self._subscriptions) >= self._max_watchers:
            raise WatcherLimitError(self._max_watchers)
        subscription = EventSubscription(self, kinds, selector, self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: pb.Event) -> None:
        if not self._subscriptions:
            return
        labels = self._labels_of(event.node)
        for subscription in self._subscriptions:
            if subscription.wants(event, labels):
                subscription.offer(event)

    def discard(self, subscription: EventSubscription) -> None:
        self._subscriptions.discard(subscription)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.close()
