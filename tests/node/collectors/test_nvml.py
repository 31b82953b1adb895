"""The GPU collector against the fake NVML driver (real pynvml)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from agent.node.collectors import gpu as gpu_collector
from agent.node.collectors.base import Collector, CollectorContext
from agent.node.collectors.gpu import GpuCollector, GpuSample
from agent.node.errors import CollectorError
from agent.node.families import Family
from agent.node.nvml import NvmlSession
from tests import ROOT
from tests.fakenvml import FakeNvml, scenario

HGX = scenario("hgx-h200-8gpu.json")["gpus"]
BUS_IDS = HGX["pci_bus_ids"]


def offset(gpu: int) -> int:
    """The fake's deterministic per-GPU spread (tests/fakenvml/README.md)."""
    return (gpu * 37) % 11 - 5


def series(families: Iterable[Family]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (family.series_name, frozenset(zip(family.label_names, labels, strict=True))): value
        for family in families
        for labels, value in family.rows
    }


def value(
    rendered: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return rendered.get((name, frozenset(labels.items())))


def collect_until(
    collector: Collector, fake: FakeNvml, done: Callable[[Sequence[GpuSample]], object]
) -> Sequence[GpuSample]:
    """Collect (0.1 s of scenario time per tick) until `done(samples)`; the XID waiter is a
    thread of its own, so its counts arrive a moment after scenario time reaches them."""
    deadline = time.monotonic() + 5.0
    while True:
        samples = collector.collect(fake.tick(0.1))
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


def test_samples_every_gpu_in_base_units(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    collector = gpu_collector.create(nvml_context)

    samples = collector.collect(fakenvml.tick())

    assert [s.index for s in samples] == list(range(8))
    assert [s.pci_bus_id for s in samples] == BUS_IDS
    assert len({s.uuid for s in samples}) == 8
    for s in samples:
        spread = offset(s.index)
        assert (s.name, s.driver_version, s.lost, s.error) == (
            "NVIDIA H200", "570.124.06", False, None
        )  # fmt: skip
        assert s.utilization_gpu_ratio == pytest.approx((96 + spread) / 100)
        assert s.utilization_memory_ratio == pytest.approx((58 + spread) / 100)
        assert s.memory_total_bytes == 150_754_820_096
        assert s.memory_used_bytes == HGX["memory_used_bytes"] + s.index * 256 * 2**20
        assert s.power_watts == 640 + 5 * spread
        assert s.power_limit_watts == 700
        assert s.temperature_gpu_celsius == 62 + spread
        assert s.temperature_memory_celsius == 71 + spread
        assert (s.sm_clock_hz, s.memory_clock_hz) == (1_980_000_000, 3_201_000_000)
        assert s.pcie_transmit_bytes_per_second == int(18_000_000 * (1 + 0.01 * s.index)) * 1024
        assert s.pcie_replays == 0
        assert (s.ecc_corrected_aggregate, s.ecc_uncorrected_volatile) == (2, 0)
        assert (s.remapped_rows_correctable, s.remapped_rows_pending) == (0, False)
        assert s.clock_event_reasons == 0
        # GPM needs a second tick.
        assert s.sm_occupancy_ratio is None


def test_energy_counts_up_with_power(nvml_context: CollectorContext, fakenvml: FakeNvml) -> None:
    collector = gpu_collector.create(nvml_context)

    first = collector.collect(fakenvml.tick())
    second = collector.collect(fakenvml.tick(2.0))

    for a, b in zip(first, second, strict=True):
        assert a.energy_joules is not None and b.energy_joules is not None
        assert b.energy_joules - a.energy_joules == pytest.approx(a.power_watts * 2.0, abs=0.002)


def test_gpm_ratios_between_consecutive_ticks(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    collector = gpu_collector.create(nvml_context)

    collector.collect(fakenvml.tick())
    too_soon = collector.collect(fakenvml.tick(0.05))
    paired = collector.collect(fakenvml.tick(1.0))

    assert all(s.sm_occupancy_ratio is None for s in too_soon)
    for s in paired:
        assert s.sm_occupancy_ratio == pytest.approx((38 + offset(s.index)) / 100)
        assert s.tensor_active_ratio == pytest.approx((62 + offset(s.index)) / 100)


def test_one_field_value_call_per_gpu_per_tick(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    collector = gpu_collector.create(nvml_context)
    collector.collect(fakenvml.tick())  # opens the session (discovery reads the link count)
    fakenvml.reset_counts()

    for _ in range(3):
        collector.collect(fakenvml.tick(1.0))

    assert fakenvml.calls("nvmlDeviceGetFieldValues") == 3 * 8
    assert fakenvml.calls("nvmlGpmSampleGet") == 3 * 8


def test_a_lost_gpu_is_reported_and_the_others_kept(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("gpu-lost.json")
    collector = gpu_collector.create(nvml_context)
    before = collector.collect(fakenvml.tick())

    samples = collect_until(collector, fakenvml, lambda s: fakenvml.now() > 2.0 and s[3].xid_errors)

    lost = samples[3]
    assert lost.lost and lost.error is None
    assert (lost.uuid, lost.pci_bus_id) == (before[3].uuid, "00000000:5D:00.0")
    assert lost.power_watts is None and lost.utilization_gpu_ratio is None
    assert lost.xid_errors == ((79, 1),)
    assert all(not s.lost and s.error is None and s.power_watts for s in samples if s.index != 3)
    rendered = series(collector.metrics(samples))
    assert value(rendered, "fabric_gpu_lost", gpu="3") == 1
    assert value(rendered, "fabric_gpu_lost", gpu="2") == 0
    assert value(rendered, "fabric_gpu_power_watts", gpu="3") is None
    assert value(rendered, "fabric_gpu_xid_errors_total", gpu="3", xid="79") == 1


def test_a_gpu_lost_before_start_up_is_reported_lost(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["events"] = [{"at_s": 0, "type": "gpu_lost", "gpu": 6}]
    fakenvml.use_scenario(doc, tmp_path)
    collector = gpu_collector.create(nvml_context)

    samples = collector.collect(fakenvml.tick())

    assert len(samples) == 8
    assert samples[6].lost and samples[6].error is None and samples[6].uuid == ""
    assert all(not s.lost and s.error is None for s in samples if s.index != 6)


def test_xids_are_counted_per_gpu_and_code(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("xid-79.json")
    collector = gpu_collector.create(nvml_context)
    collector.collect(fakenvml.tick())
    fakenvml.advance(2.0)

    # The waiter hands events over one at a time: wait for both GPUs' counts.
    samples = collect_until(
        collector,
        fakenvml,
        lambda s: s[5].xid_errors == ((79, 2),) and s[2].xid_errors == ((13, 1),),
    )

    assert samples[5].xid_errors == ((79, 2),)
    assert samples[2].xid_errors == ((13, 1),)
    assert all(not s.xid_errors for s in samples if s.index not in (2, 5))
    assert all(not s.lost for s in samples)
    rendered = series(collector.metrics(samples))
    assert value(rendered, "fabric_gpu_xid_errors_total", gpu="5", xid="79") == 2
    assert value(rendered, "fabric_gpu_xid_errors_total", gpu="2", xid="13") == 1


def test_unsupported_values_are_none_and_not_failures(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("not-supported.json")
    collector = gpu_collector.create(nvml_context)

    collector.collect(fakenvml.tick())
    samples = collector.collect(fakenvml.tick(1.0))

    for s in samples:
        assert s.error is None
        assert s.energy_joules is None and s.ecc_corrected_volatile is None
        assert s.remapped_rows_pending is None and s.temperature_memory_celsius is None
        assert s.sm_occupancy_ratio is None
        assert s.power_watts is not None
    rendered = series(collector.metrics(samples))
    assert value(rendered, "fabric_gpu_energy_joules_total", gpu="0") is None
    assert value(rendered, "fabric_gpu_temperature_celsius", gpu="0", sensor="memory") is None
    assert value(rendered, "fabric_gpu_temperature_celsius", gpu="0", sensor="gpu") == 57


def test_an_unexpected_error_is_kept_in_that_gpus_sample(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["failures"] = [{"function": "nvmlDeviceGetPowerUsage", "error": "unknown", "gpu": 4}]
    fakenvml.use_scenario(doc, tmp_path)
    collector = gpu_collector.create(nvml_context)

    samples = collector.collect(fakenvml.tick())

    assert samples[4].error == "GPU 4: nvmlDeviceGetPowerUsage: Unknown Error"
    assert samples[4].power_watts is None and samples[4].memory_used_bytes is not None
    assert all(s.error is None for s in samples if s.index != 4)


def test_the_collector_fails_only_when_every_gpu_failed(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["failures"] = [{"function": "*", "error": "unknown"}]
    fakenvml.use_scenario(doc, tmp_path)
    collector = gpu_collector.create(nvml_context)

    with pytest.raises(CollectorError, match=r"every GPU failed: GPU 0: nvmlDevice\w+: Unknown"):
        collector.collect(fakenvml.tick())


def test_closing_the_session_stops_the_event_waiter(fakenvml: FakeNvml) -> None:
    session = NvmlSession(fakenvml.library)
    GpuCollector(session).collect(fakenvml.tick())
    assert any(t.name == "nvml-events" for t in threading.enumerate())

    started = time.monotonic()
    session.close()

    assert time.monotonic() - started < 1.0
    assert not any(t.name == "nvml-events" for t in threading.enumerate())
    assert fakenvml.refcount() == 0
    with pytest.raises(CollectorError, match="closed"):
        GpuCollector(session).collect(fakenvml.tick())


def test_missing_library_fails_each_tick_and_logs_once(
    fakenvml: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    session = NvmlSession(tmp_path / "libnvidia-ml.so.1", clock=lambda: clock[0])
    collector = GpuCollector(session)

    with caplog.at_level(logging.INFO, logger="agent.node.nvml"):
        for _ in range(3):
            with pytest.raises(CollectorError, match="NVML not available: cannot load"):
                collector.collect(fakenvml.tick(1.0))
            clock[0] += 20.0
    session.close()

    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_no_library_in_a_fresh_process(tmp_path: Path) -> None:
    # A process holds one libnvidia-ml.so.1; this one never loads any.
    script = """
import json, logging, sys
from pathlib import Path
from agent.node.collectors.base import CollectorContext, SharedResources, Tick
from agent.node.collectors.gpu import create
from agent.node.errors import CollectorError
from agent.node.families import Family
from agent.node.nvml import NvmlOptions
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
shared = SharedResources()
collector = create(CollectorContext(NvmlOptions(Path(sys.argv[1])), shared))
errors = []
for seq in range(5):
    try:
        collector.collect(Tick(seq, float(seq), 0.0))
    except CollectorError as exc:
        errors.append(str(exc))
shared.close()
print(json.dumps(errors))
"""
    missing = tmp_path / "nowhere" / "libnvidia-ml.so.1"

    result = subprocess.run(
        [sys.executable, "-c", script, str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout)
    assert len(errors) == 5
    assert all(e.startswith(f"NVML not available: cannot load {missing}") for e in errors)
    assert result.stderr.count("NVML not available") == 1


def test_recovers_when_the_driver_appears(
    fakenvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fakenvml.use("driver-not-loaded.json")
    clock = [1000.0]
    session = NvmlSession(fakenvml.library, clock=lambda: clock[0])
    collector = GpuCollector(session)

    with caplog.at_level(logging.INFO, logger="agent.node.nvml"):
        with pytest.raises(CollectorError, match="NVML not available: nvmlInit: Driver Not Loaded"):
            collector.collect(fakenvml.tick(1.0))
        fakenvml.use("hgx-h200-8gpu.json")
        clock[0] += 10.0
        with pytest.raises(CollectorError):  # within the retry interval: no new attempt
            collector.collect(fakenvml.tick(1.0))
        clock[0] += 25.0
        samples = collector.collect(fakenvml.tick(1.0))
    session.close()

    assert len(samples) == 8
    assert fakenvml.calls("nvmlInitWithFlags") == 2
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("WARNING", "NVML not available"),
        ("INFO", "NVML available again"),
    ]


def test_metrics_follow_the_naming_contract(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    # Software power cap and software thermal slowdown.
    doc["gpus"]["clocks_event_reasons"] = 0x4 | 0x20
    fakenvml.use_scenario(doc, tmp_path)
    collector = gpu_collector.create(nvml_context)
    collector.collect(fakenvml.tick())
    samples = collector.collect(fakenvml.tick(1.0))

    families = list(collector.metrics(samples))
    rendered = series(families)

    assert {f.name for f in families} == {
        "fabric_gpu_info", "fabric_gpu_lost", "fabric_gpu_utilization_ratio",
        "fabric_gpu_memory_utilization_ratio", "fabric_gpu_memory_used_bytes",
        "fabric_gpu_memory_total_bytes", "fabric_gpu_power_watts", "fabric_gpu_power_limit_watts",
        "fabric_gpu_energy_joules", "fabric_gpu_temperature_celsius", "fabric_gpu_clock_hertz",
        "fabric_gpu_pcie_transmit_bytes_per_second", "fabric_gpu_pcie_receive_bytes_per_second",
        "fabric_gpu_pcie_replays", "fabric_gpu_ecc_errors", "fabric_gpu_remapped_rows",
        "fabric_gpu_throttle_reason", "fabric_gpu_sm_occupancy_ratio",
        "fabric_gpu_tensor_active_ratio", "fabric_gpu_xid_errors", "fabric_gpu_critical_events",
    }  # fmt: skip
    info = {labels for (name, labels) in rendered if name == "fabric_gpu_info"}
    assert (
        frozenset(
            {
                "gpu": "3",
                "uuid": samples[3].uuid,
                "name": "NVIDIA H200",
                "pci_bus_id": "00000000:5D:00.0",
                "driver_version": "570.124.06",
            }.items()
        )
        in info
    )
    assert value(rendered, "fabric_gpu_utilization_ratio", gpu="0") == pytest.approx(0.91)
    assert value(rendered, "fabric_gpu_memory_used_bytes", gpu="0") == HGX["memory_used_bytes"]
    assert value(rendered, "fabric_gpu_power_watts", gpu="0") == 615
    assert value(rendered, "fabric_gpu_energy_joules_total", gpu="0") == samples[0].energy_joules
    assert value(rendered, "fabric_gpu_clock_hertz", gpu="0", clock="sm") == 1.98e9
    ecc = {"type": "corrected", "scope": "aggregate"}
    assert value(rendered, "fabric_gpu_ecc_errors_total", gpu="0", **ecc) == 2
    assert value(rendered, "fabric_gpu_remapped_rows", gpu="0", kind="pending") == 0
    assert value(rendered, "fabric_gpu_sm_occupancy_ratio", gpu="0") == pytest.approx(0.33)
    reasons = {
        dict(labels)["reason"]: v
        for (name, labels), v in rendered.items()
        if name == "fabric_gpu_throttle_reason" and dict(labels)["gpu"] == "0"
    }
    assert reasons["sw_power_cap"] == reasons["sw_thermal_slowdown"] == 1
    assert sum(reasons.values()) == 2 and len(reasons) == 9
