"""SummaryBuilder: per-interval rates and deltas from consecutive snapshots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.node.snapshot import Snapshot
from agent.node.uplink.summary import SummaryBuilder
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests.conftest import simulated_sampler
from tests.fakenvml import FakeNvml
from tests.node.api import NIC, QOS_CLASS, QOS_RECONCILE, gpu, nvlink, snapshot


def later(previous: Snapshot, seconds: float = 2.0, **sections: tuple[Any, ...]) -> Snapshot:
    """The next tick, `seconds` after `previous`, with the given sections replaced."""
    return dataclasses.replace(
        previous,
        seq=previous.seq + 1,
        started_wall_s=previous.started_wall_s + seconds,
        completed_wall_s=previous.completed_wall_s + seconds,
        sections={**previous.sections, **sections},
    )


def without(previous: Snapshot, name: str, seconds: float = 2.0) -> Snapshot:
    """The next tick with one collector's section missing (it failed)."""
    tick = later(previous, seconds)
    return dataclasses.replace(tick, sections={k: v for k, v in tick.sections.items() if k != name})


def gpu_summary(summary: pb.NodeSummary, index: int) -> pb.GpuSummary:
    return next(g for g in summary.gpus if g.index == index)


def nic_summary(summary: pb.NodeSummary, device: str) -> pb.NicSummary:
    return next(n for n in summary.nics if n.device == device)


def xids(message: pb.GpuSummary) -> dict[int, int]:
    return {x.xid: x.count for x in message.new_xids}


def test_first_call_reports_state_rates_it_carries_and_no_deltas() -> None:
    first = dataclasses.replace(
        snapshot(seq=7),
        sections={
            **snapshot().sections,
            "nvlink": (
                dataclasses.replace(nvlink(0, 0), gpm_transmit_bytes_per_second=1.5e9),
                nvlink(0, 1),
            ),
        },
    )

    summary = SummaryBuilder().next(first)

    assert summary.seq == first.seq
    assert summary.sampled_at.ToNanoseconds() == round(first.started_wall_s * 1e9)
    assert summary.interval.ToNanoseconds() == 1_000_000_000  # the nominal interval_s
    gpu0, gpu1 = gpu_summary(summary, 0), gpu_summary(summary, 1)
    assert gpu0.uuid == "GPU-00000000"
    assert gpu0.HasField("utilization_ratio") and gpu0.utilization_ratio == 0.0
    assert not gpu0.HasField("power_watts")
    assert gpu0.nvlink_links == 2 and list(gpu0.nvlink_links_down) == []
    assert gpu0.nvlink_transmit_bytes_per_second == 1.5e9  # GPM measures it itself
    assert gpu0.nvlink_receive_bytes_per_second == 0.0
    assert gpu0.nvlink_errors == 0
    # The lost GPU's XIDs predate the first summary: not new.
    assert gpu1.lost and not gpu1.HasField("utilization_ratio") and xids(gpu1) == {}
    assert gpu1.nvlink_links == 0
    eth0 = nic_summary(summary, "eth0")
    assert eth0.operstate == "up"
    assert (eth0.receive_bytes_per_second, eth0.errors, eth0.drops) == (0.0, 0, 0)
    [qos] = summary.qos_classes
    assert (qos.policy, qos.class_name, qos.device) == ("training", "bulk", "eth0")
    assert (qos.sent_bits_per_second, qos.drops) == (0.0, 0)
    assert summary.HasField("reconcile") and dict(summary.reconcile.passes) == {}


def test_rates_and_deltas_over_the_interval() -> None:
    builder = SummaryBuilder()
    first = snapshot()
    link0, link1 = nvlink(0, 0), nvlink(0, 1)
    second = later(
        first,
        seconds=2.0,
        gpu=(dataclasses.replace(gpu(0), utilization_gpu_ratio=0.75, power_watts=512.5),),
        nvlink=(
            dataclasses.replace(
                link0, transmit_bytes=link0.transmit_bytes + 2 * 10**9, replay_errors=3
            ),
            dataclasses.replace(
                link1,
                up=False,
                transmit_bytes=link1.transmit_bytes + 4 * 10**9,
                gpm_receive_bytes_per_second=7.0,
                crc_flit_errors=2,
            ),
        ),
        nic=(
            dataclasses.replace(
                NIC,
                receive_bytes=NIC.receive_bytes + 2000,
                transmit_bytes=NIC.transmit_bytes + 4000,
                receive_errors=1,
                transmit_errors=2,
                receive_drops=NIC.receive_drops + 4,
            ),
        ),
    )
    builder.next(first)

    summary = builder.next(second)

    assert summary.interval.ToNanoseconds() == 2_000_000_000
    gpu0 = gpu_summary(summary, 0)
    assert gpu0.utilization_ratio == 0.75 and gpu0.power_watts == 512.5
    assert gpu0.nvlink_transmit_bytes_per_second == 3e9  # (2 + 4) GB over 2 s
    assert gpu0.nvlink_receive_bytes_per_second == 7.0
    assert gpu0.nvlink_links == 2 and list(gpu0.nvlink_links_down) == [1]
    assert gpu0.nvlink_errors == 5  # 3 replays on link 0, 2 CRC flit errors on link 1
    assert [(e.link, e.errors) for e in gpu0.nvlink_link_errors] == [(0, 3), (1, 2)]
    eth0 = nic_summary(summary, "eth0")
    assert eth0.receive_bytes_per_second == 1000.0
    assert eth0.transmit_bytes_per_second == 2000.0
    assert (eth0.errors, eth0.drops) == (3, 4)


def test_new_xids_count_the_increase_and_new_xids_fully() -> None:
    builder = SummaryBuilder()
    first = later(snapshot(), gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 1),)),))
    second = later(first, gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 3), (31, 1))),))
    third = later(second)
    builder.next(first)

    assert xids(gpu_summary(builder.next(second), 0)) == {13: 2, 31: 1}
    assert xids(gpu_summary(builder.next(third), 0)) == {}


def test_gpu_falling_off_the_bus_is_lost_with_its_xid() -> None:
    builder = SummaryBuilder()
    first = snapshot()
    second = later(first, gpu=(gpu(0, lost=True), gpu(1, lost=True)), nvlink=())
    builder.next(first)

    gpu0 = gpu_summary(builder.next(second), 0)

    assert gpu0.lost and not gpu0.HasField("utilization_ratio")
    assert xids(gpu0) == {79: 2}
    assert gpu0.nvlink_links == 0


def test_qos_drops_rate_and_reconcile_deltas() -> None:
    builder = SummaryBuilder()
    first = later(
        snapshot(),
        qos=(QOS_CLASS,),
        qos_reconcile=(dataclasses.replace(QOS_RECONCILE, drift_corrections={"eth0": 1}),),
    )
    second = later(
        first,
        qos=(dataclasses.replace(QOS_CLASS, dropped_packets=11, rate_bps=8e6),),
        qos_reconcile=(
            dataclasses.replace(
                QOS_RECONCILE,
                results={"ok": 5, "error": 1},
                drift_corrections={"eth0": 2, "eth1": 1},
            ),
        ),
    )
    third = later(second)
    builder.next(first)

    summary = builder.next(second)

    [qos] = summary.qos_classes
    assert (qos.sent_bits_per_second, qos.drops) == (8e6, 10)
    assert dict(summary.reconcile.passes) == {"ok": 2, "error": 1}
    assert summary.reconcile.drift_corrections == 2
    quiet = builder.next(third)
    assert quiet.HasField("reconcile") and dict(quiet.reconcile.passes) == {}
    assert quiet.reconcile.drift_corrections == 0 and quiet.qos_classes[0].drops == 0


def test_counter_resets_count_from_zero_never_negative() -> None:
    builder = SummaryBuilder()
    first = later(
        snapshot(),
        gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 5),)),),
        nvlink=(dataclasses.replace(nvlink(0, 0), replay_errors=100),),
        nic=(dataclasses.replace(NIC, receive_bytes=10**12, receive_drops=50),),
        qos=(dataclasses.replace(QOS_CLASS, dropped_packets=500),),
        qos_reconcile=(dataclasses.replace(QOS_RECONCILE, drift_corrections={"eth0": 9}),),
    )
    # A GPU reset, an interface reset and an agent restart between the two ticks.
    second = later(
        first,
        gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 1),)),),
        nvlink=(dataclasses.replace(nvlink(0, 0), transmit_bytes=6000, replay_errors=4),),
        nic=(dataclasses.replace(NIC, receive_bytes=4000, receive_drops=2),),
        qos=(dataclasses.replace(QOS_CLASS, dropped_packets=7),),
        qos_reconcile=(
            dataclasses.replace(QOS_RECONCILE, results={"ok": 1}, drift_corrections={}),
        ),
    )
    builder.next(first)

    summary = builder.next(second)

    gpu0 = gpu_summary(summary, 0)
    assert xids(gpu0) == {13: 1}
    assert gpu0.nvlink_errors == 4
    assert gpu0.nvlink_transmit_bytes_per_second == 3000.0
    eth0 = nic_summary(summary, "eth0")
    assert (eth0.receive_bytes_per_second, eth0.drops) == (2000.0, 2)
    assert summary.qos_classes[0].drops == 7
    assert dict(summary.reconcile.passes) == {"ok": 1}
    assert summary.reconcile.drift_corrections == 0


def test_devices_appearing_start_from_their_own_counters() -> None:
    builder = SummaryBuilder()
    first = snapshot(nics=1)
    eth1 = dataclasses.replace(NIC, device="eth1", ifindex=3, receive_bytes=10**9)
    second = later(first, nic=(NIC, eth1))
    third = later(second, nic=(NIC, dataclasses.replace(eth1, receive_bytes=10**9 + 500)))
    builder.next(first)

    appeared = nic_summary(builder.next(second), "eth1")
    assert (appeared.receive_bytes_per_second, appeared.drops) == (0.0, 0)
    assert nic_summary(builder.next(third), "eth1").receive_bytes_per_second == 250.0


def test_devices_disappearing_are_forgotten() -> None:
    builder = SummaryBuilder()
    first = snapshot()
    gone = later(first, nic=(), gpu=(gpu(1, lost=True),), nvlink=())
    # Back with higher counters: a device seen anew, not a delta across its absence.
    back = later(
        gone,
        nic=(dataclasses.replace(NIC, receive_bytes=NIC.receive_bytes + 10**6),),
        gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 4),)), gpu(1, lost=True)),
        nvlink=(dataclasses.replace(nvlink(0, 0), replay_errors=8),),
    )
    builder.next(first)

    assert list(builder.next(gone).nics) == []
    summary = builder.next(back)

    assert nic_summary(summary, "eth0").receive_bytes_per_second == 0.0
    gpu0 = gpu_summary(summary, 0)
    assert xids(gpu0) == {} and gpu0.nvlink_errors == 0


def test_a_replaced_gpu_or_recreated_interface_is_a_new_device() -> None:
    builder = SummaryBuilder()
    first = later(snapshot(), gpu=(dataclasses.replace(gpu(0), xid_errors=((13, 1),)),))
    second = later(
        first,
        gpu=(dataclasses.replace(gpu(0), uuid="GPU-replaced", xid_errors=((48, 3),)),),
        nic=(dataclasses.replace(NIC, ifindex=9, receive_bytes=NIC.receive_bytes + 10**6),),
    )
    builder.next(first)

    summary = builder.next(second)

    assert xids(gpu_summary(summary, 0)) == {}
    assert nic_summary(summary, "eth0").receive_bytes_per_second == 0.0


def test_a_failed_collector_keeps_its_counters_for_the_next_tick() -> None:
    builder = SummaryBuilder()
    first = snapshot()
    failed = without(first, "nic", seconds=1.0)
    recovered = later(
        failed,
        seconds=3.0,
        nic=(dataclasses.replace(NIC, receive_bytes=NIC.receive_bytes + 8000, receive_drops=9),),
    )
    builder.next(first)

    assert list(builder.next(failed).nics) == []
    eth0 = nic_summary(builder.next(recovered), "eth0")

    # The gap's traffic over the 4 s since the last NIC reading, not lost and not new.
    assert eth0.receive_bytes_per_second == 2000.0
    assert eth0.drops == 6


def test_clock_stepping_back_falls_back_to_the_nominal_interval() -> None:
    builder = SummaryBuilder()
    first = snapshot()
    second = later(
        first,
        seconds=-5.0,
        nic=(dataclasses.replace(NIC, receive_bytes=NIC.receive_bytes + 100),),
    )
    builder.next(first)

    summary = builder.next(second)

    assert summary.interval.ToNanoseconds() == 1_000_000_000
    assert nic_summary(summary, "eth0").receive_bytes_per_second == 100.0


def test_simulated_node_summaries_from_the_real_collectors(
    fakenvml: FakeNvml, tmp_path: Path
) -> None:
    builder = SummaryBuilder()
    with simulated_sampler(fakenvml, tmp_path, "summary") as sampler:
        first = builder.next(sampler.sample(fakenvml.tick()))
        second = builder.next(sampler.sample(fakenvml.tick(advance_s=1.0)))

    assert second.seq == first.seq + 1
    assert [g.index for g in second.gpus] == list(range(8))
    for message in second.gpus:
        assert message.nvlink_links > 0
        # The simulated H200s measure NVLink rates with GPM from their second tick.
        assert message.nvlink_transmit_bytes_per_second > 0.0
        assert message.HasField("utilization_ratio")
    assert [n.device for n in second.nics] == ["lo"]
    assert second.nics[0].receive_bytes_per_second >= 0.0
