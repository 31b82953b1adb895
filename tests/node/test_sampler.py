"""The sampling loop: isolation of failing and slow collectors, status recording."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import FrozenInstanceError

import pytest

from agent.node.errors import SourceUnavailableError
from agent.node.sampler import Sampler
from tests.fakes import FakeCollector, Reading


def make_sampler(*collectors: FakeCollector, timeout_s: float = 0.2) -> Sampler:
    return Sampler(collectors, node_name="n1", interval_s=1.0, timeout_s=timeout_s)


def test_every_collector_sampled_and_recorded() -> None:
    sampler = make_sampler(FakeCollector("a"), FakeCollector("b"))

    snapshot = sampler.sample()

    assert [s.name for s in snapshot.collectors] == ["a", "b"]
    assert all(s.success and s.samples == 1 and s.duration_s >= 0 for s in snapshot.collectors)
    assert snapshot.section("a") == (Reading(1),)
    assert sampler.latest is snapshot
    sampler.close()


def test_failing_collector_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    bad = FakeCollector("bad", error=RuntimeError("GPU 3: driver said no"))
    sampler = make_sampler(bad, FakeCollector("good"))

    first = sampler.sample()
    second = sampler.sample()

    status = {s.name: s for s in second.collectors}
    assert not status["bad"].success
    assert status["bad"].error == "RuntimeError: GPU 3: driver said no"
    assert status["good"].success and second.section("good") == (Reading(2),)
    assert "bad" not in first.sections
    # Logged when it starts failing, not on every tick.
    assert sum("collector bad failing" in r.message for r in caplog.records) == 1
    sampler.close()


def test_recovery_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    flaky = FakeCollector("flaky", error=OSError("gone"))
    sampler = make_sampler(flaky)
    sampler.sample()
    flaky.error = None

    snapshot = sampler.sample()
    sampler.sample()

    assert snapshot.collectors[0].success
    assert sum("collector flaky recovered" in r.message for r in caplog.records) == 1
    sampler.close()


def test_slow_collector_times_out_without_delaying_the_snapshot() -> None:
    slow = FakeCollector("slow", delay_s=5.0)
    sampler = make_sampler(slow, FakeCollector("fast"), timeout_s=0.2)

    started = time.monotonic()
    first = sampler.sample()
    elapsed = time.monotonic() - started
    second = sampler.sample()

    assert elapsed < 1.0
    assert {s.name: s.success for s in first.collectors} == {"slow": False, "fast": True}
    assert "timed out" in (first.collectors[0].error or "")
    # Still busy on the next tick: skipped, not queued behind itself.
    assert "still running" in (second.collectors[0].error or "")
    assert slow.calls == 1
    assert second.section("fast") == (Reading(2),)
    sampler.close()


def test_slow_collector_is_resubmitted_once_it_returns() -> None:
    slow = FakeCollector("slow", delay_s=5.0)
    sampler = make_sampler(slow, timeout_s=0.1)
    sampler.sample()
    slow.delay_s = 0.0
    slow.release.set()
    time.sleep(0.05)

    snapshot = sampler.sample()

    assert snapshot.collectors[0].success
    assert slow.calls == 2
    sampler.close()


def test_snapshot_is_immutable() -> None:
    sampler = make_sampler(FakeCollector("a"))
    snapshot = sampler.sample()

    with pytest.raises(FrozenInstanceError):
        snapshot.seq = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.sections["a"] = ()  # type: ignore[index]
    sampler.close()


def test_run_publishes_on_a_fixed_schedule() -> None:
    sampler = Sampler([FakeCollector("a")], node_name="n1", interval_s=0.1, timeout_s=0.08)
    published: list[float] = []
    stop = threading.Event()

    def publish(_snapshot: object) -> None:
        published.append(time.monotonic())
        if len(published) == 6:
            stop.set()

    sampler.run(stop, publish)

    gaps = [b - a for a, b in itertools.pairwise(published)]
    assert len(published) == 6
    assert all(0.05 < gap < 0.2 for gap in gaps), gaps
    sampler.close()


def test_close_closes_collectors() -> None:
    collector = FakeCollector("a")
    sampler = make_sampler(collector)
    sampler.close()
    assert collector.closed


def test_absent_source_fails_quietly(caplog: pytest.LogCaptureFixture) -> None:
    absent = FakeCollector("gpu", error=SourceUnavailableError("NVML not available: no driver"))
    sampler = make_sampler(absent)

    snapshot = sampler.sample()

    assert not snapshot.collectors[0].success
    assert "NVML not available" in (snapshot.collectors[0].error or "")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sampler.close()


def test_collectors_run_one_after_another_when_quick() -> None:
    first, second = FakeCollector("a", delay_s=0.005), FakeCollector("b", delay_s=0.005)
    first.release.clear()
    sampler = make_sampler(first, second)

    sampler.sample()

    assert second.started_s >= first.finished_s
    sampler.close()


def test_a_hung_collector_holds_the_next_back_briefly() -> None:
    hung, quick = FakeCollector("hung", delay_s=5.0), FakeCollector("quick")
    sampler = make_sampler(hung, quick, timeout_s=0.5)

    snapshot = sampler.sample()

    assert snapshot.collectors[1].success
    assert quick.started_s - hung.started_s < 0.1
    sampler.close()
