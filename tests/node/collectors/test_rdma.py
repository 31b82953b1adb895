"""RDMA collector against the sysfs fixture tree (and copies of it bent out of shape)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from agent.node.collectors.base import SharedResources, Tick, registrations
from agent.node.collectors.rdma import (
    MAX_HW_COUNTERS,
    RDMA,
    RDMA_DEVICES,
    RdmaCollector,
    RdmaDeviceSample,
    RdmaPortSample,
)
from agent.node.config import AgentConfig
from tests import FIXTURES
from tests.exposition import exposed, series

FIXTURE_SYSFS = FIXTURES / "sysfs"
FIXTURE_IB = FIXTURE_SYSFS / "class" / "infiniband"


def tick() -> Tick:
    return Tick(seq=1, monotonic_s=time.monotonic(), wall_s=time.time())


@pytest.fixture
def sysfs_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture's infiniband class, for tests that break it."""
    root = tmp_path / "sysfs"
    shutil.copytree(FIXTURE_IB, root / "class" / "infiniband")
    return root


def ports(collector: RdmaCollector) -> tuple[RdmaPortSample, ...]:
    return RDMA.select(collector.collect(tick()))


def read_errors(collector: RdmaCollector) -> dict[str, int]:
    """One tick's devices and their read error counts so far."""
    return {d.device: d.read_errors for d in RDMA_DEVICES.select(collector.collect(tick()))}


def test_roce_and_infiniband_ports_from_the_fixture_tree() -> None:
    collector = RdmaCollector(FIXTURE_SYSFS)

    samples = collector.collect(tick())

    hw_counters = {
        "local_ack_timeout_err": 2,
        "np_cnp_sent": 2814573,
        "np_ecn_marked_roce_packets": 2815002,
        "out_of_buffer": 0,
        "out_of_sequence": 412,
        "packet_seq_err": 0,
        "rp_cnp_handled": 3190288,
        "rp_cnp_ignored": 0,
        "rx_read_requests": 3182,
        "rx_write_requests": 91372810554,
    }
    assert samples == (
        RdmaPortSample(
            device="mlx5_0",
            port=1,
            state="ACTIVE",
            link_layer="Ethernet",
            netdev="eth2",
            rate_bps=400_000_000_000,
            phys_state="LinkUp",
            receive_bytes=186726372958391 * 4,
            transmit_bytes=190583920467712 * 4,
            receive_packets=182214339821,
            transmit_packets=185978164320,
            transmit_discards=17,
            transmit_wait=0,
            receive_errors=0,
            symbol_errors=0,
            link_downed=1,
            link_error_recovery=0,
            local_link_integrity_errors=0,
            excessive_buffer_overrun_errors=0,
            cnp_sent=2814573,
            cnp_handled=3190288,
            ecn_marked_packets=2815002,
            out_of_buffer=0,
            hw_counters=MappingProxyType(hw_counters),
        ),
        RdmaPortSample(
            device="mlx5_1",
            port=1,
            state="ACTIVE",
            link_layer="InfiniBand",
            netdev=None,
            rate_bps=200_000_000_000,
            phys_state="LinkUp",
            receive_bytes=54120384712007 * 4,
            transmit_bytes=53987265109884 * 4,
            receive_packets=52854672180,
            transmit_packets=52723897764,
            unicast_receive_packets=52854670101,
            unicast_transmit_packets=52723895512,
            multicast_receive_packets=2079,
            multicast_transmit_packets=2252,
            transmit_discards=0,
            transmit_wait=1873512,
            receive_errors=0,
            symbol_errors=3,
            link_downed=0,
            link_error_recovery=1,
            local_link_integrity_errors=0,
            excessive_buffer_overrun_errors=0,
            receive_constraint_errors=0,
            transmit_constraint_errors=0,
        ),
        RdmaDeviceSample(
            device="mlx5_0",
            board_id="MT_0000000838",
            fw_version="28.39.1002",
            hca_type="MT4129",
            node_guid="a088:c203:00c8:1e2a",
            read_errors=0,
        ),
        RdmaDeviceSample(
            device="mlx5_1",
            board_id="MT_0000000838",
            fw_version="28.39.1002",
            hca_type="MT4129",
            node_guid="a088:c203:00c8:1e2b",
            read_errors=0,
        ),
    )


def test_no_infiniband_class_is_no_ports_not_an_error(tmp_path: Path) -> None:
    collector = RdmaCollector(tmp_path)

    assert collector.collect(tick()) == ()


def test_missing_counter_file_omits_that_value_only(sysfs_copy: Path) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_1/ports/1/counters/port_rcv_data"
    counter.unlink()
    collector = RdmaCollector(sysfs_copy)

    sample = ports(collector)[1]

    assert (sample.receive_bytes, sample.transmit_bytes) == (None, 53987265109884 * 4)
    assert read_errors(collector) == {"mlx5_0": 0, "mlx5_1": 0}


def test_unreadable_hw_counter_is_omitted_and_counted(sysfs_copy: Path) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_0/ports/1/hw_counters/np_cnp_sent"
    counter.unlink()
    counter.mkdir()  # reading it fails, as an I/O error would, even as root
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    port = RDMA.select(samples)[0]
    assert (port.cnp_sent, port.cnp_handled) == (None, 3190288)
    assert "np_cnp_sent" not in port.hw_counters and port.hw_counters["out_of_sequence"] == 412
    assert [(d.device, d.read_errors) for d in RDMA_DEVICES.select(samples)] == [
        ("mlx5_0", 1),
        ("mlx5_1", 0),
    ]


def test_read_errors_accumulate_over_ticks_and_stop_when_the_file_reads(
    sysfs_copy: Path,
) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_1/ports/1/counters/symbol_error"
    counter.unlink()
    counter.mkdir()
    collector = RdmaCollector(sysfs_copy)
    collector.collect(tick())
    collector.collect(tick())
    counter.rmdir()
    counter.write_text("4\n")

    samples = collector.collect(tick())

    assert RDMA.select(samples)[1].symbol_errors == 4
    assert RDMA_DEVICES.select(samples)[1].read_errors == 2


@pytest.mark.parametrize("text", ["N/A\n", "N/A (no PMA)\n"])
def test_counter_reading_not_available_is_omitted_not_counted(sysfs_copy: Path, text: str) -> None:
    (sysfs_copy / "class/infiniband/mlx5_0/ports/1/counters/symbol_error").write_text(text)
    collector = RdmaCollector(sysfs_copy)

    sample = ports(collector)[0]

    assert (sample.symbol_errors, sample.link_downed) == (None, 1)
    assert read_errors(collector)["mlx5_0"] == 0


@pytest.mark.parametrize("text", ["garbage\n", "-1\n", "18446744073709551616\n", "0x10\n"])
def test_counter_that_is_not_a_counter_is_omitted_and_counted(sysfs_copy: Path, text: str) -> None:
    (sysfs_copy / "class/infiniband/mlx5_0/ports/1/counters/symbol_error").write_text(text)
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    assert RDMA.select(samples)[0].symbol_errors is None
    assert RDMA.select(samples)[0].receive_packets == 182214339821
    assert RDMA_DEVICES.select(samples)[0].read_errors == 1


def test_largest_counter_is_kept_exactly(sysfs_copy: Path) -> None:
    (sysfs_copy / "class/infiniband/mlx5_0/ports/1/counters/port_xmit_packets").write_text(
        "18446744073709551615\n"
    )

    assert ports(RdmaCollector(sysfs_copy))[0].transmit_packets == 2**64 - 1


def test_port_whose_state_cannot_be_read_omits_only_that_port(sysfs_copy: Path) -> None:
    port = sysfs_copy / "class/infiniband/mlx5_0/ports/1"
    shutil.copytree(port, port.parent / "2")
    (port / "state").unlink()
    (port / "state").mkdir()
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    assert [(p.device, p.port) for p in RDMA.select(samples)] == [("mlx5_0", 2), ("mlx5_1", 1)]
    assert [d.read_errors for d in RDMA_DEVICES.select(samples)] == [1, 0]


def test_device_whose_ports_cannot_be_listed_omits_only_that_device(sysfs_copy: Path) -> None:
    ports_dir = sysfs_copy / "class/infiniband/mlx5_0/ports"
    shutil.rmtree(ports_dir)
    ports_dir.write_text("")  # listing it fails with ENOTDIR, also as root
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    assert [(p.device, p.port) for p in RDMA.select(samples)] == [("mlx5_1", 1)]
    assert [(d.device, d.fw_version, d.read_errors) for d in RDMA_DEVICES.select(samples)] == [
        ("mlx5_0", "28.39.1002", 1),
        ("mlx5_1", "28.39.1002", 0),
    ]


def test_port_directory_that_is_not_a_number_is_counted_and_skipped(sysfs_copy: Path) -> None:
    (sysfs_copy / "class/infiniband/mlx5_1/ports/lost+found").mkdir()
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    assert [(p.device, p.port) for p in RDMA.select(samples)] == [("mlx5_0", 1), ("mlx5_1", 1)]
    assert RDMA_DEVICES.select(samples)[1].read_errors == 1


def test_fifo_or_oversized_file_in_place_of_a_counter_is_counted_without_blocking(
    sysfs_copy: Path,
) -> None:
    counters = sysfs_copy / "class/infiniband/mlx5_1/ports/1/counters"
    (counters / "port_xmit_wait").unlink()
    os.mkfifo(counters / "port_xmit_wait")
    (counters / "symbol_error").write_text("1" * 5000)
    collector = RdmaCollector(sysfs_copy)
    result: list[tuple[RdmaPortSample | RdmaDeviceSample, ...]] = []

    # A read that blocked on the FIFO would hang the collector: run it where a hang fails.
    worker = threading.Thread(target=lambda: result.append(collector.collect(tick())))
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        # Unblock the reader so the test process can end, then fail.
        fd = os.open(counters / "port_xmit_wait", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO counter blocked the collector")

    (samples,) = result
    port = RDMA.select(samples)[1]
    assert (port.transmit_wait, port.symbol_errors, port.link_downed) == (None, None, 0)
    assert RDMA_DEVICES.select(samples)[1].read_errors == 2


def test_hw_counters_are_bounded_per_port_and_lifespan_is_no_counter(sysfs_copy: Path) -> None:
    hw = sysfs_copy / "class/infiniband/mlx5_0/ports/1/hw_counters"
    (hw / "lifespan").write_text("10\n")
    for i in range(300):
        (hw / f"zz_extra_{i:03}").write_text(f"{i}\n")
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    counters = RDMA.select(samples)[0].hw_counters
    assert len(counters) == MAX_HW_COUNTERS and "lifespan" not in counters
    # The first by name are read: the driver's own counters sort before the extras.
    assert counters["np_cnp_sent"] == 2814573 and counters["zz_extra_245"] == 245
    assert "zz_extra_246" not in counters
    assert RDMA_DEVICES.select(samples)[0].read_errors == 1


def test_hw_counter_that_is_not_an_integer_is_omitted_alone(sysfs_copy: Path) -> None:
    hw = sysfs_copy / "class/infiniband/mlx5_0/ports/1/hw_counters"
    (hw / "out_of_sequence").write_text("12.5\n")

    counters = ports(RdmaCollector(sysfs_copy))[0].hw_counters

    assert "out_of_sequence" not in counters and counters["packet_seq_err"] == 0


@pytest.mark.parametrize(
    ("rate", "bps"),
    [
        ("2.5 Gb/sec (1X SDR)\n", 2_500_000_000),
        ("56 Gb/sec (4X FDR)\n", 56_000_000_000),
        ("800 Gb/sec (4X XDR)\n", 800_000_000_000),
        ("0 GB/sec\n", 0),
    ],
)
def test_rate_in_gigabits_becomes_bits_per_second(sysfs_copy: Path, rate: str, bps: int) -> None:
    (sysfs_copy / "class/infiniband/mlx5_1/ports/1/rate").write_text(rate)

    assert ports(RdmaCollector(sysfs_copy))[1].rate_bps == bps


def test_rate_that_cannot_be_parsed_is_omitted_and_counted(sysfs_copy: Path) -> None:
    (sysfs_copy / "class/infiniband/mlx5_1/ports/1/rate").write_text("fast\n")
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    assert RDMA.select(samples)[1].rate_bps is None
    assert RDMA_DEVICES.select(samples)[1].read_errors == 1


def test_down_port_without_netdev_entry_or_rate(sysfs_copy: Path) -> None:
    port = sysfs_copy / "class/infiniband/mlx5_0/ports/1"
    (port / "state").write_text("1: DOWN\n")
    (port / "rate").unlink()
    shutil.rmtree(sysfs_copy / "class/infiniband/mlx5_0/device/net")

    sample = RdmaCollector(sysfs_copy).collect(tick())[0]

    assert (sample.state, sample.up, sample.rate_bps, sample.netdev) == ("DOWN", False, None, None)


def test_netdev_is_matched_by_port_index_on_a_dual_port_hca(sysfs_copy: Path) -> None:
    device = sysfs_copy / "class/infiniband/mlx5_0"
    shutil.copytree(device / "ports/1", device / "ports/2")
    net = device / "device/net"
    # Older drivers without dev_port give the port index in dev_id, in hex.
    (net / "eth3").mkdir()
    (net / "eth3/dev_id").write_text("0x1\n")

    samples = RdmaCollector(sysfs_copy).collect(tick())

    assert [(s.device, s.port, s.netdev) for s in samples[:2]] == [
        ("mlx5_0", 1, "eth2"),
        ("mlx5_0", 2, "eth3"),
    ]


def test_real_sysfs_layout_with_symlinked_devices(tmp_path: Path) -> None:
    """In /sys, class entries and `device` are symlinks into /sys/devices."""
    pci = tmp_path / "devices/pci0000:00/0000:00:01.0/0000:3b:00.0"
    (pci / "net").mkdir(parents=True)
    shutil.copytree(FIXTURE_IB / "mlx5_0/device/net/eth2", pci / "net/eth2")
    hca = pci / "infiniband/mlx5_0"
    shutil.copytree(FIXTURE_IB / "mlx5_0/ports", hca / "ports")
    (hca / "device").symlink_to("../../../0000:3b:00.0")
    (tmp_path / "class/infiniband").mkdir(parents=True)
    (tmp_path / "class/infiniband/mlx5_0").symlink_to(
        "../../devices/pci0000:00/0000:00:01.0/0000:3b:00.0/infiniband/mlx5_0"
    )

    (sample,) = ports(RdmaCollector(tmp_path))

    assert (sample.device, sample.netdev, sample.cnp_sent) == ("mlx5_0", "eth2", 2814573)


def test_metrics_use_the_contract_names_and_omit_absent_hw_counters() -> None:
    collector = RdmaCollector(FIXTURE_SYSFS)

    scraped = exposed(collector.metrics(collector.collect(tick())))

    roce = {"device": "mlx5_0", "port": "1"}
    ib = {"device": "mlx5_1", "port": "1"}
    expected = {
        series("fabric_rdma_port_receive_bytes_total", **roce): 186726372958391 * 4,
        series("fabric_rdma_port_transmit_bytes_total", **roce): 190583920467712 * 4,
        series("fabric_rdma_cnp_sent_total", **roce): 2814573,
        series("fabric_rdma_port_receive_packets_total", **roce): 182214339821,
        series("fabric_rdma_port_transmit_packets_total", **roce): 185978164320,
        series("fabric_rdma_port_transmit_discards_total", **roce): 17,
        series("fabric_rdma_port_receive_errors_total", **roce): 0,
        series("fabric_rdma_port_symbol_errors_total", **ib): 3,
        series("fabric_rdma_port_link_downed_total", **roce): 1,
        series("fabric_rdma_cnp_handled_total", **roce): 3190288,
        series("fabric_rdma_ecn_marked_packets_total", **roce): 2815002,
        series("fabric_rdma_out_of_buffer_total", **roce): 0,
        series("fabric_rdma_port_up", **ib): 1,
        series(
            "fabric_rdma_port_info",
            **roce,
            state="ACTIVE",
            phys_state="LinkUp",
            link_layer="Ethernet",
            netdev="eth2",
        ): 1,
        series(
            "fabric_rdma_port_info",
            **ib,
            state="ACTIVE",
            phys_state="LinkUp",
            link_layer="InfiniBand",
            netdev="",
        ): 1,
        series("fabric_rdma_port_transmit_wait_total", **ib): 1873512,
        series("fabric_rdma_port_link_error_recovery_total", **ib): 1,
        series("fabric_rdma_port_unicast_receive_packets_total", **ib): 52854670101,
        series("fabric_rdma_port_multicast_transmit_packets_total", **ib): 2252,
        series("fabric_rdma_port_receive_constraint_errors_total", **ib): 0,
        series("fabric_rdma_hw_stat_total", **roce, counter="out_of_sequence"): 412,
        series("fabric_rdma_hw_stat_total", **roce, counter="rx_write_requests"): 91372810554,
        series(
            "fabric_rdma_device_info",
            device="mlx5_1",
            board_id="MT_0000000838",
            fw_version="28.39.1002",
            hca_type="MT4129",
            node_guid="a088:c203:00c8:1e2b",
        ): 1,
        series("fabric_rdma_read_errors_total", device="mlx5_0"): 0,
        series("fabric_rdma_port_rate_bytes_per_second", **roce): 50e9,
    }
    assert {key: scraped.get(key) for key in expected} == expected
    assert not [key for key in scraped if key.startswith("fabric_rdma_cnp") and "mlx5_1" in key]
    # Counters the IB port's PMA has no file for are left out, not reported as 0.
    assert series("fabric_rdma_port_unicast_receive_packets_total", **roce) not in scraped


def test_registered_factory_reads_the_configured_sysfs_root() -> None:
    collector = registrations()["rdma"].create(
        AgentConfig(sysfs_root=FIXTURE_SYSFS), SharedResources()
    )

    assert collector.name == "rdma"
    assert [p.device for p in RDMA.select(collector.collect(tick()))] == ["mlx5_0", "mlx5_1"]


def test_hw_counters_directory_larger_than_any_sysfs_one_is_skipped_and_counted(
    sysfs_copy: Path,
) -> None:
    hw = sysfs_copy / "class/infiniband/mlx5_0/ports/1/hw_counters"
    for i in range(4097):
        (hw / f"extra_{i}").write_text("1\n")
    collector = RdmaCollector(sysfs_copy)

    samples = collector.collect(tick())

    port = RDMA.select(samples)[0]
    assert (dict(port.hw_counters), port.cnp_sent, port.link_downed) == ({}, None, 1)
    assert RDMA_DEVICES.select(samples)[0].read_errors == 1


def test_failing_reads_are_logged_when_they_start_and_when_they_stop(
    sysfs_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_1/ports/1/counters/symbol_error"
    counter.unlink()
    counter.mkdir()
    collector = RdmaCollector(sysfs_copy)

    with caplog.at_level("INFO", logger="agent.node.collectors.rdma"):
        collector.collect(tick())
        collector.collect(tick())
        counter.rmdir()
        counter.write_text("3\n")
        collector.collect(tick())
        collector.collect(tick())

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "mlx5_1" in messages[0] and "counters/symbol_error: cannot read" in messages[0]
    assert messages[1] == "RDMA device mlx5_1: every read succeeds again"
