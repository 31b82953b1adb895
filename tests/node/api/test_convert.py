"""agent/node/api/convert.py over real sample dataclasses, without gRPC."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest
from google.protobuf.message import Message

from agent.node.api import convert
from agent.node.collectors.base import sample_message
from agent.node.collectors.gpu import GpuSample
from agent.node.collectors.host import HostSample
from agent.node.collectors.jobs import JobSample
from agent.node.collectors.nic import NicSample
from agent.node.collectors.nvlink import NvLinkSample
from agent.node.collectors.qos import QosClassSample
from agent.node.collectors.rdma import RdmaPortSample
from agent.proto.fabric.v1 import telemetry_pb2
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from tests.node.api import snapshot

# Sample fields deliberately not on the wire; a new field must be added to the proto or
# here (this test fails otherwise).
NOT_EXPORTED: dict[type[Any], set[str]] = {GpuSample: {"critical_events"}}


@pytest.mark.parametrize(
    ("sample_type", "message_type"),
    [
        (GpuSample, telemetry_pb2.GpuSample),
        (NvLinkSample, telemetry_pb2.NvLinkSample),
        (NicSample, telemetry_pb2.NicSample),
        (RdmaPortSample, telemetry_pb2.RdmaPortSample),
        (HostSample, telemetry_pb2.HostSample),
        (QosClassSample, telemetry_pb2.QosClassSample),
        (JobSample, telemetry_pb2.JobSample),
    ],
)
def test_every_sample_field_is_on_the_wire(
    sample_type: type[Any], message_type: type[Message]
) -> None:
    sample_fields = {f.name for f in dataclasses.fields(sample_type)}

    missing = sample_fields - set(message_type.DESCRIPTOR.fields_by_name)

    assert missing == NOT_EXPORTED.get(sample_type, set())


def test_all_sections_when_none_requested() -> None:
    message = convert.snapshot_to_proto(snapshot(seq=42))

    assert (message.node_name, message.agent_version, message.seq) == ("gpu-node-7", "0.1.0", 42)
    assert message.interval_seconds == 1.0
    assert message.completed_unix_seconds == 1_764_140_000.5
    assert [g.index for g in message.gpus] == [0, 1]
    assert [(n.gpu, n.link) for n in message.nvlinks] == [(0, 0), (0, 1)]
    assert [n.device for n in message.nics] == ["eth0"]
    assert [r.device for r in message.rdma_ports] == ["mlx5_0"]
    assert len(message.host) == 1
    assert [q.class_name for q in message.qos_classes] == ["bulk"]
    assert [(j.job_id, list(j.gpu_indices)) for j in message.jobs] == [("42", [0])]
    assert [c.name for c in message.collectors] == [
        "gpu",
        "nvlink",
        "nic",
        "rdma",
        "host",
        "qos",
        "jobs",
        "other",
    ]
    assert message.collectors[-1].error == "boom"
    assert not message.collectors[-1].success


def test_values_units_and_unset_fields() -> None:
    message = convert.snapshot_to_proto(snapshot())

    healthy, lost = message.gpus
    assert healthy.HasField("utilization_gpu_ratio")
    assert healthy.utilization_gpu_ratio == 0.0
    assert healthy.memory_used_bytes == 80 * 2**30
    assert healthy.HasField("remapped_rows_pending")
    assert not healthy.HasField("power_watts")
    assert healthy.error == ""
    assert lost.lost
    assert lost.error == "GPU is lost"
    assert not lost.HasField("memory_used_bytes")
    assert list(lost.xid_errors) == [telemetry_pb2.XidCount(xid=79, count=2)]
    link = message.nvlinks[0]
    assert link.transmit_bytes == 2**63
    assert not link.HasField("receive_bytes")
    assert link.remote_pci_bus_id == ""
    assert not message.nics[0].HasField("speed_bps")
    assert message.nics[0].receive_drops == 3
    rdma = message.rdma_ports[0]
    assert rdma.rate_bps == 400 * 10**9
    assert rdma.HasField("cnp_sent")
    assert not rdma.HasField("cnp_handled")
    assert rdma.netdev == ""
    assert dict(message.host[0].cpu_seconds) == {"user": 10.5, "system": 2.25}
    qos = message.qos_classes[0]
    assert (qos.device, qos.policy, qos.minor, qos.dropped_packets) == ("eth0", "training", 20, 1)
    assert not qos.HasField("rate_bps")


def test_filtered_sections_and_their_collectors() -> None:
    message = convert.snapshot_to_proto(snapshot(), [pb.SECTION_NIC, pb.SECTION_QOS])

    assert [n.device for n in message.nics] == ["eth0"]
    assert len(message.qos_classes) == 1
    assert not message.gpus
    assert not message.nvlinks
    assert not message.rdma_ports
    assert not message.host
    assert [c.name for c in message.collectors] == ["nic", "qos"]


def test_sections_by_name_and_by_enum_add_up() -> None:
    by_name = convert.snapshot_to_proto(snapshot(), section_names=["qos", "nic"])
    by_enum = convert.snapshot_to_proto(snapshot(), [pb.SECTION_NIC, pb.SECTION_QOS])
    both = convert.snapshot_to_proto(snapshot(), [pb.SECTION_NIC], ["qos"])

    assert by_name == by_enum == both
    assert list(by_name.section_names) == ["nic", "qos"]


def test_the_api_serves_the_registered_sections_in_the_enums_order() -> None:
    message = convert.snapshot_to_proto(snapshot())

    assert list(message.section_names) == ["gpu", "nvlink", "nic", "rdma", "qos", "host", "jobs"]
    # The reconciler's counters are not exported: QosService reports on the reconciler.
    assert not message.sections


def test_an_unknown_name_is_refused_listing_the_agents_sections() -> None:
    with pytest.raises(convert.SectionError) as raised:
        convert.snapshot_to_proto(snapshot(), section_names=["gpu", "qos_reconcile"])

    assert raised.value.field == "section_names[1]"
    assert str(raised.value) == (
        "section_names[1]: unknown section 'qos_reconcile'; this agent has gpu, nvlink, nic, "
        "rdma, qos, host, jobs"
    )


def test_a_missing_section_is_empty() -> None:
    bare = dataclasses.replace(snapshot(), sections={"host": snapshot().section("host")})

    message = convert.snapshot_to_proto(bare)

    assert not message.gpus
    assert len(message.host) == 1


@pytest.mark.parametrize("bad", [pb.SECTION_UNSPECIFIED, 99])
def test_unknown_sections_are_refused(bad: int) -> None:
    with pytest.raises(convert.SectionError, match=f"unknown section {bad}"):
        convert.snapshot_to_proto(snapshot(), [pb.SECTION_GPU, bad])


def test_devices() -> None:
    found = convert.devices(snapshot(nics=2))

    assert [d.WhichOneof("kind") for d in found] == ["gpu", "gpu", "nic", "nic", "rdma_port"]
    assert found[0].gpu == pb.GpuDevice(
        index=0,
        uuid="GPU-00000000",
        name="NVIDIA H200",
        pci_bus_id="00000000:19:00.0",
        lost=False,
        nvlink_count=2,
    )
    assert found[1].gpu.lost
    assert found[1].gpu.nvlink_count == 0
    assert found[2].nic == pb.NicDevice(device="eth0", ifindex=2, operstate="up")
    assert found[3].nic.device == "eth1"
    assert found[4].rdma_port == pb.RdmaPortDevice(
        device="mlx5_0", port=1, state="ACTIVE", link_layer="Ethernet", rate_bps=400 * 10**9
    )


def test_pages() -> None:
    items = convert.devices(snapshot(nics=2))

    first, token = convert.page(items, 2, "")
    second, token2 = convert.page(items, 2, token)
    last, token3 = convert.page(items, 2, token2)

    assert first + second + last == items
    assert (len(first), len(second), len(last)) == (2, 2, 1)
    assert token3 == ""
    assert convert.page(items, 0, "") == (items, "")


@pytest.mark.parametrize("token", ["x", "-1", "99"])
def test_bad_page_token(token: str) -> None:
    with pytest.raises(convert.PageTokenError, match="page_token"):
        convert.page(convert.devices(snapshot()), 2, token)


def test_rdma_port_without_counters_leaves_them_unset_and_carries_its_hw_counters() -> None:
    # An i40iw without a PMA: no IB counters, only its hw_counters.
    port = RdmaPortSample(
        device="i40iw0",
        port=1,
        state="ACTIVE",
        link_layer="Ethernet",
        netdev="eno1",
        rate_bps=0,
        phys_state="LinkUp",
        hw_counters=MappingProxyType({"tcpRetransSegs": 41, "ip4InOctets": 2**40}),
    )

    message = sample_message(telemetry_pb2.RdmaPortSample, port)

    assert message.rate_bps == 0 and message.HasField("rate_bps")
    assert not message.HasField("receive_bytes") and not message.HasField("symbol_errors")
    assert message.phys_state == "LinkUp"
    assert dict(message.hw_counters) == {"tcpRetransSegs": 41, "ip4InOctets": 2**40}
