"""fabric.v1.TelemetryService: a real gRPC server on a unix socket and a real client stub;
and the SnapshotHub's queues and shared encodings on their own."""

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
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agent.node.api import convert, telemetry
from agent.node.api.telemetry import (
    PublishedSnapshot,
    SnapshotHub,
    add_to_server,
    get_snapshot_response,
    method_handlers,
    watch_interval_s,
    watch_snapshots_response,
)
from agent.node.snapshot import Snapshot
from agent.proto.fabric.v1 import telemetry_pb2
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub
from tests.node.api import snapshot

SAMPLING_S = 0.05
QUEUE_SIZE = 4
MAX_STREAMS = 3


@pytest.fixture
def hub() -> SnapshotHub:
    return SnapshotHub(SAMPLING_S, queue_size=QUEUE_SIZE, max_subscriptions=MAX_STREAMS)


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
    assert [c.name for c in message.collectors] == ["gpu", "rdma"]


def test_unknown_section_is_invalid(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot())

    with pytest.raises(grpc.RpcError) as raised:
        stub.GetSnapshot(pb.GetSnapshotRequest(sections=[pb.SECTION_UNSPECIFIED]), timeout=5)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown section 0" in (raised.value.details() or "")


def test_unknown_section_name_is_invalid_naming_the_agents(
    hub: SnapshotHub, stub: TelemetryServiceStub
) -> None:
    hub.publish(snapshot())

    with pytest.raises(grpc.RpcError) as raised:
        stub.WatchSnapshots(pb.WatchSnapshotsRequest(section_names=["disk"]), timeout=5).next()

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    (violation,) = detail.field_violations
    assert violation.field == "section_names[0]"
    assert violation.description == (
        "unknown section 'disk'; this agent has gpu, nvlink, nic, rdma, qos, host, jobs"
    )


def test_watch_by_section_name(hub: SnapshotHub, stub: TelemetryServiceStub) -> None:
    hub.publish(snapshot(seq=4))

    stream = stub.WatchSnapshots(pb.WatchSnapshotsRequest(section_names=["rdma"]), timeout=10)
    message = next(stream).snapshot
    stream.cancel()

    assert list(message.section_names) == ["rdma"]
    assert len(message.rdma_ports) == 1 and not message.gpus
    assert [c.name for c in message.collectors] == ["rdma"]


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
        subscription.offer(PublishedSnapshot(item), now_s=index * SAMPLING_S)

    assert hub.queue_lengths() == [3]
    first = subscription.get(0)
    assert first is not None
    assert (first[0].snapshot.seq, first[1]) == (8, 7)
    rest = [subscription.get(0) for _ in range(2)]
    assert [(p.snapshot.seq, m) for p, m in filter(None, rest)] == [(9, 0), (10, 0)]
    assert subscription.get(0) is None
    subscription.close()
    assert hub.queue_lengths() == []


def test_hub_takes_snapshots_at_the_subscribed_interval() -> None:
    hub = SnapshotHub(1.0, queue_size=100)
    subscription = hub.subscribe(3.0)

    # Ticks a little late or early still count: half an interval of slack.
    for seq, now_s in enumerate([0.0, 1.0, 2.1, 2.9, 4.0, 5.0, 6.2], start=1):
        subscription.offer(PublishedSnapshot(snapshot(seq)), now_s)

    taken = []
    while (item := subscription.get(0)) is not None:
        taken.append(item[0].snapshot.seq)
    assert taken == [1, 4, 7]


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(0, 0, SAMPLING_S), (0, 1000, SAMPLING_S), (2, 500_000_000, 2.5)],
)
def test_watch_interval(seconds: int, nanos: int, expected: float) -> None:
    interval = duration_pb2.Duration(seconds=seconds, nanos=nanos)

    assert watch_interval_s(interval, SAMPLING_S) == expected


def test_hub_keeps_a_stalled_subscription_bounded() -> None:
    hub = SnapshotHub(SAMPLING_S, queue_size=QUEUE_SIZE)
    subscription = hub.subscribe(0)
    published = 20

    lengths = []
    for seq in range(1, published + 1):
        hub.publish(snapshot(seq))
        time.sleep(SAMPLING_S * 0.6)  # past the subscription's minimum gap
        lengths.append(max(hub.queue_lengths()))
    delivered, missed = [], 0
    while (item := subscription.get(1.0)) is not None:
        delivered.append(item[0].snapshot.seq)
        missed += item[1]
        if delivered[-1] == published:
            break
    hub.close()

    assert max(lengths) == QUEUE_SIZE
    assert delivered == list(range(published - QUEUE_SIZE + 1, published + 1))
    assert missed == published - QUEUE_SIZE


def test_hub_refuses_streams_past_its_limit() -> None:
    hub = SnapshotHub(SAMPLING_S, max_subscriptions=2)
    first, second = hub.subscribe(0), hub.subscribe(0)

    with pytest.raises(telemetry.StreamLimitError):
        hub.subscribe(0)
    first.close()
    third = hub.subscribe(0)

    assert len(hub.queue_lengths()) == 2
    second.close()
    third.close()
    hub.close()


# --- shared encodings ---


def test_a_section_set_is_converted_once_by_concurrent_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conversions: list[frozenset[str]] = []
    real = convert.snapshot_message

    def counting(item: Snapshot, sections: frozenset[str]) -> telemetry_pb2.Snapshot:
        conversions.append(sections)
        time.sleep(0.05)  # long enough for every reader to arrive while it converts
        return real(item, sections)

    monkeypatch.setattr(convert, "snapshot_message", counting)
    published = PublishedSnapshot(snapshot(seq=5))
    every = convert.validate_sections(())
    gpus = convert.validate_sections([pb.SECTION_GPU])

    with ThreadPoolExecutor(max_workers=8) as pool:
        encoded = list(pool.map(lambda _: published.encoded(every), range(8)))
    gpu_only = published.encoded(gpus)

    assert sorted(map(len, conversions)) == [1, len(every)]
    assert len(set(encoded)) == 1
    assert encoded[0] == real(snapshot(seq=5), every).SerializeToString()
    assert pb.GetSnapshotResponse.FromString(get_snapshot_response(gpu_only)).snapshot.gpus


def test_streams_and_calls_share_one_conversion_per_section_set(
    hub: SnapshotHub, stub: TelemetryServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions: list[tuple[int, frozenset[str]]] = []
    real = convert.snapshot_message

    def counting(item: Snapshot, sections: frozenset[str]) -> telemetry_pb2.Snapshot:
        conversions.append((item.seq, sections))
        return real(item, sections)

    monkeypatch.setattr(convert, "snapshot_message", counting)
    hub.publish(snapshot(seq=1))
    full = [stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=10) for _ in range(2)]
    host = stub.WatchSnapshots(pb.WatchSnapshotsRequest(sections=[pb.SECTION_HOST]), timeout=10)
    assert [next(stream).snapshot.seq for stream in (*full, host)] == [1, 1, 1]

    time.sleep(SAMPLING_S)  # past the streams' minimum gap
    hub.publish(snapshot(seq=2))
    second = [next(stream).snapshot for stream in (*full, host)]
    unary = [stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5).snapshot for _ in range(3)]
    for stream in (*full, host):
        stream.cancel()

    assert [m.seq for m in second + unary] == [2] * 6
    assert len(second[0].nvlinks) == 2 and not second[2].nvlinks
    # Per snapshot, one conversion for all sections and one for the host section alone.
    every = len(convert.validate_sections(()))
    assert sorted((seq, len(sections)) for seq, sections in conversions) == [
        (1, 1), (1, every), (2, 1), (2, every),
    ]  # fmt: skip


@pytest.mark.parametrize("missed", [0, 1, 300])
def test_pre_serialized_responses_are_the_messages(missed: int) -> None:
    message = convert.snapshot_to_proto(snapshot(seq=9))
    encoded = message.SerializeToString()

    get = pb.GetSnapshotResponse.FromString(get_snapshot_response(encoded))
    watch = pb.WatchSnapshotsResponse.FromString(watch_snapshots_response(encoded, missed))

    assert get == pb.GetSnapshotResponse(snapshot=message)
    assert watch == pb.WatchSnapshotsResponse(snapshot=message, missed=missed)


def test_handlers_cover_every_method_of_the_service(hub: SnapshotHub) -> None:
    service = pb.DESCRIPTOR.services_by_name["TelemetryService"]

    assert set(method_handlers(hub)) == {method.name for method in service.methods}


# --- the stream limit over gRPC ---


def test_streams_past_the_limit_are_resource_exhausted(
    hub: SnapshotHub, stub: TelemetryServiceStub
) -> None:
    hub.publish(snapshot(seq=1))
    streams = [stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=10) for _ in range(3)]
    assert [next(stream).snapshot.seq for stream in streams] == [1] * MAX_STREAMS

    with pytest.raises(grpc.RpcError) as refused:
        next(stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=5))
    unary = stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5)
    streams[0].cancel()
    _wait_for(lambda: len(hub.queue_lengths()) < MAX_STREAMS)
    admitted = stub.WatchSnapshots(pb.WatchSnapshotsRequest(), timeout=10)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 snapshot streams are open" in (refused.value.details() or "")
    assert unary.snapshot.seq == 1
    assert next(admitted).snapshot.seq == 1
    for stream in (admitted, *streams[1:]):
        stream.cancel()
