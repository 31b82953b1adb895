"""RDMA collector against the sysfs fixture tree (and copies of it bent out of shape)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from agent.node.collectors.base import SharedResources, Tick, registrations
from agent.node.collectors.rdma import RdmaCollector, RdmaPortSample
from agent.node.config import AgentConfig
from agent.node.errors import CollectorError
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


def test_roce_and_infiniband_ports_from_the_fixture_tree() -> None:
    collector = RdmaCollector(FIXTURE_SYSFS)

    samples = collector.collect(tick())

    assert samples == (
        RdmaPortSample(
            device="mlx5_0",
            port=1,
            state="ACTIVE",
            link_layer="Ethernet",
            netdev="eth2",
            rate_bps=400_000_000_000,
            receive_bytes=186726372958391 * 4,
            transmit_bytes=190583920467712 * 4,
            receive_packets=182214339821,
            transmit_packets=185978164320,
            transmit_discards=17,
            receive_errors=0,
            symbol_errors=0,
            link_downed=1,
            cnp_sent=2814573,
            cnp_handled=3190288,
            ecn_marked_packets=2815002,
            out_of_buffer=0,
        ),
        RdmaPortSample(
            device="mlx5_1",
            port=1,
            state="ACTIVE",
            link_layer="InfiniBand",
            netdev=None,
            rate_bps=200_000_000_000,
            receive_bytes=54120384712007 * 4,
            transmit_bytes=53987265109884 * 4,
            receive_packets=52854672180,
            transmit_packets=52723897764,
            transmit_discards=0,
            receive_errors=0,
            symbol_errors=3,
            link_downed=0,
            cnp_sent=None,
            cnp_handled=None,
            ecn_marked_packets=None,
            out_of_buffer=None,
        ),
    )


def test_no_infiniband_class_is_no_ports_not_an_error(tmp_path: Path) -> None:
    collector = RdmaCollector(tmp_path)

    assert collector.collect(tick()) == ()


def test_missing_counter_file_raises_naming_it(sysfs_copy: Path) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_1/ports/1/counters/port_rcv_data"
    counter.unlink()

    with pytest.raises(CollectorError, match=r"mlx5_1/ports/1/counters/port_rcv_data"):
        RdmaCollector(sysfs_copy).collect(tick())


def test_unreadable_hw_counter_raises_instead_of_reading_as_absent(sysfs_copy: Path) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_0/ports/1/hw_counters/np_cnp_sent"
    counter.unlink()
    counter.mkdir()  # reading it fails with EISDIR, as an I/O error would

    with pytest.raises(CollectorError, match=r"hw_counters/np_cnp_sent: cannot read"):
        RdmaCollector(sysfs_copy).collect(tick())


def test_counter_that_is_not_a_number_raises_naming_it(sysfs_copy: Path) -> None:
    counter = sysfs_copy / "class/infiniband/mlx5_0/ports/1/counters/symbol_error"
    counter.write_text("N/A\n")

    with pytest.raises(CollectorError, match=r"counters/symbol_error: .*'N/A'"):
        RdmaCollector(sysfs_copy).collect(tick())


@pytest.mark.parametrize(
    ("rate", "bps"),
    [
        ("2.5 Gb/sec (1X SDR)\n", 2_500_000_000),
        ("56 Gb/sec (4X FDR)\n", 56_000_000_000),
        ("800 Gb/sec (4X XDR)\n", 800_000_000_000),
    ],
)
def test_rate_in_gigabits_becomes_bits_per_second(sysfs_copy: Path, rate: str, bps: int) -> None:
    (sysfs_copy / "class/infiniband/mlx5_1/ports/1/rate").write_text(rate)

    samples = RdmaCollector(sysfs_copy).collect(tick())

    assert samples[1].rate_bps == bps


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

    (sample,) = RdmaCollector(tmp_path).collect(tick())

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
            "fabric_rdma_port_info", **roce, state="ACTIVE", link_layer="Ethernet", netdev="eth2"
        ): 1,
        series(
            "fabric_rdma_port_info", **ib, state="ACTIVE", link_layer="InfiniBand", netdev=""
        ): 1,
        series("fabric_rdma_port_rate_bytes_per_second", **roce): 50e9,
    }
    assert {key: scraped.get(key) for key in expected} == expected
    assert not [key for key in scraped if key.startswith("fabric_rdma_cnp") and "mlx5_1" in key]


def test_registered_factory_reads_the_configured_sysfs_root() -> None:
    collector = registrations()["rdma"].create(
        AgentConfig(sysfs_root=FIXTURE_SYSFS), SharedResources()
    )

    assert collector.name == "rdma"
    assert len(collector.collect(tick())) == 2
