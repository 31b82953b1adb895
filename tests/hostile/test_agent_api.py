"""The agent's gRPC API against hostile clients, with real gRPC clients: nothing expensive
without authentication, no request bigger than a document needs, a bound on planning at
once, and the local socket's watch streams apart from TCP's."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from agent.common.listeners import TcpSettings
from agent.common.policy.documents import encode_document
from agent.common.policy.model import PolicyObject
from agent.node.api import telemetry
from agent.node.api.server import MAX_RECEIVE_BYTES, ApiServer
from agent.node.api.telemetry import SnapshotHub
from agent.proto.fabric.v1 import qos_service_pb2 as qos_pb
from agent.proto.fabric.v1 import qos_service_pb2_grpc as qos_grpc
from agent.proto.fabric.v1 import telemetry_service_pb2 as telemetry_pb
from agent.proto.fabric.v1 import telemetry_service_pb2_grpc as telemetry_grpc
from tests.node.api import snapshot
from tests.node.api.test_listeners import CHANNEL_OPTIONS, FakeReconciler
from tests.node.qos import api_policy_document
from tests.node.qos.test_daemon import wait_until

PLAN = qos_pb.PlanPolicyRequest(object=encode_document(api_policy_document("eth0")))


class PlanningReconciler(FakeReconciler):
    """FakeReconciler that plans: each plan waits for `release` and counts how many
    run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def plan_object(self, obj: PolicyObject) -> list[str]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(30)
            return [f"{obj.metadata.name}: + planned"]
        finally:
            with self._lock:
                self.running -= 1


class Api:
    """An ApiServer on a unix socket and plaintext TCP (read-only), over `backend`."""

    def __init__(self, backend: PlanningReconciler) -> None:
        self.backend = backend
        self.hub = SnapshotHub(0.05)
        self.hub.publish(snapshot())
        self._directory = tempfile.TemporaryDirectory(prefix="fabric-api-")
        self.socket = Path(self._directory.name) / "agent.sock"
        self.server = ApiServer(
            self.socket,
            self.hub,
            qos_backend=backend,  # type: ignore[arg-type]
            tcp=TcpSettings(("127.0.0.1", 0), None, ()),
        )
        self.server.start()
        self.channels: list[grpc.Channel] = []

    def unix(self) -> grpc.Channel:
        return self._keep(grpc.insecure_channel(f"unix:{self.socket}", options=CHANNEL_OPTIONS))

    def tcp(self) -> grpc.Channel:
        target = f"127.0.0.1:{self.server.tcp_port}"
        return self._keep(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))

    def _keep(self, channel: grpc.Channel) -> grpc.Channel:
        self.channels.append(channel)
        return channel

    def close(self) -> None:
        self.backend.release.set()
        for channel in self.channels:
            channel.close()
        self.server.stop(grace_s=0)
        self._directory.cleanup()


@pytest.fixture
def api() -> Iterator[Api]:
    running = Api(PlanningReconciler())
    try:
        yield running
    finally:
        running.close()


def test_plan_policy_is_refused_on_the_plaintext_tcp_listener_and_says_which(api: Api) -> None:
    api.backend.release.set()

    with pytest.raises(grpc.RpcError) as refused:
        qos_grpc.QosServiceStub(api.tcp()).PlanPolicy(PLAN, timeout=10)
    over_unix = qos_grpc.QosServiceStub(api.unix()).PlanPolicy(PLAN, timeout=10)

    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details() or ""
    assert "PlanPolicy is refused on the TCP listener (plaintext, read-only)" in details
    assert list(over_unix.changes) == ["job-net: + planned"]


@pytest.mark.parametrize("method", ["ApplyPolicy", "DeletePolicy", "RenewLease"])
def test_every_mutation_is_refused_on_the_plaintext_tcp_listener_naming_it(
    api: Api, method: str
) -> None:
    requests = {
        "ApplyPolicy": qos_pb.ApplyPolicyRequest(object=PLAN.object),
        "DeletePolicy": qos_pb.DeletePolicyRequest(name="job-net"),
        "RenewLease": qos_pb.RenewLeaseRequest(name="job-net"),
    }
    stub = qos_grpc.QosServiceStub(api.tcp())

    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, method)(requests[method], timeout=10)

    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"{method} is refused on the TCP listener" in (refused.value.details() or "")
    assert api.backend.applied == []


def oversized_plan(size_bytes: int) -> qos_pb.PlanPolicyRequest:
    """A PlanPolicy request of about `size_bytes`: a policy whose name is that long."""
    request = qos_pb.PlanPolicyRequest()
    request.CopyFrom(PLAN)
    request.object.policy.metadata.name = "x" * size_bytes
    return request


def test_a_request_bigger_than_a_document_needs_is_refused_before_it_is_parsed(
    api: Api,
) -> None:
    stub = qos_grpc.QosServiceStub(api.unix())
    api.backend.release.set()

    with pytest.raises(grpc.RpcError) as refused:
        stub.PlanPolicy(oversized_plan(3_800_000), timeout=10)
    with pytest.raises(grpc.RpcError) as invalid:
        # Under the limit it reaches validation (a 1.5 MB name is no name).
        stub.PlanPolicy(oversized_plan(1_500_000), timeout=10)

    assert MAX_RECEIVE_BYTES == 2 * 1024 * 1024
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.backend.most == 0


def test_no_more_than_two_plans_run_at_once_and_the_next_is_told_to_retry(api: Api) -> None:
    stub = qos_grpc.QosServiceStub(api.unix())
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(stub.PlanPolicy, PLAN, timeout=30) for _ in range(2)]
        wait_until(lambda: api.backend.running == 2, 30, "two plans running")

        with pytest.raises(grpc.RpcError) as third:
            stub.PlanPolicy(PLAN, timeout=10)
        api.backend.release.set()
        done = [future.result(timeout=30) for future in running]

    assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 plans are running" in (third.value.details() or "")
    assert api.backend.most == 2
    assert all(list(d.changes) == ["job-net: + planned"] for d in done)


def first_snapshot(stream: Iterator[telemetry_pb.WatchSnapshotsResponse]) -> None:
    next(stream)


def test_tcp_clients_holding_every_tcp_stream_slot_leave_the_unix_socket_its_own(
    api: Api,
) -> None:
    tcp = telemetry_grpc.TelemetryServiceStub(api.tcp())
    request = telemetry_pb.WatchSnapshotsRequest(sections=[telemetry_pb.SECTION_HOST])
    streams = [tcp.WatchSnapshots(request, timeout=60) for _ in range(telemetry.MAX_WATCH_STREAMS)]
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(first_snapshot, streams))

        with pytest.raises(grpc.RpcError) as one_more:
            next(tcp.WatchSnapshots(request, timeout=10))
        local = telemetry_grpc.TelemetryServiceStub(api.unix())
        watched = next(local.WatchSnapshots(request, timeout=10))
    finally:
        for stream in streams:
            stream.cancel()  # type: ignore[attr-defined]

    assert one_more.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "on the TCP listener" in (one_more.value.details() or "")
    assert watched.snapshot.node_name
