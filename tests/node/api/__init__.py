"""Tests of agent/node/api; `snapshot()` builds a snapshot of real sample dataclasses."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from agent.node.collectors.gpu import GpuSample
from agent.node.collectors.host import HostSample
from agent.node.collectors.jobs import JobSample
from agent.node.collectors.nic import NicSample
from agent.node.collectors.nvlink import NvLinkSample
from agent.node.collectors.qos import QosClassSample, QosReconcileSample
from agent.node.collectors.rdma import RdmaPortSample
from agent.node.snapshot import CollectorStatus, Snapshot


def gpu(index: int, *, lost: bool = False) -> GpuSample:
    return GpuSample(
        index=index,
        name="NVIDIA H200",
        uuid=f"GPU-{index:08x}",
        pci_bus_id=f"00000000:{0x19 + index:02x}:00.0",
        driver_version="570.86.15",
        lost=lost,
        error="GPU is lost" if lost else None,
        utilization_gpu_ratio=None if lost else 0.0,
        memory_used_bytes=None if lost else 80 * 2**30,
        temperature_gpu_celsius=None if lost else 41,
        remapped_rows_pending=None if lost else False,
        xid_errors=((79, 2),) if lost else (),
        critical_events=(("xid", 2),) if lost else (),
    )


def nvlink(gpu: int, link: int) -> NvLinkSample:
    return NvLinkSample(
        gpu=gpu,
        link=link,
        up=True,
        version="4",
        remote_type="switch",
        remote_pci_bus_id=None,
        speed_bytes_per_second=25 * 10**9,
        transmit_bytes=2**63,
        receive_bytes=None,
        replay_errors=0,
        recovery_errors=0,
        crc_flit_errors=None,
        crc_data_errors=None,
    )


NIC = NicSample(
    device="eth0",
    ifindex=2,
    operstate="up",
    mtu_bytes=9000,
    speed_bps=None,
    receive_bytes=123,
    transmit_bytes=456,
    receive_packets=1,
    transmit_packets=2,
    receive_errors=0,
    transmit_errors=0,
    receive_drops=3,
    transmit_drops=0,
)

RDMA = RdmaPortSample(
    device="mlx5_0",
    port=1,
    state="ACTIVE",
    link_layer="Ethernet",
    netdev=None,
    rate_bps=400 * 10**9,
    receive_bytes=10,
    transmit_bytes=20,
    receive_packets=1,
    transmit_packets=2,
    transmit_discards=0,
    receive_errors=0,
    symbol_errors=0,
    link_downed=1,
    cnp_sent=0,
    cnp_handled=None,
    ecn_marked_packets=None,
    out_of_buffer=None,
)

HOST = HostSample(
    cpu_seconds=MappingProxyType({"user": 10.5, "system": 2.25}),
    memory_total_bytes=2 * 2**40,
    memory_available_bytes=2**40,
    load1=0.5,
    load5=0.25,
    load15=0.125,
)

QOS_CLASS = QosClassSample(
    device="eth0",
    policy="training",
    class_name="bulk",
    minor=20,
    sent_bytes=1000,
    sent_packets=10,
    dropped_packets=1,
    overlimits=2,
    backlog_bytes=0,
    rate_bps=None,
)

QOS_RECONCILE = QosReconcileSample(results={"ok": 3}, drift_corrections={})

# Job 42 holds GPU 0 (named by index) and names a MIG instance the agent does not know.
JOB = JobSample(
    scheduler="slurm",
    job_id="42",
    user="alice",
    gpus=("0", "MIG-00000000-0000-0000-0000-000000000001"),
    expires_unix_seconds=1_764_143_600.0,
    gpu_indices=(0,),
    gpu_uuids=("GPU-00000000",),
    unmatched_gpus=("MIG-00000000-0000-0000-0000-000000000001",),
)

COLLECTORS = ("gpu", "nvlink", "nic", "rdma", "host", "qos", "jobs")


def snapshot(seq: int = 1, *, nics: int = 1) -> Snapshot:
    """Two GPUs (the second lost) with two NVLinks on the first, then `nics` NICs (all
    but the first named eth<i>), an RDMA port, the host, a QoS class and a job on GPU 0."""
    extra_nics = tuple(
        dataclasses.replace(NIC, device=f"eth{i}", ifindex=2 + i) for i in range(1, nics)
    )
    return Snapshot(
        node_name="gpu-node-7",
        agent_version="0.1.0",
        seq=seq,
        interval_s=1.0,
        started_wall_s=1_764_140_000.25,
        completed_wall_s=1_764_140_000.5,
        sections={
            "gpu": (gpu(0), gpu(1, lost=True)),
            "nvlink": (nvlink(0, 0), nvlink(0, 1)),
            "nic": (NIC, *extra_nics),
            "rdma": (RDMA,),
            "host": (HOST,),
            "qos": (QOS_CLASS,),
            "qos_reconcile": (QOS_RECONCILE,),
            "jobs": (JOB,),
        },
        collectors=(
            *(CollectorStatus(name, True, 0.01, samples=1) for name in COLLECTORS),
            CollectorStatus("other", success=False, duration_s=0.5, error="boom"),
        ),
    )
