"""fabric.v1.TelemetryService: a real gRPC server on a unix socket and a real client stub;
and the SnapshotHub's queues on their own."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import duration_pb2

from agent.api.telemetry import SnapshotHub, add_to_server, watch_interval_s
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub
from agent.snapshot import Snapshot
from tests.api import snapshot

SAMPLING_S = 0.05
QUEUE_SIZE = 4


@pytest.fixture
def hub() -> SnapshotHub:
    return SnapshotHub(SAMPLING_S, queue_size=QUEUE_SIZE)


@pytest.fixture
def stub(hub: SnapshotHub) -> Iterator[TelemetryServiceStub]:
    # A short directory of its own: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fabric-api-") as directory:
        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        add_to_server(server, hub)
        target = f"unix:{directory}/agent.sock"
        server.add_insecure_port(target)
        server.start()
        channel = grpc.insecure_channel(target)
        try:
            yield TelemetryServiceStub(channel)
        finally:
            channel.close()
            hub.close()
            server.stop(grace=None).wait()


class Publisher:
    """Publishes a snapshot with the next seq every SAMPLING_S, like the sampler."""

    def __init__(self, hub: SnapshotHub) -> None:
        self.hub = hub
        self.seq = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(SAMPLING_S):
            self.seq += 1
            self.hub.publish(snapshot(self.seq))


@pytest.fixture
def publisher(hub: SnapshotHub) -> Iterator[Publisher]:
    running = Publisher(hub)
    running.thread.start()
    yield running
    running.stop.set()
    running.thread.join()


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- unary calls ---


def test_unavailable_before_the_first_snapshot(stub: TelemetryServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as get:
        stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as listed:
        stub.ListDevices(pb.ListDevicesRequest(), timeout=5)

    assert get.value.code() == grpc.StatusCode.UNAVAILABLE
    assert listed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_get_snapshot_all_sections(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(seq=7))

    response = stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5)

    message = response.snapshot
    assert message.seq == 7
    assert [g.uuid for g in message.gpus] == ["GPU-00000000", "GPU-00000001"]
    assert len(message.nvlinks) == 2
    assert [n.device for n in message.nics] == ["eth0"]
    assert [r.device for r in message.rdma_ports] == ["mlx5_0"]
    assert len(message.host) == 1
    assert [q.class_name for q in message.qos_classes] == ["bulk"]


def test_get_snapshot_filtered(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot())

    response = stub.GetSnapshot(
        pb.GetSnapshotRequest(sections=[pb.SECTION_GPU, pb.SECTION_RDMA]), timeout=5
    )

    message = response.snapshot
    assert len(message.gpus) == 2
    assert len(message.rdma_ports) == 1
    assert not (message.nvlinks or message.nics or message.host or message.qos_classes)
    assert [c.name for c in message.collectors] == ["nvml", "rdma"]


def test_unknown_section_is_invalid(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot())

    with pytest.raises(grpc.RpcError) as raised:
        stub.GetSnapshot(pb.GetSnapshotRequest(sections=[pb.SECTION_UNSPECIFIED]), timeout=5)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown section 0" in (raised.value.details() or "")


def test_list_devices(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(nics=2))

    response = stub.ListDevices(pb.ListDevicesRequest(), timeout=5)

    kinds = [d.WhichOneof("kind") for d in response.devices]
    assert kinds == ["gpu", "gpu", "nic", "nic", "rdma_port"]
    gpu0, gpu1 = (d.gpu for d in response.devices[:2])
    assert (gpu0.index, gpu0.uuid, gpu0.name) == (0, "GPU-00000000", "NVIDIA H200")
    assert (gpu0.pci_bus_id, gpu0.lost, gpu0.nvlink_count) == ("00000000:19:00.0", False, 2)
    assert (gpu1.lost, gpu1.nvlink_count) == (True, 0)
    assert response.devices[4].rdma_port.device == "mlx5_0"
    assert response.next_page_token == ""


def test_list_devices_pages(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(nics=2))

    first = stub.ListDevices(pb.ListDevicesRequest(page_size=3), timeout=5)
    rest = stub.ListDevices(
        pb.ListDevicesRequest(page_size=3, page_token=first.next_page_token), timeout=5
    )

    assert len(first.devices) == 3
    assert [d.WhichOneof("kind") for d in rest.devices] == ["nic", "rdma_port"]
    assert rest.next_page_token == ""
    with pytest.raises(grpc.RpcError) as raised:
        stub.ListDevices(pb.ListDevicesRequest(page_token="bogus"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the stream ---


def test_watch_at_the_requested_interval(
    hub: SnapshotHub, stub: TelemetryServiceStub, publisher: Publisher
) -> None:
    interval_s = 4 * SAMPLING_S
    request = pb.WatchSnapshotsRequest(sections=[pb.SECTION_HOST], interval=_duration(interval_s))

    stream = stub.WatchSnapshots(request, timeout=10)
    arrivals: list[tuple[float, int]] = []
    for response in stream:
        arrivals.append((time.monotonic(), response.snapshot.seq))
        assert response.missed == 0
        assert len(response.snapshot.host) == 1
        assert not response.snapshot.gpus
        if len(arrivals) == 5:
            break
    stream.cancel()

    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(arrivals)]
    steps = [later[1] - earlier[1] for earlier, later in itertools.pairwise(arrivals)]
    assert all(interval_s - SAMPLING_S < gap < interval_s + 4 * SAMPLING_S for gap in gaps), gaps
    assert all(3 <= step <= 5 for step in steps), steps


def test_watch_is_never_faster_than_sampling(
    hub: SnapshotHub, stub: TelemetryServiceStub, publisher: Publisher
) -> None:
    request = pb.WatchSnapshotsRequest(interval=_duration(0.001))

    stream = stub.WatchSnapshots(request, timeout=10)
    seqs = []
    for response in stream:
        seqs.append(response.snapshot.seq)
        if len(seqs) == 6:
            break
    stream.cancel()

    # Every snapshot, once: one per sampling tick.
    assert seqs == list(range(seqs[0], seqs[0] + 6))


def test_watch_starts_with_the_latest(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(seq=3))

    stream = stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=10)

    assert next(stream).snapshot.seq == 3
    stream.cancel()


def test_negative_interval_is_invalid(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    request = pb.WatchSnapshotsRequest(interval=duration_pb2.Duration(seconds=-1))

    with pytest.raises(grpc.RpcError) as raised:
        next(stub.WatchSnapshots(request, timeout=5))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative" in (raised.value.details() or "")


def test_slow_consumer_is_told_what_it_missed(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    # Big snapshots, so the transport's buffers fill and the server blocks on the stream
    # while the client does not read: the hub's queue then takes the overflow.
    big = snapshot(nics=8000)
    hub.publish(big)
    stream = stub.WatchSnapshots(pb.WatchSnapshotsRequest(sections=[pb.SECTION_NIC]), timeout=60)
    assert next(stream).snapshot.seq == 1
    published = 60

    lengths = []
    for seq in range(2, published + 2):
        time.sleep(SAMPLING_S * 0.6)  # past the subscription's minimum gap
        hub.publish(dataclasses.replace(big, seq=seq))
        lengths.append(max(hub.queue_lengths()))

    assert max(lengths) == QUEUE_SIZE
    received, missed = 0, 0
    for response in stream:
        received += 1
        missed += response.missed
        if response.snapshot.seq == published + 1:
            break
    stream.cancel()
    assert missed > 0
    # Every snapshot after the first was either delivered or counted as missed.
    assert received + missed == published


def test_deadline_ends_the_stream_and_its_subscription(
    hub: SnapshotHub, stub: TelemetryServiceStub
) -> None:
    started = time.monotonic()

    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=0.3):
            pass

    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    _wait_for(lambda: hub.queue_lengths() == [], timeout_s=2)


def test_closing_the_hub_ends_streams(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(seq=1))
    stream = stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=10)
    assert next(stream).snapshot.seq == 1

    hub.close()

    assert list(stream) == []
    assert hub.queue_lengths() == []


# --- the hub and intervals, without gRPC ---


def _snapshots(count: int) -> list[Snapshot]:
    return [snapshot(seq) for seq in range(1, count + 1)]


def test_hub_queue_is_bounded_and_counts_what_it_drops() -> None:
    hub = SnapshotHub(SAMPLING_S, queue_size=3)
    subscription = hub.subscribe(0)

    for index, item in enumerate(_snapshots(10)):
        subscription.offer(item, now_s=index * SAMPLING_S)

    assert hub.queue_lengths() == [3]
    first = subscription.get(0)
    assert first is not None
    assert (first[0].seq, first[1]) == (8, 7)
    rest = [subscription.get(0) for _ in range(2)]
    assert [(s.seq, m) for s, m in filter(None, rest)] == [(9, 0), (10, 0)]
    assert subscription.get(0) is None
    subscription.close()
    assert hub.queue_lengths() == []


def test_hub_takes_snapshots_at_the_subscribed_interval() -> None:
    hub = SnapshotHub(1.0, queue_size=100)
    subscription = hub.subscribe(3.0)

    # Ticks a little late or early still count: half an interval of slack.
    for seq, now_s in enumerate([0.0, 1.0, 2.1, 2.9, 4.0, 5.0, 6.2], start=1):
        subscription.offer(snapshot(seq), now_s)

    taken = []
    while (item := subscription.get(0)) is not None:
        taken.append(item[0].seq)
    assert taken == [1, 4, 7]


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(0, 0, SAMPLING_S), (0, 1000, SAMPLING_S), (2, 500_000_000, 2.5)],
)
def test_watch_interval(seconds: int, nanos: int, expected: float) -> None:
    interval = duration_pb2.Duration(seconds=seconds, nanos=nanos)

    assert watch_interval_s(interval, SAMPLING_S) == expected
