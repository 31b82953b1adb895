"""Host context for the fabric numbers, the `host` section: CPU time, memory and load,
through psutil."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import psutil

from agent.node.collectors.base import (
    CollectorContext,
    NoOptions,
    Section,
    SnapshotField,
    Tick,
    register,
    sample_message,
)
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.proto.fabric.v1 import telemetry_pb2


@dataclass(frozen=True, slots=True)
class HostSample:
    """The host at one tick. CPU seconds are summed over all CPUs, per mode."""

    cpu_seconds: Mapping[str, float]
    memory_total_bytes: int
    memory_available_bytes: int
    load1: float
    load5: float
    load15: float


def host_message(sample: HostSample) -> telemetry_pb2.HostSample:
    return sample_message(telemetry_pb2.HostSample, sample, cpu_seconds=dict(sample.cpu_seconds))


HOST = Section(
    "host", HostSample, snapshot_field=SnapshotField("host", telemetry_pb2.HostSample, host_message)
)


class HostCollector:
    name = "host"
    sections = (HOST,)

    def collect(self, tick: Tick) -> tuple[HostSample]:
        try:
            cpu = psutil.cpu_times()
            memory = psutil.virtual_memory()
            load1, load5, load15 = psutil.getloadavg()
        except OSError as exc:
            raise CollectorError(f"host statistics: {exc}") from exc
        return (
            HostSample(
                # Every mode psutil reports on this platform (iowait, steal, ... on Linux).
                cpu_seconds=MappingProxyType(cpu._asdict()),
                memory_total_bytes=memory.total,
                memory_available_bytes=memory.available,
                load1=load1,
                load5=load5,
                load15=load15,
            ),
        )

    def metrics(self, samples: Sequence[HostSample]) -> Iterable[Family]:
        cpu = CounterFamily(
            "fabric_host_cpu_seconds_total", "CPU time summed over all CPUs.", labels=["mode"]
        )
        total = GaugeFamily("fabric_host_memory_total_bytes", "Physical memory.")
        available = GaugeFamily(
            "fabric_host_memory_available_bytes",
            "Memory available to new work without swapping.",
        )
        loads = [
            GaugeFamily(f"fabric_host_{window}", f"Load average over {period}.")
            for window, period in (
                ("load1", "1 minute"),
                ("load5", "5 minutes"),
                ("load15", "15 minutes"),
            )
        ]
        for s in samples:
            for mode, seconds in s.cpu_seconds.items():
                cpu.add_metric([mode], seconds)
            total.add_metric([], s.memory_total_bytes)
            available.add_metric([], s.memory_available_bytes)
            for gauge, value in zip(loads, (s.load1, s.load5, s.load15), strict=True):
                gauge.add_metric([], value)
        yield from (cpu, total, available, *loads)

    def close(self) -> None:
        pass


@register(HostCollector, options=NoOptions)
def _create(context: CollectorContext[NoOptions]) -> HostCollector:
    return HostCollector()
