"""The sampling loop: every collector once per tick, each in its own worker thread.

What a collector returns is filed under its sections by sample type. A collector that
raises, or returns a sample none of its sections holds, is recorded as failed; one that
has not returned by the tick's deadline is recorded as timed out and left running on its
own worker, where it cannot hold up the others or the next snapshot (the next tick skips
it while it is busy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.node.collectors.base import Collector, Tick, file_samples
from agent.node.errors import SourceUnavailableError
from agent.node.snapshot import CollectorStatus, Snapshot

log = logging.getLogger(__name__)

# Head start each collector gets before the next one starts (see `Sampler.sample`).
_STAGGER_S = 0.02


@dataclass(frozen=True, slots=True)
class _Result:
    # By section name; empty when the collector failed.
    sections: Mapping[str, tuple[Any, ...]]
    samples: int
    duration_s: float
    error: str | None
    # The source is absent (no driver) and has said so itself: fail quietly.
    unavailable: bool = False


class _Worker:
    """One collector and the single thread it runs on."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"collect-{collector.name}"
        )
        self.pending: Future[_Result] | None = None
        self.pending_since_s = 0.0
        self.failing = False
        self.quiet = False

    def submit(self, tick: Tick) -> Future[_Result]:
        self.pending = self.executor.submit(self._run, tick)
        self.pending_since_s = time.monotonic()
        return self.pending

    def _run(self, tick: Tick) -> _Result:
        start = time.perf_counter()
        collector = self.collector
        try:
            samples = collector.collect(tick)
            sections = file_samples(collector.name, collector.sections, samples)
        except Exception as exc:  # reported in the snapshot and logged on change
            return _Result(
                {},
                0,
                time.perf_counter() - start,
                f"{type(exc).__name__}: {exc}",
                isinstance(exc, SourceUnavailableError),
            )
        return _Result(sections, len(samples), time.perf_counter() - start, None)


class Sampler:
    """Produces one immutable snapshot per tick from a fixed set of collectors."""

    def __init__(
        self,
        collectors: Sequence[Collector],
        *,
        node_name: str,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._workers = [_Worker(c) for c in collectors]
        self._node_name = node_name
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._seq = 0
        self._latest: Snapshot | None = None

    @property
    def collectors(self) -> list[Collector]:
        return [w.collector for w in self._workers]

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    def sample(self, tick: Tick | None = None) -> Snapshot:
        """Run one tick now and return its snapshot."""
        if tick is None:
            self._seq += 1
            tick = Tick(self._seq, time.monotonic(), time.time())
        by_name = {worker.collector.name: worker for worker in self._workers}
        deadline_s = time.monotonic() + self._timeout_s
        submitted: dict[str, Future[_Result]] = {}
        statuses: dict[str, CollectorStatus] = {}
        for worker in self._workers:
            name = worker.collector.name
            if worker.pending is not None and not worker.pending.done():
                busy_s = time.monotonic() - worker.pending_since_s
                statuses[name] = CollectorStatus(
                    name, False, busy_s, error=f"still running after {busy_s:.2f} s"
                )
                continue
            submitted[name] = future = worker.submit(tick)
            # Collectors mostly wait on the driver or the kernel, releasing the GIL on
            # every call: run side by side they hand it over thousands of times a tick.
            # So each gets a head start of up to `_STAGGER_S` before the next begins; a
            # slow one holds the others back by no more than that.
            wait([future], timeout=min(_STAGGER_S, max(0.0, deadline_s - time.monotonic())))
        wait(submitted.values(), timeout=max(0.0, deadline_s - time.monotonic()))

        sections: dict[str, tuple[Any, ...]] = {}
        for name, future in submitted.items():
            if future.done():
                result = future.result()
                statuses[name] = CollectorStatus(
                    name, result.error is None, result.duration_s, result.samples, result.error
                )
                sections.update(result.sections)
                by_name[name].quiet = result.unavailable
            else:
                statuses[name] = CollectorStatus(
                    name, False, self._timeout_s, error=f"timed out after {self._timeout_s:.2f} s"
                )
        ordered = tuple(statuses[w.collector.name] for w in self._workers)
        self._log_changes(ordered)
        snapshot = Snapshot(
            node_name=self._node_name,
            agent_version=__version__,
            seq=tick.seq,
            interval_s=self._interval_s,
            started_wall_s=tick.wall_s,
            completed_wall_s=time.time(),
            sections=sections,
            collectors=ordered,
        )
        self._latest = snapshot
        return snapshot

    def run(self, stop: threading.Event, publish: Callable[[Snapshot], None]) -> None:
        """Sample on a fixed-rate schedule until `stop` is set; late ticks are skipped,
        never bunched, so a stall is followed by one tick, not a burst."""
        start = time.monotonic()
        next_s = start
        while not stop.is_set():
            self._seq += 1
            tick = Tick(self._seq, time.monotonic(), time.time())
            publish(self.sample(tick))
            next_s += self._interval_s
            now = time.monotonic()
            if next_s < now:
                skipped = int((now - next_s) // self._interval_s) + 1
                next_s += skipped * self._interval_s
                log.warning("sampling fell behind; skipped %d tick(s)", skipped)
            stop.wait(next_s - now)

    def close(self) -> None:
        for worker in self._workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)
        for worker in self._workers:
            try:
                worker.collector.close()
            except Exception:
                log.exception("closing collector %s failed", worker.collector.name)

    def _log_changes(self, statuses: Sequence[CollectorStatus]) -> None:
        """Log when a collector starts failing and when it recovers, not every tick."""
        for worker, status in zip(self._workers, statuses, strict=True):
            if not status.success and not worker.failing:
                level = logging.DEBUG if worker.quiet else logging.WARNING
                log.log(level, "collector %s failing: %s", status.name, status.error)
            elif status.success and worker.failing:
                log.info("collector %s recovered", status.name)
            worker.failing = not status.success
