"""The agent's compact node summary: rates and deltas over one interval, from snapshots.

Snapshots carry cumulative counters (since boot, since the agent started, since a class
was created); the aggregator wants what happened in the last interval. Each section that
has a part in the summary declares a summarizer (agent.node.collectors.base.Section),
which keeps its section's previous counters and adds its part to each `NodeSummary`.
`SummaryBuilder` runs them over every snapshot. It does no I/O, so the stream client
calls it on every tick.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic

from agent.node.collectors.base import SampleT, Section, Summarizer, SummaryClock, sections
from agent.node.snapshot import Snapshot
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb


class _Part(Generic[SampleT]):
    """One section and its summarizer."""

    def __init__(self, section: Section[SampleT], summarizer: Summarizer[SampleT]) -> None:
        self.section = section
        self.summarizer = summarizer

    def add(self, snapshot: Snapshot, summary: pb.NodeSummary, clock: SummaryClock) -> None:
        # A snapshot without the section (its collector failed that tick) leaves the
        # summarizer as it was, so the next good tick's deltas cover the gap and its
        # rates use the real elapsed time instead of the devices looking new.
        if snapshot.has(self.section):
            self.summarizer.summarize(snapshot.samples(self.section), summary, clock)


def _part(section: Section[SampleT]) -> _Part[SampleT]:
    assert section.summarizer is not None
    return _Part(section, section.summarizer())


def summary_order(chosen: Iterable[Section[Any]]) -> list[Section[Any]]:
    """The sections that have a summarizer, each after those it says it follows (that
    are among them), otherwise in the order given."""
    pending = [s for s in chosen if s.summarizer is not None]
    names = {s.name for s in pending}
    ordered: list[Section[Any]] = []
    done: set[str] = set()
    while pending:
        ready = next(
            (s for s in pending if all(a in done or a not in names for a in s.summarize_after)),
            None,
        )
        if ready is None:
            cycle = ", ".join(s.name for s in pending)
            raise ValueError(f"sections {cycle}: summarize_after forms a cycle")
        pending.remove(ready)
        ordered.append(ready)
        done.add(ready.name)
    return ordered


class SummaryBuilder:
    """Turns consecutive snapshots into per-interval `NodeSummary` messages.

    Work and state are O(devices) per call. Devices that disappear are dropped from the
    state; devices that appear report zero deltas and rates from their second snapshot
    (except rates the snapshot measures itself, such as GPM's).
    """

    def __init__(self) -> None:
        self._parts = [_part(section) for section in summary_order(sections().values())]
        self._completed_s: float | None = None

    def next(self, snapshot: Snapshot) -> pb.NodeSummary:
        """The summary of the interval since the previous call's snapshot."""
        summary = pb.NodeSummary(seq=snapshot.seq)
        summary.sampled_at.FromNanoseconds(round(snapshot.started_wall_s * 1e9))
        clock = SummaryClock(snapshot.completed_wall_s, snapshot.interval_s)
        summary.interval.FromNanoseconds(round(clock.elapsed_s(self._completed_s) * 1e9))
        self._completed_s = snapshot.completed_wall_s
        for part in self._parts:
            part.add(snapshot, summary, clock)
        return summary
