"""A real gRPC server on a unix socket in tmp_path serving settable fake servicers, and
helpers to run fabricctl against it (in process, or as a subprocess)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from agent.proto.fabric.v1 import (
    qos_service_pb2_grpc,
    telemetry_pb2,
    telemetry_service_pb2,
    telemetry_service_pb2_grpc,
)
from tests import ROOT
from tests.conftest import VethPair, free_port
from tests.pki import Ca

# A valid two-class policy document, as fabricctl reads it from a file.
POLICY = {
    "apiVersion": "fabric.qos/v1alpha1",
    "kind": "QosPolicy",
    "metadata": {"name": "training-node"},
    "spec": {
        "interface": "eth0",
        "direction": "egress",
        "bandwidth": "100Gbit",
        "defaultClass": "best-effort",
        "classes": [
            {"name": "collectives", "priority": 0, "rate": "60Gbit",
             "match": [{"dstPorts": [29500]}]},
            {"name": "best-effort", "priority": 7, "rate": "10Gbit"},
        ],
    },
}  # fmt: skip

# An answer: a response, a status to abort with, or a list of them used one per call.
Answer = Message | grpc.Status


def rich_status(code: int, message: str, *details: Message) -> grpc.Status:
    """A grpc.Status carrying google.rpc details, as the agent aborts with."""
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def bad_request(message: str, *violations: tuple[str, str]) -> grpc.Status:
    request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    return rich_status(code_pb2.INVALID_ARGUMENT, message, request)


def precondition_failed(message: str, kind: str, subject: str, description: str) -> grpc.Status:
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=kind, subject=subject, description=description
            )
        ]
    )
    return rich_status(code_pb2.FAILED_PRECONDITION, message, failure)


def plain_status(code: int, message: str) -> grpc.Status:
    return rich_status(code, message)


class _Recorder:
    """Requests by method; answers set per method (one, or a list used in order)."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = {}
        self.answers: dict[str, Answer | list[Answer]] = {}
        self._lock = threading.Lock()

    def answer(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.requests.setdefault(method, []).append(request)
            answer = self.answers.get(method)
            if isinstance(answer, list):
                answer = answer.pop(0)
        if answer is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: no answer set")
        if isinstance(answer, grpc.Status):
            context.abort_with_status(answer)
        return answer


class FakeQos(qos_service_pb2_grpc.QosServiceServicer, _Recorder):
    def __init__(self) -> None:
        _Recorder.__init__(self)

    def ApplyPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("ApplyPolicy", request, context)

    def RenewLease(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("RenewLease", request, context)

    def DeletePolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("DeletePolicy", request, context)

    def ListPolicies(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("ListPolicies", request, context)

    def GetPolicyStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("GetPolicyStatus", request, context)

    def PlanPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("PlanPolicy", request, context)


class FakeTelemetry(telemetry_service_pb2_grpc.TelemetryServiceServicer, _Recorder):
    """GetSnapshot answers as set; WatchSnapshots streams `stream`, then ends, or with
    `hold_open` waits until the client goes away."""

    def __init__(self) -> None:
        _Recorder.__init__(self)
        self.stream: list[telemetry_service_pb2.WatchSnapshotsResponse] = []
        self.hold_open = False
        self.delay_s = 0.0

    def GetSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        return self.answer("GetSnapshot", request, context)

    def ListDevices(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("ListDevices", request, context)

    def WatchSnapshots(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[telemetry_service_pb2.WatchSnapshotsResponse]:
        self.requests.setdefault("WatchSnapshots", []).append(request)
        yield from self.stream
        while self.hold_open and context.is_active():
            threading.Event().wait(0.05)


@dataclass
class FakeAgent:
    """The fake servicers behind `target` (unix:<tmp>/agent.sock)."""

    target: str
    socket: Path
    qos: FakeQos
    telemetry: FakeTelemetry
    health: health.HealthServicer
    server: grpc.Server = field(repr=False)


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[FakeAgent]:
    sock = tmp_path / "agent.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    qos, tele, checker = FakeQos(), FakeTelemetry(), health.HealthServicer()
    qos_service_pb2_grpc.add_QosServiceServicer_to_server(qos, server)
    telemetry_service_pb2_grpc.add_TelemetryServiceServicer_to_server(tele, server)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield FakeAgent(f"unix:{sock}", sock, qos, tele, checker, server)
    finally:
        server.stop(0).wait()


def run_fabricctl(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """fabricctl as a subprocess (python -m agent.ctl), from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "agent.ctl", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, **(env or {})),
        check=False,
    )


def snapshot(seq: int = 7) -> telemetry_pb2.Snapshot:
    """A small node: two GPUs with two links each, one NIC, one RDMA port, one class."""
    snap = telemetry_pb2.Snapshot(
        node_name="gpu-node-1", agent_version="0.1.0", seq=seq, interval_seconds=1.0,
        started_unix_seconds=1000.0 + seq, completed_unix_seconds=1000.01 + seq,
        collectors=[telemetry_pb2.CollectorStatus(name="gpu", success=True, samples=2),
                    telemetry_pb2.CollectorStatus(name="rdma", success=False, error="boom")],
    )  # fmt: skip
    for index in range(2):
        snap.gpus.add(
            index=index, name="NVIDIA H200", uuid=f"GPU-{index}", utilization_gpu_ratio=0.5,
            memory_used_bytes=10 * 2**30, memory_total_bytes=140 * 2**30, power_watts=600.0,
            power_limit_watts=700.0, temperature_gpu_celsius=60,
        )  # fmt: skip
        for link in range(2):
            snap.nvlinks.add(
                gpu=index, link=link, up=True, transmit_bytes=2**30 * seq,
                receive_bytes=2**30 * seq, replay_errors=1,
            )  # fmt: skip
    snap.nics.add(
        device="eth0", ifindex=2, operstate="up", mtu_bytes=9000, speed_bps=100_000_000_000,
        receive_bytes=1_000_000 * seq, transmit_bytes=2_000_000 * seq,
    )  # fmt: skip
    snap.rdma_ports.add(
        device="mlx5_0", port=1, state="ACTIVE", link_layer="InfiniBand",
        rate_bps=400_000_000_000, receive_bytes=5 * 2**30, transmit_bytes=6 * 2**30,
    )  # fmt: skip
    snap.qos_classes.add(
        device="eth0", policy="training-node", class_name="collectives", minor=2,
        sent_bytes=3 * 2**20, dropped_packets=4, overlimits=5, rate_bps=2.5e9,
    )  # fmt: skip
    return snap


# --- real agents ---

SCENARIO = ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json"
SYSFS = ROOT / "tests/fixtures/sysfs"


@dataclass
class RealAgent:
    """A `fabric-agent run` process: its unix socket target, its log."""

    target: str
    process: subprocess.Popen[bytes]
    log: Path
    tcp_target: str = ""

    def wait_serving(self, ready: Callable[[], bool], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"agent not ready: {self.log.read_text()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _short_socket_dir() -> str:
    # tmp_path can exceed the 108 bytes a unix socket path may have.
    return tempfile.mkdtemp(prefix="fabricctl-")


@pytest.fixture
def sim_agent(fakenvml_library: Path, tmp_path: Path) -> Iterator[RealAgent]:
    """The agent on the simulated 8-GPU node, API on a unix socket and plaintext TCP,
    sampling every 200 ms, its job directory `tmp_path/jobs` (empty); yielded once it has
    a snapshot."""
    (tmp_path / "jobs").mkdir(mode=0o755)
    directory = _short_socket_dir()
    sock = f"{directory}/agent.sock"
    port = free_port()
    log = tmp_path / "agent.log"
    env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--metrics-listen", f"127.0.0.1:{free_port()}",
             "--grpc-socket", sock, "--grpc-listen", f"127.0.0.1:{port}", "--interval", "200ms",
             "--nvml-library", str(fakenvml_library), "--sysfs-root", str(SYSFS),
             "--interfaces", "lo", "--state-dir", str(tmp_path / "state"),
             "--policy-dir", str(tmp_path / "policies"), "--job-dir", str(tmp_path / "jobs")],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    agent = RealAgent(f"unix:{sock}", process, log, tcp_target=f"127.0.0.1:{port}")
    try:
        agent.wait_serving(
            lambda: (
                run_fabricctl("--agent", agent.target, "telemetry", "--section", "host").returncode
                == 0
            )
        )
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def netns_agent(shaped_pair: VethPair, tmp_path: Path) -> Iterator[RealAgent]:
    """The agent inside `shaped_pair.netns` (so it shapes the pair's veth), QoS and host
    collectors only, no policy files; yielded once QosService answers."""
    directory = _short_socket_dir()
    sock = f"{directory}/agent.sock"
    log = tmp_path / "agent.log"
    (tmp_path / "policies").mkdir()
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{shaped_pair.netns}", sys.executable, "-m", "agent",
             "run", "--collectors", "host,qos", "--interval", "200ms",
             "--metrics-listen", "127.0.0.1:0", "--grpc-socket", sock,
             "--grpc-listen", "127.0.0.1:0", "--policy-dir", str(tmp_path / "policies"),
             "--state-dir", str(tmp_path / "state"), "--reconcile-interval", "5s"],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    agent = RealAgent(f"unix:{sock}", process, log)
    try:
        agent.wait_serving(
            lambda: run_fabricctl("--agent", agent.target, "policy", "list").returncode == 0
        )
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def mtls_server(
    ca: Ca, server_name: str, add_servicer: Callable[[grpc.Server], None]
) -> Iterator[int]:
    """A loopback server that requires client certificates from `ca`, its certificate
    naming `server_name`; yields its port."""
    server_cert = ca.issue(server_name.split(".")[0], server=True, dns=[server_name])
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    add_servicer(server)
    credentials = grpc.ssl_server_credentials(
        [(server_cert.key_pem, server_cert.cert_pem)],
        root_certificates=ca.cert_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()
