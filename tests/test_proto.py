"""The committed generated code under agent/proto matches proto/, and a Snapshot
round-trips through the wire format."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path
from types import ModuleType

from agent.proto.fabric.v1 import telemetry_pb2


def _load_generator() -> ModuleType:
    """proto/generate.py, the generator `make proto` runs (a dev tool, not in the package)."""
    path = Path(__file__).resolve().parents[1] / "proto" / "generate.py"
    spec = importlib.util.spec_from_file_location("proto_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["proto_generate"] = module
    spec.loader.exec_module(module)
    return module


_codegen = _load_generator()


def test_committed_code_is_current(tmp_path: Path) -> None:
    _codegen.generate(tmp_path)

    fresh = _codegen.generated_files(tmp_path)
    committed = _codegen.generated_files(_codegen.OUT_ROOT)

    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"generated code under agent/proto is stale, run `make proto`: {stale}"
    assert "fabric/v1/telemetry_pb2.py" in committed
    assert "fabric/v1/telemetry_pb2.pyi" in committed


def _snapshot() -> telemetry_pb2.Snapshot:
    return telemetry_pb2.Snapshot(
        node_name="gpu-node-7",
        agent_version="0.1.0",
        seq=42,
        interval_seconds=1.0,
        started_unix_seconds=1_764_140_000.25,
        completed_unix_seconds=1_764_140_000.5,
        collectors=[
            telemetry_pb2.CollectorStatus(name="gpu", success=True, duration_seconds=0.012),
            telemetry_pb2.CollectorStatus(name="rdma", success=False, error="no such device"),
        ],
        gpus=[
            telemetry_pb2.GpuSample(
                index=0,
                name="NVIDIA H200",
                uuid="GPU-0f0e0d0c",
                pci_bus_id="00000000:19:00.0",
                utilization_gpu_ratio=0.0,
                memory_used_bytes=80 * 2**30,
                temperature_gpu_celsius=-1,
                remapped_rows_pending=False,
                xid_errors=[telemetry_pb2.XidCount(xid=79, count=2)],
            )
        ],
        nvlinks=[
            telemetry_pb2.NvLinkSample(
                gpu=0, link=17, up=True, version="4", remote_type="switch", transmit_bytes=2**63
            )
        ],
        nics=[
            telemetry_pb2.NicSample(
                device="eth0", ifindex=2, operstate="up", mtu_bytes=9000, receive_bytes=123
            )
        ],
        rdma_ports=[
            telemetry_pb2.RdmaPortSample(
                device="mlx5_0", port=1, state="ACTIVE", link_layer="Ethernet", cnp_sent=0
            )
        ],
        host=[
            telemetry_pb2.HostSample(
                cpu_seconds={"user": 10.5, "system": 2.25},
                memory_total_bytes=2 * 2**40,
                load1=0.5,
            )
        ],
    )


def test_snapshot_round_trips() -> None:
    snapshot = _snapshot()

    decoded = telemetry_pb2.Snapshot.FromString(snapshot.SerializeToString())

    assert decoded == snapshot
    gpu = decoded.gpus[0]
    # Set to the default value, an `optional` field is still present on the wire...
    assert gpu.HasField("utilization_gpu_ratio")
    assert gpu.utilization_gpu_ratio == 0.0
    assert gpu.HasField("remapped_rows_pending")
    assert gpu.temperature_gpu_celsius == -1
    assert decoded.rdma_ports[0].HasField("cnp_sent")
    # ...and one never set stays unset rather than reading as a zero measurement.
    assert not gpu.HasField("power_watts")
    assert not gpu.HasField("ecc_uncorrected_volatile")
    assert not decoded.nics[0].HasField("speed_bps")
    assert not decoded.rdma_ports[0].HasField("rate_bps")
    assert not decoded.nvlinks[0].HasField("receive_bytes")
    assert decoded.nvlinks[0].transmit_bytes == 2**63
    assert list(gpu.xid_errors) == [telemetry_pb2.XidCount(xid=79, count=2)]
    assert dict(decoded.host[0].cpu_seconds) == {"user": 10.5, "system": 2.25}
    assert decoded.collectors[1].error == "no such device"


def test_messages_live_in_the_agent_package() -> None:
    # The class module is rewritten from protoc's `fabric.v1...` so pickling (e.g. across
    # processes) finds the class, and descriptors keep the canonical proto file name.
    assert telemetry_pb2.Snapshot.__module__ == "agent.proto.fabric.v1.telemetry_pb2"
    assert telemetry_pb2.DESCRIPTOR.name == "fabric/v1/telemetry.proto"
    snapshot = _snapshot()
    assert pickle.loads(pickle.dumps(snapshot)) == snapshot
