"""The RDMA collector on the sysfs layouts real HCAs expose: one fixture root per driver
under tests/fixtures/rdma/, each asserted value by value with units converted."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from agent.node.collectors.base import Tick
from agent.node.collectors.rdma import (
    RDMA,
    RDMA_DEVICES,
    RdmaCollector,
    RdmaDeviceSample,
    RdmaPortSample,
)
from tests import FIXTURES
from tests.exposition import exposed, series

LAYOUTS = FIXTURES / "rdma"


def tick() -> Tick:
    return Tick(seq=1, monotonic_s=time.monotonic(), wall_s=time.time())


def collect(
    layout: str,
) -> tuple[RdmaCollector, tuple[RdmaPortSample | RdmaDeviceSample, ...]]:
    collector = RdmaCollector(LAYOUTS / layout)
    return collector, tuple(collector.collect(tick()))


def test_mlx4_prefers_counters_ext_and_omits_the_files_each_port_lacks() -> None:
    _, samples = collect("mlx4")

    port1, port2 = RDMA.select(samples)
    # counters/ holds saturated 32-bit values (4294967295); counters_ext/ the 64-bit ones.
    assert (port1.device, port1.port, port1.state, port1.phys_state) == (
        "mlx4_0",
        1,
        "ACTIVE",
        "LinkUp",
    )
    assert port1.rate_bps == 56_000_000_000
    assert port1.receive_bytes == 9381275638242 * 4
    assert port1.transmit_bytes == 8713312000513 * 4
    assert (port1.receive_packets, port1.transmit_packets) == (13102920392, 12500313017)
    assert (port1.unicast_receive_packets, port1.unicast_transmit_packets) == (
        13100211000,
        12498000117,
    )
    assert (port1.multicast_receive_packets, port1.multicast_transmit_packets) == (
        2709392,
        2312900,
    )
    assert port1.symbol_errors is None
    assert (port1.transmit_wait, port1.transmit_discards, port1.receive_errors) == (918273, 3, 1)
    assert (port1.link_downed, port1.link_error_recovery) == (2, 5)
    assert port1.local_link_integrity_errors == 4
    # Port 2: down, no counters_ext/, five counters missing from counters/.
    assert (port2.port, port2.state, port2.phys_state, port2.rate_bps) == (
        2,
        "DOWN",
        "Polling",
        10_000_000_000,
    )
    assert (port2.receive_bytes, port2.transmit_bytes, port2.transmit_wait) == (0, 0, 0)
    missing = (
        port2.receive_packets,
        port2.transmit_packets,
        port2.transmit_discards,
        port2.receive_errors,
        port2.symbol_errors,
    )
    assert missing == (None, None, None, None, None)
    assert RDMA_DEVICES.select(samples) == (
        RdmaDeviceSample(
            device="mlx4_0",
            board_id="MT_1090120019",
            fw_version="2.42.5000",
            hca_type="MT4099",
            node_guid="0002:c903:00a1:b2c0",
            read_errors=0,
        ),
    )


def test_mlx4_exposition_leaves_out_exactly_the_missing_series() -> None:
    collector, samples = collect("mlx4")

    scraped = exposed(collector.metrics(samples))

    port1 = {"device": "mlx4_0", "port": "1"}
    port2 = {"device": "mlx4_0", "port": "2"}
    assert scraped[series("fabric_rdma_port_receive_bytes_total", **port1)] == 37525102552968
    assert scraped[series("fabric_rdma_port_transmit_wait_total", **port1)] == 918273
    assert scraped[series("fabric_rdma_port_up", **port2)] == 0
    assert scraped[series("fabric_rdma_port_rate_bytes_per_second", **port1)] == 7e9
    assert series("fabric_rdma_port_symbol_errors_total", **port1) not in scraped
    for name in ("receive_packets", "transmit_packets", "transmit_discards", "receive_errors"):
        assert series(f"fabric_rdma_port_{name}_total", **port2) not in scraped
    assert scraped[series("fabric_rdma_read_errors_total", device="mlx4_0")] == 0


def test_i40iw_without_pma_reports_its_port_and_hw_counters_but_no_pma_counters() -> None:
    collector, samples = collect("i40iw")

    (port,) = RDMA.select(samples)
    assert (port.device, port.state, port.phys_state, port.link_layer, port.netdev) == (
        "i40iw0",
        "ACTIVE",
        "LinkUp",
        "Ethernet",
        "eno1",
    )
    assert port.rate_bps == 10_000_000_000
    # Every counters/ file reads "N/A (no PMA)": all left out, none counted as an error.
    assert (port.receive_bytes, port.symbol_errors, port.transmit_wait) == (None, None, None)
    assert dict(port.hw_counters) == {
        "ip4InDiscards": 0,
        "ip4InOctets": 2881935140,
        "ip4InPkts": 3418072,
        "ip4InReasmRqd": 0,
        "ip4OutOctets": 2210349984,
        "ip4OutPkts": 2986001,
        "iwInRdmaReads": 20411,
        "iwInRdmaWrites": 1201118,
        "iwOutRdmaReads": 20407,
        "iwOutRdmaWrites": 1199870,
        "tcpInSegs": 3418066,
        "tcpOutSegs": 2985990,
        "tcpRetransSegs": 41,
    }
    assert RDMA_DEVICES.select(samples) == (
        RdmaDeviceSample("i40iw0", "I40IW Board ID", "0.2", "I40IW", "a4bf:0160:d9a1:0000", 0),
    )
    scraped = exposed(collector.metrics(samples))
    assert not [key for key in scraped if key.startswith("fabric_rdma_port_receive")]
    hw = {"device": "i40iw0", "port": "1"}
    assert scraped[series("fabric_rdma_hw_stat_total", **hw, counter="tcpRetransSegs")] == 41


def test_irdma_port_without_counters_directory() -> None:
    _, samples = collect("irdma")

    (port,) = RDMA.select(samples)
    assert (port.device, port.port, port.state, port.netdev, port.rate_bps) == (
        "rocep202s0f0",
        1,
        "ACTIVE",
        "ens2f0",
        100_000_000_000,
    )
    assert port.receive_bytes is None and port.link_downed is None
    assert len(port.hw_counters) == 19 and "lifespan" not in port.hw_counters
    assert (port.hw_counters["cnpSent"], port.hw_counters["RxECNMrkd"]) == (57998, 58112)
    assert port.hw_counters["ip4InOctets"] == 1026341880931
    # irdma has no board_id or hca_type.
    assert RDMA_DEVICES.select(samples) == (
        RdmaDeviceSample("rocep202s0f0", None, "1.57", None, "b696:91ff:fe9f:8a40", 0),
    )


def test_mlx5_roce_hw_counters_and_an_empty_cage() -> None:
    collector, samples = collect("mlx5-roce")

    active, empty = RDMA.select(samples)
    assert (active.device, active.rate_bps, active.netdev) == (
        "mlx5_2",
        100_000_000_000,
        "ens1f0np0",
    )
    assert (active.receive_bytes, active.transmit_bytes) == (31415926535 * 4, 27182818284 * 4)
    assert (active.unicast_receive_packets, active.multicast_transmit_packets) == (27182000, 826)
    assert (active.cnp_sent, active.cnp_handled) == (120443, 98012)
    assert (active.ecn_marked_packets, active.out_of_buffer) == (121002, 12)
    assert len(active.hw_counters) == 29
    expected_hw = {
        "rp_cnp_ignored": 5,
        "local_ack_timeout_err": 7,
        "out_of_sequence": 96,
        "packet_seq_err": 4,
        "roce_adp_retrans": 19,
        "roce_adp_retrans_to": 2,
        "duplicate_request": 3,
        "rx_write_requests": 88120349,
    }
    assert {name: active.hw_counters[name] for name in expected_hw} == expected_hw
    # "0 GB/sec": no link, reported as rate 0 rather than a parse failure.
    assert (empty.device, empty.state, empty.phys_state, empty.rate_bps, empty.up) == (
        "mlx5_3",
        "DOWN",
        "Disabled",
        0,
        False,
    )
    assert [d.read_errors for d in RDMA_DEVICES.select(samples)] == [0, 0]
    scraped = exposed(collector.metrics(samples))
    cage = {"device": "mlx5_3", "port": "1"}
    assert scraped[series("fabric_rdma_port_rate_bytes_per_second", **cage)] == 0
    info = series(
        "fabric_rdma_port_info",
        **cage,
        state="DOWN",
        phys_state="Disabled",
        link_layer="Ethernet",
        netdev="ens1f1np1",
    )
    assert scraped[info] == 1
    roce = {"device": "mlx5_2", "port": "1"}
    assert scraped[series("fabric_rdma_hw_stat_total", **roce, counter="roce_adp_retrans")] == 19


def test_hfi1_omni_path_port() -> None:
    _, samples = collect("hfi1")

    (port,) = RDMA.select(samples)
    assert (port.device, port.link_layer, port.rate_bps, port.phys_state) == (
        "hfi1_0",
        "InfiniBand",
        100_000_000_000,
        "LinkUp",
    )
    assert (port.receive_bytes, port.transmit_bytes) == (345788313 * 4, 273346428 * 4)
    assert (port.receive_packets, port.transmit_wait) == (638036947, 52)
    assert dict(port.hw_counters) == {
        "RxPkt": 638036947,
        "RxWords": 2766306504,
        "TxDropped": 0,
        "TxPkt": 638036947,
        "TxWait": 52,
        "TxWords": 2186771424,
    }
    (device,) = RDMA_DEVICES.select(samples)
    assert device.board_id == "Intel Omni-Path Host Fabric Interface Adapter 100 Series"
    assert (device.fw_version, device.hca_type, device.read_errors) == ("1.27.0", None, 0)


@pytest.mark.parametrize(
    ("layout", "ports", "series_count"),
    [
        ("mlx4", 2, 34),
        ("i40iw", 1, 18),
        ("irdma", 1, 24),
        ("mlx5-roce", 2, 112),
        ("hfi1", 1, 29),
    ],
)
def test_series_per_layout(layout: str, ports: int, series_count: int) -> None:
    """How many series each layout gives: a change here is a change in what is read."""
    collector, samples = collect(layout)

    scraped = exposed(collector.metrics(samples))

    assert (len(RDMA.select(samples)), len(scraped)) == (ports, series_count)


def test_one_odd_hca_leaves_the_others_reported(tmp_path: Path) -> None:
    """An i40iw management NIC, an old mlx4 and an unreadable device beside ConnectX-6s."""
    ib = tmp_path / "class/infiniband"
    for layout in ("mlx4", "i40iw", "mlx5-roce"):
        shutil.copytree(LAYOUTS / layout / "class/infiniband", ib, dirs_exist_ok=True)
    broken = ib / "mlx5_9"
    broken.mkdir()
    (broken / "ports").write_text("")
    collector = RdmaCollector(tmp_path)

    samples = collector.collect(tick())

    assert [(p.device, p.port) for p in RDMA.select(samples)] == [
        ("i40iw0", 1),
        ("mlx4_0", 1),
        ("mlx4_0", 2),
        ("mlx5_2", 1),
        ("mlx5_3", 1),
    ]
    assert {d.device: d.read_errors for d in RDMA_DEVICES.select(samples)} == {
        "i40iw0": 0,
        "mlx4_0": 0,
        "mlx5_2": 0,
        "mlx5_3": 0,
        "mlx5_9": 1,
    }
