"""Fakes with behaviour the tests set."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.node.collectors.base import Section, Tick
from agent.node.families import CounterFamily, Family


@dataclass(frozen=True, slots=True)
class Reading:
    value: int


class FakeCollector:
    """A collector whose behaviour the test sets: samples, an error, or a delay. Its one
    section, named after it, holds `Reading`s."""

    def __init__(self, name: str, *, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.name = name
        self.sections = (Section(name, Reading),)
        self.delay_s = delay_s
        self.error = error
        self.calls = 0
        self.started_s = self.finished_s = 0.0
        self.release = threading.Event()
        self.closed = False

    def collect(self, tick: Tick) -> Sequence[Any]:
        self.calls += 1
        self.started_s = time.monotonic()
        if self.delay_s:
            self.release.wait(self.delay_s)
        self.finished_s = time.monotonic()
        if self.error is not None:
            raise self.error
        return (Reading(tick.seq),)

    def metrics(self, samples: Sequence[Any]) -> Iterable[Family]:
        family = CounterFamily(f"fake_{self.name}_ticks", "Ticks seen by the fake.")
        for sample in samples:
            family.add_metric([], sample.value)
        yield family

    def close(self) -> None:
        self.release.set()
        self.closed = True
