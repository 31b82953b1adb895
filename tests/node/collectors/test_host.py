"""Host collector against this machine, checked with psutil and os directly."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from agent.node.collectors.base import SharedResources, Tick, registrations
from agent.node.collectors.host import HostCollector, HostSample
from agent.node.config import AgentConfig
from tests.exposition import exposed, series


def tick(seq: int = 1) -> Tick:
    return Tick(seq=seq, monotonic_s=time.monotonic(), wall_s=time.time())


def test_one_sample_with_every_cpu_mode_memory_and_load() -> None:
    collector = HostCollector()

    (sample,) = collector.collect(tick())
    cpu_after = psutil.cpu_times()

    assert isinstance(sample, HostSample)
    assert set(sample.cpu_seconds) == set(cpu_after._fields)
    for mode, seconds in sample.cpu_seconds.items():
        assert 0 <= seconds <= getattr(cpu_after, mode)
    assert sample.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < sample.memory_available_bytes <= sample.memory_total_bytes
    assert all(load >= 0 for load in (sample.load1, sample.load5, sample.load15))


def test_load_matches_the_kernel() -> None:
    collector = HostCollector()

    before = os.getloadavg()
    (sample,) = collector.collect(tick())
    after = os.getloadavg()

    # The kernel recomputes load every 5 s; the sample matches one side of that.
    assert (sample.load1, sample.load5, sample.load15) in {before, after}


def test_cpu_seconds_only_grow_between_ticks() -> None:
    collector = HostCollector()

    (first,) = collector.collect(tick(1))
    sum(i * i for i in range(200_000))  # spend a little CPU time
    (second,) = collector.collect(tick(2))

    assert all(second.cpu_seconds[m] >= first.cpu_seconds[m] for m in first.cpu_seconds)
    assert sum(second.cpu_seconds.values()) > sum(first.cpu_seconds.values())


def test_sample_is_immutable() -> None:
    (sample,) = HostCollector().collect(tick())

    with pytest.raises(TypeError):
        sample.cpu_seconds["user"] = 0.0  # type: ignore[index]


def test_metrics_names_and_values() -> None:
    collector = HostCollector()
    (sample,) = collector.collect(tick())

    scraped = exposed(collector.metrics([sample]))

    expected = {
        series("fabric_host_memory_total_bytes"): sample.memory_total_bytes,
        series("fabric_host_memory_available_bytes"): sample.memory_available_bytes,
        series("fabric_host_load1"): sample.load1,
        series("fabric_host_load5"): sample.load5,
        series("fabric_host_load15"): sample.load15,
    }
    for mode, seconds in sample.cpu_seconds.items():
        expected[series("fabric_host_cpu_seconds_total", mode=mode)] = seconds
    assert scraped == expected


def test_registered_factory() -> None:
    collector = registrations()["host"].create(AgentConfig(), SharedResources())

    assert collector.name == "host"
    assert len(collector.collect(tick())) == 1
