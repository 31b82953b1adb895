"""A hostile or buggy aggregator against the agent's uplink: what it sends is refused
per policy, costs the agent bounded memory, and never the policies already enforced."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from agent.common.errors import FabricError
from agent.common.policy.documents import encode_document
from agent.node.api.telemetry import SnapshotHub
from agent.node.qos.api_objects import Precondition, RefusedError
from agent.node.qos.reconciler import Reconciler
from agent.node.uplink import stream
from agent.node.uplink.stream import (
    MAX_PENDING_CONTROL,
    MAX_PENDING_FLEET_WORK,
    MAX_PENDING_SNAPSHOTS,
    ReconcilerPolicies,
    StoreIdFile,
    Uplink,
    UplinkSettings,
)
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from agent.proto.fabric.v1 import qos_service_pb2
from tests.node.qos import DEVICE, api_policy, api_policy_document, assignment_document
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.uplink.test_uplink import FakePolicies, Running, assigned, registered, start

__all__ = ["start"]


def fleet_assignment(index: int) -> qos_service_pb2.PolicyObject:
    return encode_document(assignment_document(f"job-{index}", f"job-{index}", "node", "bulk"))


def test_past_the_fleet_policy_bound_a_new_one_is_refused_and_the_held_ones_stay(
    reconciler: Reconciler, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "MAX_FLEET_POLICIES", 4)
    policies = ReconcilerPolicies(reconciler)
    policies.apply_fleet(encode_document(api_policy_document(DEVICE, "node")))
    for index in range(3):
        policies.apply_fleet(fleet_assignment(index))
    before = kernel.dump()

    with pytest.raises(RefusedError) as refused:
        policies.apply_fleet(fleet_assignment(3))

    assert [(p.kind, p.subject) for p in refused.value.problems] == [("LIMIT", "job-3")]
    assert "at most 4" in str(refused.value)
    assert policies.fleet_names() == {"node", "job-0", "job-1", "job-2"}
    assert kernel.dump() == before
    # A new revision of a held policy is no new policy: still taken.
    policies.apply_fleet(encode_document(api_policy_document(DEVICE, "node", bandwidth="2Gbit")))
    policies.delete_fleet("job-0")
    policies.apply_fleet(fleet_assignment(3))
    assert policies.fleet_names() == {"node", "job-1", "job-2", "job-3"}


class SlowPolicies(FakePolicies):
    """Applies take a while; records how much work waited behind each."""

    def __init__(self, pending: Callable[[], int]) -> None:
        super().__init__()
        self.pending = pending
        self.most_pending = 0
        self.lock = threading.Lock()

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        with self.lock:
            self.most_pending = max(self.most_pending, self.pending())
        time.sleep(0.002)
        super().apply_fleet(obj)


def test_an_aggregator_that_floods_assignments_waits_for_the_agent_to_apply_them(
    start: Callable[..., Running],
) -> None:
    holder: list[Running] = []
    policies = SlowPolicies(lambda: holder[0].uplink._work.qsize() if holder else 0)
    running = start(policies)
    holder.append(running)
    aggregator = running.aggregator
    aggregator.next("register")
    flood = 600
    aggregator.outgoing.put(registered(flood))
    for index in range(flood):
        aggregator.outgoing.put(assigned(f"flood-{index}", 1))

    reports = [aggregator.next("policy_report", timeout_s=30).policy_report for _ in range(flood)]

    assert [r.outcome for r in reports] == [pb.POLICY_OUTCOME_APPLIED] * flood
    assert 0 < policies.most_pending <= MAX_PENDING_FLEET_WORK


class BuggyPolicies(FakePolicies):
    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        if obj.policy.metadata.name == "buggy-net":
            raise RuntimeError("a bug in the apply path")
        super().apply_fleet(obj)


def test_an_unexpected_failure_of_one_fleet_policy_does_not_stop_the_next(
    start: Callable[..., Running],
) -> None:
    policies = BuggyPolicies()
    running = start(policies)
    aggregator = running.aggregator
    aggregator.next("register")
    for message in (registered(2), assigned("buggy-net", 1), assigned("train-net", 1)):
        aggregator.outgoing.put(message)

    report = aggregator.next("policy_report").policy_report

    assert (report.name, report.outcome) == ("train-net", pb.POLICY_OUTCOME_APPLIED)
    assert "train-net" in policies.held


@pytest.mark.parametrize("newcomer", ["aaa-net", "zzz-net"])
def test_a_fleet_policy_for_an_interface_an_enforced_policy_holds_is_refused_whatever_its_name(
    reconciler: Reconciler, kernel: FakeKernel, newcomer: str
) -> None:
    policies = ReconcilerPolicies(reconciler)
    policies.apply_fleet(encode_document(api_policy_document(DEVICE, "holder")))
    before = kernel.dump()

    with pytest.raises(RefusedError) as refused:
        policies.apply_fleet(
            encode_document(api_policy_document(DEVICE, newcomer, bandwidth="5Gbit"))
        )

    assert [p.kind for p in refused.value.problems] == ["OWNERSHIP"]
    assert "'holder'" in str(refused.value)
    assert kernel.dump() == before
    assert [(v.name, v.state) for v in reconciler.policies()] == [("holder", "enforced")]


def test_a_local_api_policy_named_before_an_enforced_fleet_policy_does_not_take_its_interface(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    ReconcilerPolicies(reconciler).apply_fleet(encode_document(api_policy_document(DEVICE, "zzz")))
    before = kernel.dump()

    with pytest.raises(RefusedError):
        reconciler.apply_object(api_policy(DEVICE, "aaa", rate="500Mbit"))

    assert kernel.dump() == before
    assert [(v.name, v.state) for v in reconciler.policies()] == [("zzz", "enforced")]


class DeafAggregator(pb_grpc.AggregatorServiceServicer):
    """Sends `script()` on each stream, then holds it open, never reading the agent."""

    def __init__(self, script: Callable[[], Iterator[pb.AggregatorMessage]]) -> None:
        self.script = script
        self.streams = 0

    def Connect(
        self, request_iterator: Iterator[pb.AgentMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.AggregatorMessage]:
        self.streams += 1
        yield from self.script()
        while context.is_active():
            time.sleep(0.05)


@contextlib.contextmanager
def deaf_aggregator(
    script: Callable[[], Iterator[pb.AggregatorMessage]], policies: FakePolicies
) -> Iterator[tuple[DeafAggregator, Uplink]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    deaf = DeafAggregator(script)
    pb_grpc.add_AggregatorServiceServicer_to_server(deaf, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    settings = UplinkSettings(
        target=f"127.0.0.1:{port}",
        node_name="node-a",
        labels={},
        capabilities=(),
        summary_interval_s=0.2,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
    )
    uplink = Uplink(settings, policies, SnapshotHub(0.2))
    stop = threading.Event()
    thread = threading.Thread(target=uplink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield deaf, uplink
    finally:
        stop.set()
        thread.join(timeout=10)
        server.stop(0).wait()
    assert not thread.is_alive(), "the uplink did not stop"


def pending(uplink: Uplink) -> tuple[int, int]:
    """(snapshot replies, control messages) waiting in the uplink's current stream."""
    outbox = uplink._outbox
    if outbox is None:
        return 0, 0
    with uplink.changed:
        control = list(outbox._control)
    return sum(m.WhichOneof("kind") == "snapshot" for m in control), len(control)


def test_an_aggregator_that_asks_for_snapshots_without_reading_gets_few_answers() -> None:
    def script() -> Iterator[pb.AggregatorMessage]:
        yield registered(0)
        for request_id in range(20_000):
            yield pb.AggregatorMessage(snapshot_request=pb.SnapshotRequest(request_id=request_id))

    most = 0
    with deaf_aggregator(script, FakePolicies()) as (_, uplink):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            most = max(most, pending(uplink)[0])
            time.sleep(0.01)

    assert 0 < most <= MAX_PENDING_SNAPSHOTS


class WordyPolicies(FakePolicies):
    """Refuses every policy with a 4 KiB reason."""

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        raise FabricError("unknown interface: " + "x" * 4096)


def test_an_aggregator_that_never_reads_its_reports_gets_its_stream_ended() -> None:
    def script() -> Iterator[pb.AggregatorMessage]:
        yield registered(0)
        for index in range(10_000):
            yield assigned(f"flood-{index}", 1)

    most = 0
    with deaf_aggregator(script, WordyPolicies()) as (deaf, uplink):
        deadline = time.monotonic() + 30
        while deaf.streams < 2 and time.monotonic() < deadline:
            most = max(most, pending(uplink)[1])
            time.sleep(0.01)

    assert deaf.streams >= 2  # the agent ended the stream and registered again
    assert most <= MAX_PENDING_CONTROL


@pytest.mark.parametrize("planted", ["fifo", "symlink", "huge"])
def test_a_planted_store_id_file_is_set_aside_without_blocking_or_following_it(
    tmp_path: Path, planted: str
) -> None:
    path = tmp_path / "fleet-store-id"
    victim = tmp_path / "victim"
    victim.write_text("0123456789abcdef0123456789abcdef\n")
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "symlink":
        path.symlink_to(victim)
    else:
        path.write_bytes(b"0" * (64 << 20))
    remembered = StoreIdFile(path)

    assert remembered.read() is None
    assert not path.exists()
    remembered.write("fedcba9876543210fedcba9876543210")
    assert remembered.read() == "fedcba9876543210fedcba9876543210"
    assert victim.read_text() == "0123456789abcdef0123456789abcdef\n"


class OneInterface(FakePolicies):
    """One interface: a fleet policy is refused while another holds it, as the agent's
    reconciler refuses it (OWNERSHIP)."""

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        name = obj.policy.metadata.name
        holders = self.held - {name}
        if holders:
            reason = f"interface fab0 is held by fleet policy {min(holders)!r}"
            raise RefusedError([Precondition("OWNERSHIP", "spec.interface", reason)])
        super().apply_fleet(obj)


def test_a_fleet_policy_refused_for_a_held_interface_is_applied_once_the_holder_is_removed(
    start: Callable[..., Running],
) -> None:
    policies = OneInterface()
    aggregator = start(policies).aggregator
    aggregator.next("register")
    # The operator applies the replacement first, then deletes the old policy.
    for message in (registered(1), assigned("old-net", 1), assigned("new-net", 1)):
        aggregator.outgoing.put(message)
    reports = [aggregator.next("policy_report").policy_report for _ in range(2)]
    aggregator.outgoing.put(pb.AggregatorMessage(removal=pb.PolicyRemoval(name="old-net")))
    reports += [aggregator.next("policy_report").policy_report for _ in range(2)]

    assert [(r.name, r.outcome) for r in reports] == [
        ("old-net", pb.POLICY_OUTCOME_APPLIED),
        ("new-net", pb.POLICY_OUTCOME_FAILED),
        ("old-net", pb.POLICY_OUTCOME_REMOVED),
        ("new-net", pb.POLICY_OUTCOME_APPLIED),
    ]
    assert policies.held == {"new-net"}
