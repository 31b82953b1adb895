"""The running agent's gRPC API on its unix socket, with a real client."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc

from agent.proto.fabric.v1 import telemetry_service_pb2 as service
from agent.proto.fabric.v1 import telemetry_service_pb2_grpc as service_grpc
from tests import ROOT
from tests.conftest import free_port

SCENARIO = ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json"
SYSFS = ROOT / "tests/fixtures/sysfs"


def test_get_snapshot_over_the_socket_matches_sample(
    fakenvml_library: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    common = ["--nvml-library", str(fakenvml_library), "--sysfs-root", str(SYSFS),
              "--interfaces", "lo", "--state-dir", str(tmp_path / "state"),
              "--policy-dir", str(tmp_path / "policies")]  # fmt: skip
    env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--metrics-listen", f"127.0.0.1:{free_port()}",
         "--grpc-socket", str(sock), "--grpc-listen", "127.0.0.1:0", "--interval", "200ms",
         *common],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = service_grpc.TelemetryServiceStub(channel)
            response = None
            deadline = time.monotonic() + 30
            while response is None and time.monotonic() < deadline:
                try:
                    response = stub.GetSnapshot(service.GetSnapshotRequest(), timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # no sample yet
                    time.sleep(0.1)
            gpu_only = stub.GetSnapshot(
                service.GetSnapshotRequest(sections=[service.SECTION_GPU]), timeout=5
            )
        mode = stat.S_IMODE(sock.stat().st_mode)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    sampled = json.loads(
        subprocess.run(
            [sys.executable, "-m", "agent", "sample", "--once", "--format", "json", *common],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip

    assert response is not None
    snapshot = response.snapshot
    sections = sampled["sections"]
    assert [g.uuid for g in snapshot.gpus] == [g["uuid"] for g in sections["gpu"]]
    assert len(snapshot.nvlinks) == len(sections["nvlink"]) == 144
    assert [n.device for n in snapshot.nics] == [n["device"] for n in sections["nic"]] == ["lo"]
    assert [(p.device, p.port) for p in snapshot.rdma_ports] == [
        (p["device"], p["port"]) for p in sections["rdma"]
    ]
    assert snapshot.node_name == sampled["node_name"]
    assert len(gpu_only.snapshot.gpus) == 8 and not gpu_only.snapshot.nvlinks
    assert mode == 0o660
    assert process.returncode == 0, stderr
    assert not sock.exists()  # removed on exit
