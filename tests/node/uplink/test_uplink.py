"""The agent's stream to the aggregator, against a scripted aggregator on loopback:
registration, summaries of only the latest snapshot, fleet policies applied and
reported, resync after registration, snapshot replies, reconnects with backoff."""

from __future__ import annotations

import contextlib
import queue
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
from agent.node.snapshot import Snapshot
from agent.node.uplink.stream import Backoff, StoreIdFile, Uplink, UplinkSettings
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from agent.proto.fabric.v1 import qos_service_pb2, telemetry_service_pb2
from tests.node.qos import api_policy_document

END = pb.AggregatorMessage()  # sent by a test: end this stream


class ScriptedAggregator(pb_grpc.AggregatorServiceServicer):
    """Each Connect stream: what the agent sends lands in `received`; what the test puts
    in `outgoing` is sent (END ends the stream)."""

    def __init__(self) -> None:
        self.received: queue.Queue[pb.AgentMessage] = queue.Queue()
        self.outgoing: queue.Queue[pb.AggregatorMessage] = queue.Queue()
        self.streams = 0

    def Connect(
        self, request_iterator: Iterator[pb.AgentMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.AggregatorMessage]:
        self.streams += 1

        def read() -> None:
            # The stream's end (the stream closed or cancelled) ends the reading.
            with contextlib.suppress(grpc.RpcError):
                for message in request_iterator:
                    self.received.put(message)

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                message = self.outgoing.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is END:
                return
            yield message

    def next(self, kind: str, timeout_s: float = 5.0) -> pb.AgentMessage:
        """The next message of `kind` the agent sent (others skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.WhichOneof("kind") == kind:
                return message


class FakePolicies:
    def __init__(self, held: frozenset[str] = frozenset(), refuse: str = "") -> None:
        self.held = set(held)
        self.applied: list[str] = []
        self.refuse = refuse

    def apply_fleet(self, obj: qos_service_pb2.PolicyObject) -> None:
        name = obj.policy.metadata.name
        if name == self.refuse:
            raise FabricError(f"{name}: spec.interface: unknown interface 'fab0'")
        self.applied.append(name)
        self.held.add(name)

    def delete_fleet(self, name: str) -> bool:
        held = name in self.held
        self.held.discard(name)
        return held

    def fleet_names(self) -> set[str]:
        return set(self.held)


def snapshot(seq: int) -> Snapshot:
    now = time.time()
    return Snapshot("node-a", "0.1.0", seq, 0.2, now, now, {}, ())


class Running:
    def __init__(self, uplink: Uplink, aggregator: ScriptedAggregator) -> None:
        self.uplink = uplink
        self.aggregator = aggregator


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    aggregator = ScriptedAggregator()
    pb_grpc.add_AggregatorServiceServicer_to_server(aggregator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def launch(
        policies: FakePolicies, hub: SnapshotHub | None = None, store_id_path: Path | None = None
    ) -> Running:
        settings = UplinkSettings(
            target=f"127.0.0.1:{port}",
            node_name="node-a",
            labels={"pool": "training"},
            capabilities=("gpu", "qos-enforce"),
            summary_interval_s=0.2,
            store_id_path=store_id_path,
            backoff_min_s=0.05,
            backoff_max_s=0.2,
        )
        uplink = Uplink(settings, policies, hub or SnapshotHub(0.2))
        thread = threading.Thread(target=uplink.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)
        return Running(uplink, aggregator)

    yield launch
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), "the uplink did not stop"
    server.stop(0).wait()


def registered(count: int) -> pb.AggregatorMessage:
    return pb.AggregatorMessage(registered=pb.Registered(assignments=count))


def assigned(name: str, revision: int) -> pb.AggregatorMessage:
    obj = encode_document(api_policy_document("fab0", name))
    return pb.AggregatorMessage(
        assignment=pb.PolicyAssignment(name=name, object=obj, revision=revision)
    )


def test_registers_then_summarises_only_the_latest_snapshot(
    start: Callable[..., Running],
) -> None:
    policies = FakePolicies()
    running = start(policies)
    uplink, aggregator = running.uplink, running.aggregator
    for seq in (1, 2, 3):  # while the stream is still being set up: only 3 is kept
        uplink.offer(snapshot(seq))

    register = aggregator.next("register").register
    assert (register.node_name, dict(register.labels)) == ("node-a", {"pool": "training"})
    assert list(register.capabilities) == ["gpu", "qos-enforce"]
    assert register.summary_interval.ToMilliseconds() == 200
    assert aggregator.next("summary").summary.seq == 3
    uplink.offer(snapshot(4))
    assert aggregator.next("summary").summary.seq == 4
    with pytest.raises(queue.Empty):
        aggregator.next("summary", timeout_s=0.3)


def test_fleet_policies_are_applied_in_order_and_reported(start: Callable[..., Running]) -> None:
    policies = FakePolicies(held={"stale-net"}, refuse="bad-net")
    running = start(policies)
    aggregator = running.aggregator
    aggregator.next("register")
    for message in (registered(2), assigned("train-net", 7), assigned("bad-net", 8)):
        aggregator.outgoing.put(message)

    first = aggregator.next("policy_report").policy_report
    second = aggregator.next("policy_report").policy_report
    assert (first.name, first.revision, first.outcome) == (
        "train-net",
        7,
        pb.POLICY_OUTCOME_APPLIED,
    )
    assert (second.name, second.outcome) == ("bad-net", pb.POLICY_OUTCOME_FAILED)
    assert "unknown interface" in second.message
    # After the registration's two assignments: what the aggregator no longer assigns
    # is removed, what it assigned stays.
    deadline = time.monotonic() + 5
    while "stale-net" in policies.held:
        assert time.monotonic() < deadline, "stale-net not removed"
        time.sleep(0.01)
    assert policies.held == {"train-net"}

    aggregator.outgoing.put(pb.AggregatorMessage(removal=pb.PolicyRemoval(name="train-net")))
    removed = aggregator.next("policy_report").policy_report
    assert (removed.name, removed.outcome) == ("train-net", pb.POLICY_OUTCOME_REMOVED)
    assert policies.held == set()


def test_snapshot_requests_are_answered_with_the_latest_snapshot(
    start: Callable[..., Running],
) -> None:
    hub = SnapshotHub(0.2)
    running = start(FakePolicies(), hub)
    aggregator = running.aggregator
    aggregator.next("register")
    aggregator.outgoing.put(pb.AggregatorMessage(snapshot_request=pb.SnapshotRequest(request_id=1)))
    assert aggregator.next("snapshot").snapshot.error == "no snapshot taken yet"

    hub.publish(snapshot(9))
    aggregator.outgoing.put(pb.AggregatorMessage(snapshot_request=pb.SnapshotRequest(request_id=2)))

    reply = aggregator.next("snapshot").snapshot
    decoded = telemetry_service_pb2.GetSnapshotResponse.FromString(reply.snapshot)
    assert (reply.request_id, decoded.snapshot.seq) == (2, 9)
    hub.close()


def test_a_lost_stream_is_reestablished_and_registers_again(
    start: Callable[..., Running],
) -> None:
    running = start(FakePolicies())
    uplink, aggregator = running.uplink, running.aggregator
    aggregator.next("register")
    aggregator.outgoing.put(registered(0))
    assert uplink.connected.wait(5)

    aggregator.outgoing.put(END)

    assert aggregator.next("register").register.node_name == "node-a"
    aggregator.outgoing.put(registered(0))
    deadline = time.monotonic() + 5
    while uplink.registrations < 2:
        assert time.monotonic() < deadline, "no second registration"
        time.sleep(0.01)
    assert aggregator.streams == 2


def test_backoff_doubles_to_its_ceiling_with_jitter_and_resets() -> None:
    low = Backoff(1.0, 60.0, rng=lambda: 0.0)
    high = Backoff(1.0, 60.0, rng=lambda: 1.0)

    assert [low.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [high.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    high.reset()
    assert high.next() == 1.0


STORE_A, STORE_B = "a" * 32, "b" * 32


def registered_by(store_id: str, count: int = 0, released: bool = False) -> pb.AggregatorMessage:
    message = pb.Registered(assignments=count, store_id=store_id, kept_released=released)
    return pb.AggregatorMessage(registered=message)


def test_a_store_with_another_id_keeps_unassigned_fleet_policies_until_released(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    path = tmp_path / "fleet-store-id"
    path.write_text(STORE_A + "\n")
    policies = FakePolicies(held={"train-net", "infer-net"})
    aggregator = start(policies, store_id_path=path).aggregator
    aggregator.next("register")

    aggregator.outgoing.put(registered_by(STORE_B, 1))
    aggregator.outgoing.put(assigned("infer-net", 3))
    reports = [aggregator.next("policy_report").policy_report for _ in range(2)]

    outcomes = {(r.name, r.outcome) for r in reports}
    assert outcomes == {
        ("infer-net", pb.POLICY_OUTCOME_APPLIED),
        ("train-net", pb.POLICY_OUTCOME_KEPT),
    }
    assert policies.held == {"train-net", "infer-net"}
    assert path.read_text().strip() == STORE_A

    aggregator.outgoing.put(registered_by(STORE_B, 1, released=True))
    aggregator.outgoing.put(assigned("infer-net", 3))
    deadline = time.monotonic() + 5
    while "train-net" in policies.held:
        assert time.monotonic() < deadline, "train-net not removed once released"
        time.sleep(0.01)
    assert policies.held == {"infer-net"}
    assert path.read_text().strip() == STORE_B


def test_the_first_store_id_is_remembered_and_resyncs_as_before(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    path = tmp_path / "fleet-store-id"
    policies = FakePolicies(held={"old-net"})
    aggregator = start(policies, store_id_path=path).aggregator
    aggregator.next("register")

    aggregator.outgoing.put(registered_by(STORE_A))

    deadline = time.monotonic() + 5
    while "old-net" in policies.held or not path.exists():
        assert time.monotonic() < deadline, "old-net not removed, or the id not remembered"
        time.sleep(0.01)
    assert path.read_text().strip() == STORE_A


def test_a_corrupt_store_id_file_is_set_aside_and_counts_as_none(tmp_path: Path) -> None:
    path = tmp_path / "fleet-store-id"
    path.write_text("not an id\x00\n")
    remembered = StoreIdFile(path)

    assert remembered.read() is None
    assert not path.exists()
    assert (tmp_path / "fleet-store-id.corrupt").read_text() == "not an id\x00\n"
    remembered.write("0123456789abcdef0123456789abcdef")
    assert remembered.read() == "0123456789abcdef0123456789abcdef"
