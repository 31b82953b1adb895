"""The NVLink collector against the fake NVML driver (real pynvml)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from agent.node.collectors import gpu as gpu_collector
from agent.node.collectors import nvlink as nvlink_collector
from agent.node.collectors.base import CollectorContext, Tick
from agent.node.collectors.nvlink import NvLinkSample
from agent.node.errors import CollectorError
from agent.node.families import Family
from tests.fakenvml import FakeNvml, scenario

NVLINK = scenario("hgx-h200-8gpu.json")["gpus"]["nvlink"]
SWITCHES = NVLINK["switch_pci_bus_ids"]


def by_link(samples: Iterable[NvLinkSample]) -> dict[tuple[int, int], NvLinkSample]:
    return {(s.gpu, s.link): s for s in samples}


def names(families: Iterable[Family]) -> dict[str, list[dict[str, str]]]:
    """Label sets by series name."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in families:
        for labels, _ in family.rows:
            found.setdefault(family.series_name, []).append(
                dict(zip(family.label_names, labels, strict=True))
            )
    return found


def test_samples_every_link_of_every_gpu(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    collector = nvlink_collector.create(nvml_context)

    samples = collector.collect(fakenvml.tick())

    assert len(samples) == 8 * 18
    assert [(s.gpu, s.link) for s in samples[:3]] == [(0, 0), (0, 1), (0, 2)]
    for s in samples:
        assert (s.up, s.version, s.remote_type, s.error) == (True, "4.0", "switch", None)
        assert s.remote_pci_bus_id == SWITCHES[NVLINK["link_switch"][s.link]]
        assert s.speed_bytes_per_second == 26_562_000_000
        assert (s.replay_errors, s.recovery_errors, s.crc_flit_errors, s.crc_data_errors) == (
            0, 0, 0, 0,
        )  # fmt: skip
        assert s.transmit_bytes is not None and s.transmit_bytes % 1024 == 0


def test_payload_counters_grow_at_the_scenario_rate(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    collector = nvlink_collector.create(nvml_context)

    first = by_link(collector.collect(fakenvml.tick()))
    second = by_link(collector.collect(fakenvml.tick(1.0)))

    for key, after in second.items():
        before = first[key]
        scale = 1 + 0.01 * after.gpu  # the fake's per-GPU rate spread
        assert after.transmit_bytes is not None and before.transmit_bytes is not None
        assert after.receive_bytes is not None and before.receive_bytes is not None
        tx = after.transmit_bytes - before.transmit_bytes
        rx = after.receive_bytes - before.receive_bytes
        assert tx == pytest.approx(NVLINK["tx_kib_per_s"] * scale * 1024, abs=1024)
        assert rx == pytest.approx(NVLINK["rx_kib_per_s"] * scale * 1024, abs=1024)
        # GPM measured the same interval.
        assert after.gpm_transmit_bytes_per_second == pytest.approx(tx, rel=1e-6)
        assert after.gpm_receive_bytes_per_second == pytest.approx(rx, rel=1e-6)
    assert all(s.gpm_transmit_bytes_per_second is None for s in first.values())


def test_both_collectors_share_one_field_value_call_per_gpu_per_tick(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    gpus = gpu_collector.create(nvml_context)
    links = nvlink_collector.create(nvml_context)
    gpus.collect(fakenvml.tick())  # opens the session (discovery reads the link count)
    fakenvml.reset_counts()
    results: dict[str, int] = {}

    def run(name: str, collect: Callable[[Tick], Sequence[object]], tick: Tick) -> None:
        results[name] = len(collect(tick))

    for _ in range(3):
        tick = fakenvml.tick(1.0)
        # As the sampler runs them: each collector in its own thread, the same tick.
        threads = [
            threading.Thread(target=run, args=("gpus", gpus.collect, tick)),
            threading.Thread(target=run, args=("links", links.collect, tick)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {"gpus": 8, "links": 144}

    assert fakenvml.calls("nvmlDeviceGetFieldValues") == 3 * 8
    assert fakenvml.calls("nvmlGpmSampleGet") == 3 * 8
    assert fakenvml.calls("nvmlGpmMetricsGet") == 3 * 8


def test_a_link_going_down_shows_state_errors_and_frozen_counters(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("nvlink-down.json")
    collector = nvlink_collector.create(nvml_context)
    before = by_link(collector.collect(fakenvml.tick()))
    remote_reads = fakenvml.calls("nvmlDeviceGetNvLinkRemotePciInfo_v2")

    down = by_link(collector.collect(fakenvml.tick(1.5)))
    later = by_link(collector.collect(fakenvml.tick(1.0)))

    assert before[(1, 7)].up is True
    link = down[(1, 7)]
    assert link.up is False and link.speed_bytes_per_second == 0
    errors = (link.replay_errors, link.recovery_errors, link.crc_flit_errors, link.crc_data_errors)
    assert errors == (5, 1, 120, 0)
    assert later[(1, 7)].transmit_bytes == link.transmit_bytes
    assert later[(1, 7)].gpm_transmit_bytes_per_second == 0
    assert all(s.up and s.replay_errors == 0 for key, s in later.items() if key != (1, 7))
    # Remote ends are read once per link, and again only for the link that changed state.
    assert remote_reads == 144
    assert fakenvml.calls("nvmlDeviceGetNvLinkRemotePciInfo_v2") == 145


def test_links_of_a_lost_gpu_are_left_out(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("gpu-lost.json")
    collector = nvlink_collector.create(nvml_context)
    assert len(collector.collect(fakenvml.tick())) == 144

    samples = collector.collect(fakenvml.tick(2.5))

    assert len(samples) == 7 * 18
    assert {s.gpu for s in samples} == {0, 1, 2, 4, 5, 6, 7}


def test_a_gpu_lost_before_start_up_has_no_links(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["events"] = [{"at_s": 0, "type": "gpu_lost", "gpu": 0}]
    fakenvml.use_scenario(doc, tmp_path)
    collector = nvlink_collector.create(nvml_context)

    samples = collector.collect(fakenvml.tick())

    assert {s.gpu for s in samples} == {1, 2, 3, 4, 5, 6, 7}


def test_failing_error_counters_leave_the_rest_of_the_link(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    doc["failures"] = [
        {"function": "nvmlDeviceGetNvLinkErrorCounter", "error": "unknown", "gpu": 6}
    ]
    fakenvml.use_scenario(doc, tmp_path)
    collector = nvlink_collector.create(nvml_context)

    links = by_link(collector.collect(fakenvml.tick()))

    failed = links[(6, 0)]
    assert failed.error == "GPU 6: nvmlDeviceGetNvLinkErrorCounter: Unknown Error"
    assert failed.replay_errors is None and failed.transmit_bytes is not None
    assert links[(5, 0)].error is None and links[(5, 0)].replay_errors == 0


def test_the_collector_fails_only_when_every_gpu_failed(
    nvml_context: CollectorContext, fakenvml: FakeNvml, tmp_path: Path
) -> None:
    doc = scenario("hgx-h200-8gpu.json")
    # From 1 s on, after discovery: GPUs still present whose field values cannot be read.
    doc["failures"] = [{"function": "nvmlDeviceGetFieldValues", "error": "unknown", "from_s": 1.0}]
    fakenvml.use_scenario(doc, tmp_path)
    links = nvlink_collector.create(nvml_context)
    gpus = gpu_collector.create(nvml_context)
    assert len(links.collect(fakenvml.tick())) == 144
    tick = fakenvml.tick(1.0)

    with pytest.raises(CollectorError, match="every GPU failed: GPU 0: nvmlDeviceGetFieldValues"):
        links.collect(tick)
    # The GPU collector loses only the memory temperature.
    samples = gpus.collect(tick)
    assert all(s.temperature_memory_celsius is None and s.power_watts for s in samples)
    assert samples[0].error == "GPU 0: nvmlDeviceGetFieldValues: Unknown Error"


def test_metrics_follow_the_naming_contract(
    nvml_context: CollectorContext, fakenvml: FakeNvml
) -> None:
    fakenvml.use("nvlink-down.json")
    collector = nvlink_collector.create(nvml_context)
    collector.collect(fakenvml.tick())
    samples = collector.collect(fakenvml.tick(1.5))

    rendered = names(collector.metrics(samples))

    assert set(rendered) == {
        "fabric_nvlink_info",
        "fabric_nvlink_up",
        "fabric_nvlink_speed_bytes_per_second",
        "fabric_nvlink_transmit_bytes_total",
        "fabric_nvlink_receive_bytes_total",
        "fabric_nvlink_errors_total",
        "fabric_nvlink_gpm_transmit_bytes_per_second",
        "fabric_nvlink_gpm_receive_bytes_per_second",
    }
    assert len(rendered["fabric_nvlink_transmit_bytes_total"]) == 144
    assert all(set(labels) == {"gpu", "link"} for labels in rendered["fabric_nvlink_up"])
    assert len(rendered["fabric_nvlink_errors_total"]) == 4 * 144
    assert {"gpu": "1", "link": "7", "type": "crc_flit"} in rendered["fabric_nvlink_errors_total"]
    assert {
        "gpu": "0",
        "link": "9",
        "version": "4.0",
        "remote_type": "switch",
        "remote_pci_bus_id": "00000000:07:00.0",
    } in rendered["fabric_nvlink_info"]
    families = {f.series_name: f for f in collector.metrics(samples)}
    up = dict(families["fabric_nvlink_up"].rows)
    errors = dict(families["fabric_nvlink_errors_total"].rows)
    assert up[("1", "7")] == 0 and up[("1", "6")] == 1
    assert errors[("1", "7", "crc_flit")] == 120
