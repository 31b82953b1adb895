"""The fake NVML driver, exercised through the real pynvml bindings."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pynvml
import pytest

from tests.fakenvml import SCENARIOS, FakeNvml, scenario

UINT_MAX = 0xFFFFFFFF
TX, RX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX


@contextmanager
def initialised(fake: FakeNvml, name: str | Path | None = None) -> Iterator[None]:
    if name is not None:
        fake.use(name)
    pynvml.nvmlInit()
    try:
        yield
    finally:
        pynvml.nvmlShutdown()


def handle(index: int) -> object:
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def field(index: int, field_id: int, scope: int = 0) -> pynvml.c_nvmlFieldValue_t:
    return pynvml.nvmlDeviceGetFieldValues(handle(index), [(field_id, scope)])[0]


def test_library_carries_the_driver_soname(fakenvml_library: Path) -> None:
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf")
    dynamic = subprocess.run(
        ["readelf", "-d", str(fakenvml_library)], check=True, capture_output=True, text=True
    ).stdout
    assert "Library soname: [libnvidia-ml.so.1]" in dynamic


@pytest.mark.parametrize(
    "name", sorted(p.name for p in SCENARIOS.glob("*.json") if p.name != "driver-not-loaded.json")
)
def test_every_shipped_scenario_loads(fakenvml: FakeNvml, name: str) -> None:
    with initialised(fakenvml, name):
        assert pynvml.nvmlDeviceGetCount() == 8
        assert pynvml.nvmlSystemGetDriverVersion() == "570.124.06"


def test_driver_not_loaded_scenario_fails_init(fakenvml: FakeNvml) -> None:
    fakenvml.use("driver-not-loaded.json")

    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()

    assert fakenvml.refcount() == 0


@pytest.mark.parametrize(
    "change",
    [
        {"gpus": {"count": 8, "colour": "green"}},
        {"unsupported": ["nvmlDeviceGetNoSuchThing"]},
        {"events": [{"at_s": 1, "type": "link_down", "gpu": 1}]},
        {"failures": [{"function": "nvmlDeviceGetPowerUsage", "error": "exploded"}]},
    ],
)
def test_invalid_scenarios_are_rejected(
    fakenvml: FakeNvml, tmp_path: Path, change: dict[str, object]
) -> None:
    fakenvml.use_scenario({**scenario("hgx-h200-8gpu.json"), **change}, tmp_path)

    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlInit()

    assert fakenvml.refcount() == 0


def test_malformed_json_is_rejected(fakenvml: FakeNvml, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"gpus": {"count": 8,}}')
    fakenvml.use(path)

    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlInit()


def test_identity_follows_the_hgx_layout(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        names = {pynvml.nvmlDeviceGetName(handle(i)) for i in range(8)}
        uuids = {pynvml.nvmlDeviceGetUUID(handle(i)) for i in range(8)}
        buses = [pynvml.nvmlDeviceGetPciInfo_v3(handle(i)) for i in range(8)]

    assert names == {"NVIDIA H200"}
    assert len(uuids) == 8 and all(u.startswith("GPU-") and len(u) == 40 for u in uuids)
    assert [b.bus for b in buses] == [0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB]
    assert buses[3].busId == "00000000:5D:00.0"
    assert buses[3].busIdLegacy == "0000:5d:00.0"
    assert buses[3].pciDeviceId == 0x233510DE


def test_memory_info_v1_counts_the_reservation_as_used(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        v1 = pynvml.nvmlDeviceGetMemoryInfo(handle(0))
        v2 = pynvml.nvmlDeviceGetMemoryInfo(handle(0), version=pynvml.nvmlMemory_v2)

    assert v1.total == v2.total == 150_754_820_096
    assert v1.used == v2.used + v2.reserved
    assert v2.free == v2.total - v2.reserved - v2.used


def test_counters_advance_at_the_scenario_rate(fakenvml: FakeNvml) -> None:
    rate_kib = scenario("hgx-h200-8gpu.json")["gpus"]["nvlink"]["tx_kib_per_s"]
    with initialised(fakenvml):
        before = field(2, TX, 5).value.ullVal
        energy_before = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle(2))
        power_mw = pynvml.nvmlDeviceGetPowerUsage(handle(2))

        fakenvml.advance(2.0)

        after = field(2, TX, 5).value.ullVal
        energy_after = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle(2))
        total = field(2, TX, UINT_MAX).value.ullVal
        per_link = sum(field(2, TX, link).value.ullVal for link in range(18))

    # Rates scale by 1% per GPU index.
    assert abs((after - before) - rate_kib * 1.02 * 2.0) <= 1
    assert energy_after - energy_before == pytest.approx(power_mw * 2.0, abs=1)
    assert total == pytest.approx(per_link, abs=18)


def test_field_values_report_errors_per_entry(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        values = pynvml.nvmlDeviceGetFieldValues(
            handle(0), [pynvml.NVML_FI_DEV_MEMORY_TEMP, (TX, 40), (999, 0), (RX, 17)]
        )

    assert [v.nvmlReturn for v in values] == [
        pynvml.NVML_SUCCESS,
        pynvml.NVML_ERROR_INVALID_ARGUMENT,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_SUCCESS,
    ]
    assert values[0].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    assert values[0].value.uiVal == 71 - 5  # GPU 0's deterministic offset is -5
    assert values[3].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG


def gpm_get(a: object, b: object, ids: list[int]) -> list[tuple[int, float]]:
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(ids)
    request.sample1, request.sample2 = a, b
    for i, metric_id in enumerate(ids):
        request.metrics[i].metricId = metric_id
    pynvml.nvmlGpmMetricsGet(request)
    return [(request.metrics[i].nvmlReturn, request.metrics[i].value) for i in range(len(ids))]


def test_gpm_rates_between_samples(fakenvml: FakeNvml) -> None:
    rx_kib = scenario("hgx-h200-8gpu.json")["gpus"]["nvlink"]["rx_kib_per_s"]
    with initialised(fakenvml):
        assert pynvml.nvmlGpmQueryDeviceSupport(handle(1)).isSupportedDevice == 1
        a, b = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
        pynvml.nvmlGpmSampleGet(handle(1), a)
        fakenvml.advance(0.05)
        pynvml.nvmlGpmSampleGet(handle(1), b)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            gpm_get(a, b, [pynvml.NVML_GPM_METRIC_SM_OCCUPANCY])
        fakenvml.advance(0.95)
        pynvml.nvmlGpmSampleGet(handle(1), b)
        metrics = gpm_get(a, b, [3, 5, 62 + 2 * 4, 63 + 2 * 4, 1000])
        pynvml.nvmlGpmSampleFree(a)
        pynvml.nvmlGpmSampleFree(b)

    occupancy, tensor, rx4, tx4, unknown = metrics
    assert occupancy == (pynvml.NVML_SUCCESS, 38 - 1)  # GPU 1's offset is -1
    assert tensor == (pynvml.NVML_SUCCESS, 62 - 1)
    assert rx4[1] == pytest.approx(rx_kib * 1.01 / 1024, rel=1e-6)
    assert tx4[1] > 0
    assert unknown[0] == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_events_are_delivered_once_per_set_in_time_order(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml, "xid-79.json"):
        sets = [pynvml.nvmlEventSetCreate(), pynvml.nvmlEventSetCreate()]
        for event_set in sets:
            for i in range(8):
                pynvml.nvmlDeviceRegisterEvents(
                    handle(i), pynvml.nvmlEventTypeXidCriticalError, event_set
                )
        started = time.monotonic()
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait_v2(sets[0], 100)
        waited = time.monotonic() - started

        fakenvml.advance(2.0)
        seen = []
        for event_set in sets:
            for _ in range(3):
                data = pynvml.nvmlEventSetWait_v2(event_set, 0)
                assert data.eventType == pynvml.nvmlEventTypeXidCriticalError
                seen.append((pynvml.nvmlDeviceGetIndex(data.device), data.eventData))
            with pytest.raises(pynvml.NVMLError_Timeout):
                pynvml.nvmlEventSetWait_v2(event_set, 0)
            pynvml.nvmlEventSetFree(event_set)

    assert 0.09 <= waited < 1.0
    assert seen == [(5, 79), (2, 13), (5, 79)] * 2


def test_a_blocked_wait_returns_when_time_reaches_the_event(fakenvml: FakeNvml) -> None:
    result: list[int] = []
    with initialised(fakenvml, "xid-79.json"):
        event_set = pynvml.nvmlEventSetCreate()
        pynvml.nvmlDeviceRegisterEvents(handle(5), pynvml.nvmlEventTypeXidCriticalError, event_set)

        def wait() -> None:
            result.append(pynvml.nvmlEventSetWait_v2(event_set, 10_000).eventData)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.05)
        started = time.monotonic()
        fakenvml.advance(1.0)
        waiter.join(timeout=5)
        elapsed = time.monotonic() - started
        pynvml.nvmlEventSetFree(event_set)

    assert result == [79]
    assert elapsed < 1.0


def test_a_lost_gpu_answers_gpu_is_lost(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml, "gpu-lost.json"):
        pynvml.nvmlDeviceGetPowerUsage(handle(3))
        fakenvml.advance(2.5)

        for call in (
            pynvml.nvmlDeviceGetPowerUsage,
            pynvml.nvmlDeviceGetUUID,
            lambda h: pynvml.nvmlDeviceGetFieldValues(h, [TX]),
            lambda h: pynvml.nvmlDeviceGetNvLinkErrorCounter(h, 0, 0),
        ):
            with pytest.raises(pynvml.NVMLError_GpuIsLost):
                call(handle(3))
        assert pynvml.nvmlDeviceGetPowerUsage(handle(2)) > 0


def test_a_link_that_goes_down_stops_counting_and_shows_errors(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml, "nvlink-down.json"):
        assert pynvml.nvmlDeviceGetNvLinkState(handle(1), 7) == 1
        fakenvml.advance(1.5)
        state = pynvml.nvmlDeviceGetNvLinkState(handle(1), 7)
        errors = [pynvml.nvmlDeviceGetNvLinkErrorCounter(handle(1), 7, c) for c in range(4)]
        before = field(1, TX, 7).value.ullVal
        fakenvml.advance(5.0)
        after = field(1, TX, 7).value.ullVal
        neighbour = pynvml.nvmlDeviceGetNvLinkState(handle(1), 6)
        speed = field(1, pynvml.NVML_FI_DEV_NVLINK_GET_SPEED, 7).value.uiVal

    assert state == 0 and neighbour == 1
    assert errors == [5, 1, 120, 0]
    assert after == before
    assert speed == 0


def test_remote_ends_are_the_nvswitches(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        remotes = [
            pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle(0), link).busId for link in (0, 5, 9, 17)
        ]
        kind = pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle(0), 0)
        version = pynvml.nvmlDeviceGetNvLinkVersion(handle(0), 0)

    assert remotes == [
        "00000000:05:00.0",
        "00000000:06:00.0",
        "00000000:07:00.0",
        "00000000:08:00.0",
    ]
    assert kind == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
    assert version == pynvml.NVML_NVLINK_VERSION_4_0


def test_unsupported_functions_and_fields(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml, "not-supported.json"):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetRemappedRows(handle(0))
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlGpmQueryDeviceSupport(handle(0))
        memory_temperature = field(0, pynvml.NVML_FI_DEV_MEMORY_TEMP)

    assert memory_temperature.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_injected_failures_hit_the_named_gpu(fakenvml: FakeNvml, tmp_path: Path) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["failures"] = [{"function": "nvmlDeviceGetPowerUsage", "error": "unknown", "gpu": 4}]
    fakenvml.use_scenario(doc, tmp_path)

    with initialised(fakenvml):
        with pytest.raises(pynvml.NVMLError_Unknown):
            pynvml.nvmlDeviceGetPowerUsage(handle(4))
        assert pynvml.nvmlDeviceGetPowerUsage(handle(5)) > 0


def test_call_counts(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        for i in range(3):
            pynvml.nvmlDeviceGetPowerUsage(handle(i))
        counted = fakenvml.calls("nvmlDeviceGetPowerUsage")
        fakenvml.reset_counts()

    assert counted == 3
    assert fakenvml.calls("nvmlDeviceGetPowerUsage") == 0
    assert fakenvml.calls("nvmlNeverCalled") == 0


def test_the_scenario_is_read_when_the_refcount_leaves_zero(
    fakenvml: FakeNvml, tmp_path: Path
) -> None:
    small = scenario("hgx-h200-8gpu.json")
    small["gpus"] = {
        **small["gpus"],
        "count": 2,
        "pci_bus_ids": ["00000000:18:00.0", "00000000:2A:00.0"],
    }
    with initialised(fakenvml):
        fakenvml.use_scenario(small, tmp_path)
        with initialised(fakenvml):  # nested init: refcount 1 -> 2, no reload
            nested = pynvml.nvmlDeviceGetCount()
    with initialised(fakenvml):
        reloaded = pynvml.nvmlDeviceGetCount()

    assert nested == 8
    assert reloaded == 2


def test_calls_after_shutdown_are_uninitialized(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        device = handle(0)

    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetPowerUsage(device)


def test_time_is_frozen_between_advances(fakenvml: FakeNvml) -> None:
    with initialised(fakenvml):
        start = fakenvml.now()
        time.sleep(0.02)
        unmoved = fakenvml.now()
        fakenvml.advance(1.5)

        assert unmoved == start
        assert math.isclose(fakenvml.now(), start + 1.5)
