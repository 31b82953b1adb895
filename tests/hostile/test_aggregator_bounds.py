"""Bounded aggregator memory and store: what one peer sends cannot grow either without
limit. Registrations over a bound are refused naming the field and the limit; summaries
over a bound, or with values that cannot be true, are dropped and counted; registrations
are rate limited; ListNodes pages fit the client's message limit whatever they hold."""

from __future__ import annotations

import contextlib
import gc
import math

import grpc
import pytest

from agent.aggregator.limits import (
    MAX_DELTA_ENTRIES_PER_NODE,
    MAX_GPUS,
    MAX_LABELS,
    MAX_PAGE_BYTES,
    MAX_SUMMARY_STRING_BYTES,
)
from agent.aggregator.registry import Liveness, NodeRegistry
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests.aggregator.inprocess import InProcessAggregator, aggregator

GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024


def register(node: str, **fields: object) -> pb.AgentMessage:
    return pb.AgentMessage(register=pb.Register(node_name=node, **fields))  # type: ignore[arg-type]


def refusal(running: InProcessAggregator, *messages: pb.AgentMessage) -> grpc.RpcError | None:
    try:
        list(running.stub().Connect(iter(messages), timeout=10))
    except grpc.RpcError as exc:
        return exc
    return None


def gpu(index: int, **fields: object) -> pb.GpuSummary:
    return pb.GpuSummary(index=index, uuid=f"GPU-{index:08d}", **fields)  # type: ignore[arg-type]


def summarize(running: InProcessAggregator, node: str, *summaries: pb.NodeSummary) -> None:
    """Register `node` on the aggregator's loop and hand it `summaries` as its stream
    would."""

    async def act() -> None:
        session = await running.fleet.attach(pb.Register(node_name=node))
        for summary in summaries:
            await running.fleet.receive(session, pb.AgentMessage(summary=summary))
        running.fleet.detach(session)

    running.call(act())


def test_a_registration_with_100_kb_of_labels_is_refused_naming_the_field_and_limit() -> None:
    labels = {f"label-{i:05d}": "v" * 63 for i in range(1500)}  # about 110 KB

    with aggregator(insecure_plaintext_agents=True) as running:
        refused = refusal(running, register("node-a", labels=labels))
        stored = running.call(running.fleet.store.list_nodes())

    assert refused is not None
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "register.labels" in (refused.details() or "")
    assert f"at most {MAX_LABELS}" in (refused.details() or "")
    assert stored == {}


def test_a_registered_summary_interval_of_a_billion_seconds_is_refused() -> None:
    message = register("ghost")
    message.register.summary_interval.FromSeconds(10**9)

    with aggregator(insecure_plaintext_agents=True) as running:
        refused = refusal(running, message)

    assert refused is not None
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "register.summary_interval" in (refused.details() or "")


def test_a_summary_of_20000_gpus_is_dropped_and_counted_not_kept() -> None:
    huge = pb.NodeSummary(seq=1, gpus=[gpu(i) for i in range(20_000)])

    with aggregator() as running:
        summarize(running, "node-a", huge)
        kept = running.call(lambda: running.fleet.registry.get("node-a"))
        dropped = running.metrics.summaries_dropped.labels("too_large")._value.get()

    assert kept is not None and kept.summary is None
    assert dropped == 1
    assert len(huge.gpus) > MAX_GPUS


REAL_GPU = gpu(0, power_watts=700.0, utilization_ratio=0.9, nvlink_transmit_bytes_per_second=1e9)


@pytest.mark.parametrize(
    ("bad", "metric", "real_value"),
    [
        (gpu(0, power_watts=1e300), "gpu_power_watts", 700.0),
        (gpu(0, power_watts=math.inf), "gpu_power_watts", 700.0),
        (gpu(0, power_watts=-5.0), "gpu_power_watts", 700.0),
        (gpu(0, utilization_ratio=math.nan), "gpu_utilization_ratio", 0.9),
        (gpu(0, utilization_ratio=7.0), "gpu_utilization_ratio", 0.9),
        (
            gpu(0, nvlink_transmit_bytes_per_second=-math.inf),
            "nvlink_transmit_bytes_per_second",
            1e9,
        ),
    ],
    ids=["1e300-watts", "infinite-watts", "negative-watts", "nan-ratio", "ratio-7", "-inf-rate"],
)
def test_impossible_gpu_values_never_reach_top(
    bad: pb.GpuSummary, metric: str, real_value: float
) -> None:
    with aggregator() as running:
        summarize(running, "real-node", pb.NodeSummary(seq=1, gpus=[REAL_GPU]))
        summarize(running, "fake-node", pb.NodeSummary(seq=1, gpus=[bad]))
        top = running.unix_stub().QueryTop(
            pb.QueryTopRequest(entity=pb.TOP_ENTITY_GPU, metric=metric, limit=5)
        )

    assert [(e.node, e.value) for e in top.entries] == [("real-node", real_value)]


def test_a_summary_with_an_impossible_value_is_counted_as_invalid() -> None:
    with aggregator() as running:
        summarize(running, "fake-node", pb.NodeSummary(gpus=[gpu(0, power_watts=1e300)]))
        dropped = running.metrics.summaries_dropped.labels("invalid")._value.get()

    assert dropped == 1


def test_registrations_past_the_per_peer_rate_are_refused_with_resource_exhausted() -> None:
    with aggregator(insecure_plaintext_agents=True, registrations_per_peer_s=0.01) as running:
        outcomes = [refusal(running, register(f"node-{i}")) for i in range(30)]
        nodes = running.call(lambda: len(running.fleet.registry))

    refused = [o for o in outcomes if o is not None]
    assert refused, "no registration was refused"
    assert {o.code() for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "registrations a second from ipv4:127.0.0.1" in (refused[0].details() or "")
    assert nodes == 30 - len(refused) <= 20


def test_a_new_node_past_max_nodes_is_refused_and_known_nodes_still_register() -> None:
    with aggregator(insecure_plaintext_agents=True, max_nodes=3) as running:
        first = [refusal(running, register(f"node-{i}")) for i in range(3)]
        fourth = refusal(running, register("node-3"))
        again = refusal(running, register("node-0"))

    assert first == [None, None, None]
    assert fourth is not None and fourth.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_nodes" in (fourth.details() or "")
    assert again is None


def test_list_nodes_pages_fit_the_default_client_limit_and_cover_every_node() -> None:
    # Nodes with summaries near the bounds: 200 of them are ~15 MB, far past 4 MiB.
    long_uuid = "G" * MAX_SUMMARY_STRING_BYTES
    heavy = pb.NodeSummary(
        seq=1, gpus=[pb.GpuSummary(index=i, uuid=long_uuid) for i in range(MAX_GPUS)]
    )
    names = [f"node-{i:03d}" for i in range(200)]

    with aggregator() as running:
        for name in names:
            summarize(running, name, heavy)
        stub = running.stub()  # a TCP client with gRPC's default 4 MiB receive limit
        listed: list[str] = []
        sizes: list[int] = []
        token = ""
        while True:
            page = stub.ListNodes(pb.ListNodesRequest(page_size=1000, page_token=token))
            listed += [n.name for n in page.nodes]
            sizes.append(page.ByteSize())
            token = page.next_page_token
            if not token:
                break

    assert listed == names
    assert max(sizes) <= MAX_PAGE_BYTES < GRPC_DEFAULT_RECEIVE_BYTES
    assert len(sizes) > 1


def test_an_hour_of_error_deltas_stays_under_the_per_node_bound() -> None:
    clock = [1_764_140_000.0]
    registry = NodeRegistry(Liveness(), clock=lambda: clock[0])
    registry.register(pb.Register(node_name="node-a"))
    links = [pb.LinkErrorDelta(link=link, errors=1) for link in range(18)]
    erroring = pb.NodeSummary(
        gpus=[gpu(i, nvlink_errors=18, nvlink_link_errors=links) for i in range(16)]
    )

    for _ in range(600):  # ten minutes of summaries, all inside the hour's window
        clock[0] += 1.0
        registry.summary("node-a", erroring)

    record = registry.get("node-a")
    assert record is not None
    assert sum(len(deltas) for _, deltas in record.deltas) <= MAX_DELTA_ENTRIES_PER_NODE
    assert record.deltas, "the latest deltas are kept"


def test_a_refused_registration_is_freed_at_once_not_left_to_the_garbage_collector() -> None:
    # Each refused registration is up to the message limit of native memory: held in a
    # reference cycle, a flood of them grew the aggregator by ~50 KiB each until the
    # collector happened to run (it counts objects, not bytes).
    labels = {f"label-{i:05d}": "v" * 63 for i in range(200)}
    with aggregator(insecure_plaintext_agents=True, registrations_per_peer_s=0.001) as running:
        # Serialized here: every AgentMessage in this process is then the aggregator's.
        wire = [register(f"node-{i}", labels=labels).SerializeToString() for i in range(40)]
        channel = grpc.insecure_channel(running.target)
        connect = channel.stream_stream(
            "/fabric.aggregator.v1.AggregatorService/Connect",
            request_serializer=None,
            response_deserializer=pb.AggregatorMessage.FromString,
        )
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for message in wire:  # refused for their labels, then for their rate
                with contextlib.suppress(grpc.RpcError):
                    list(connect(iter([message]), timeout=10))
            gc.collect()
            cyclic = [o for o in gc.garbage if isinstance(o, pb.AgentMessage | pb.Register)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            channel.close()

    assert cyclic == []
