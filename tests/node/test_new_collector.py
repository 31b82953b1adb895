"""A collector added in its own module reaches every consumer with no other file touched.

The toy below is all a new source writes: its sample dataclass, its section, its options,
its collector and the collector's registration. The fixture makes that registration as
a collector module does at import, inside a registry scope, so the toy exists for these
tests only. Then its samples appear in /metrics, in GetSnapshot over a real gRPC channel
(a generic section, asked for by name), in `fabricctl telemetry --section toy` against
the agent's real telemetry servicer, and in the fleet summary through its summarizer.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from agent.common import rates
from agent.ctl.main import main as fabricctl
from agent.node.api.telemetry import SnapshotHub, add_to_server
from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SharedResources,
    SummaryClock,
    Tick,
    register,
    registrations,
    registry_scope,
    sections,
)
from agent.node.config import AgentConfig
from agent.node.exporter import ExpositionCache
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.runtime import build_collectors
from agent.node.sampler import Sampler
from agent.node.uplink.summary import SummaryBuilder
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub

# --- the new source: what its module would hold ---


@dataclass(frozen=True, slots=True)
class DpuPortSample:
    """One port of a DPU at one tick."""

    port: str
    receive_bytes: int
    healthy: bool
    temperature_celsius: float | None


class DpuPortSummarizer:
    """Each port's receive rate in the fleet summary, as a NIC of its own."""

    def __init__(self) -> None:
        self._at_s: float | None = None
        self._received: dict[str, int] = {}

    def summarize(
        self, samples: tuple[DpuPortSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        elapsed_s = clock.elapsed_s(self._at_s)
        for sample in samples:
            message = summary.nics.add(
                device=f"dpu/{sample.port}", operstate="up" if sample.healthy else "down"
            )
            rate = rates.rate(sample.receive_bytes, self._received.get(sample.port), elapsed_s)
            if rate is not None:
                message.receive_bytes_per_second = rate
        self._at_s = clock.completed_wall_s
        self._received = {sample.port: sample.receive_bytes for sample in samples}


TOY = Section("toy", DpuPortSample, summarizer=DpuPortSummarizer)


@dataclass(frozen=True, slots=True)
class ToyOptions:
    node_name: str


class ToyCollector:
    name = "toy"
    sections = (TOY,)

    def __init__(self, options: ToyOptions) -> None:
        self._prefix = options.node_name

    def collect(self, tick: Tick) -> tuple[DpuPortSample, ...]:
        return (
            DpuPortSample(f"{self._prefix}-p0", 1000 * tick.seq, True, 41.5),
            DpuPortSample(f"{self._prefix}-p1", 0, False, None),
        )

    def metrics(self, samples: Sequence[DpuPortSample]) -> Iterable[Family]:
        received = CounterFamily("fabric_toy_receive_bytes_total", "Bytes received.", ["port"])
        healthy = GaugeFamily("fabric_toy_healthy", "1 when the port is healthy.", ["port"])
        for sample in samples:
            received.add_metric([sample.port], sample.receive_bytes)
            healthy.add_metric([sample.port], 1 if sample.healthy else 0)
        return (received, healthy)

    def close(self) -> None:
        pass


def create_toy(context: CollectorContext[ToyOptions]) -> ToyCollector:
    return ToyCollector(context.options)


# --- the tests ---


@pytest.fixture
def toy() -> Iterator[None]:
    """The toy registered as its module would register it, for this test only."""
    with registry_scope():
        register(ToyCollector, options=ToyOptions)(create_toy)
        yield


@pytest.fixture
def sampler(toy: None) -> Iterator[Sampler]:
    """The toy and the host collector, as the agent builds them from its configuration."""
    shared = SharedResources()
    config = AgentConfig(node_name="dpu", collectors=("toy", "host"))
    sampler = Sampler(build_collectors(config, shared), node_name="n1", interval_s=1.0, timeout_s=5)
    try:
        yield sampler
    finally:
        sampler.close()
        shared.close()


@pytest.fixture
def agent_api(sampler: Sampler) -> Iterator[tuple[str, SnapshotHub]]:
    """The agent's telemetry servicer on a unix socket, over a hub fed by `sampler`."""
    hub = SnapshotHub(1.0)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    add_to_server(server, hub)
    with tempfile.TemporaryDirectory(prefix="fabric-toy-") as directory:
        target = f"unix:{directory}/agent.sock"
        server.add_insecure_port(target)
        server.start()
        try:
            yield target, hub
        finally:
            hub.close()
            server.stop(grace=None).wait()


def test_its_samples_are_in_metrics(sampler: Sampler) -> None:
    cache = ExpositionCache(sampler.collectors)

    body = cache.update(sampler.sample(Tick(3, 0.0, 1000.0))).body.decode()

    assert 'fabric_toy_receive_bytes_total{port="dpu-p0"} 3000\n' in body
    assert 'fabric_toy_healthy{port="dpu-p1"} 0\n' in body
    assert 'fabric_collector_success{collector="toy"} 1.0\n' in body


def test_get_snapshot_carries_it_as_a_generic_section_by_name(
    sampler: Sampler, agent_api: tuple[str, SnapshotHub]
) -> None:
    target, hub = agent_api
    hub.publish(sampler.sample(Tick(2, 0.0, 1000.0)))

    with grpc.insecure_channel(target) as channel:
        stub = TelemetryServiceStub(channel)
        asked = stub.GetSnapshot(pb.GetSnapshotRequest(section_names=["toy"]), timeout=5)
        everything = stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5)

    snapshot = asked.snapshot
    assert list(snapshot.section_names) == ["toy"]
    assert [c.name for c in snapshot.collectors] == ["toy"]
    assert not snapshot.host
    (section,) = snapshot.sections
    assert section.name == "toy"
    assert list(section.fields) == ["port", "receive_bytes", "healthy", "temperature_celsius"]
    first, second = (dict(sample) for sample in section.samples)
    assert first == {
        "port": "dpu-p0",
        "receive_bytes": 2000.0,
        "healthy": True,
        "temperature_celsius": 41.5,
    }
    assert second["temperature_celsius"] is None
    assert everything.snapshot.section_names[-1] == "toy"
    assert len(everything.snapshot.host) == 1


def test_an_unknown_section_is_refused_listing_the_agents(
    sampler: Sampler, agent_api: tuple[str, SnapshotHub]
) -> None:
    target, hub = agent_api
    hub.publish(sampler.sample(Tick(1, 0.0, 1000.0)))

    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as raised:
        TelemetryServiceStub(channel).GetSnapshot(
            pb.GetSnapshotRequest(section_names=["toy", "disk"]), timeout=5
        )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "section_names[1]: unknown section 'disk'; this agent has gpu, nvlink, nic, rdma, "
        "qos, host, jobs, toy"
    )


def test_fabricctl_prints_it_as_a_table_of_its_fields(
    sampler: Sampler, agent_api: tuple[str, SnapshotHub], capsys: pytest.CaptureFixture[str]
) -> None:
    target, hub = agent_api
    hub.publish(sampler.sample(Tick(4, 0.0, 1000.0)))

    code = fabricctl(["--agent", target, "telemetry", "--section", "toy"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[2:] == [
        "TOY",
        "PORT    RECEIVE_BYTES  HEALTHY  TEMPERATURE_CELSIUS",
        "dpu-p0  4000           true     41.5",
        "dpu-p1  0              false    -",
    ]


def test_fabricctl_names_the_agents_sections_for_an_unknown_one(
    sampler: Sampler, agent_api: tuple[str, SnapshotHub], capsys: pytest.CaptureFixture[str]
) -> None:
    target, hub = agent_api
    hub.publish(sampler.sample(Tick(1, 0.0, 1000.0)))

    code = fabricctl(["--agent", target, "telemetry", "--section", "disk"])

    assert code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "section_names[0]: unknown section 'disk'; this agent has gpu, nvlink, nic, rdma, "
            "qos, host, jobs, toy"
        )
    )


def test_the_summary_builder_runs_its_summarizer(sampler: Sampler) -> None:
    builder = SummaryBuilder()
    first = sampler.sample(Tick(1, 0.0, 1000.0))
    # Two seconds later by the snapshots' clocks: 2000 more bytes on p0.
    second = dataclasses.replace(
        sampler.sample(Tick(3, 2.0, 1002.0)), completed_wall_s=first.completed_wall_s + 2.0
    )

    builder.next(first)
    summary = builder.next(second)

    p0 = next(nic for nic in summary.nics if nic.device == "dpu/dpu-p0")
    p1 = next(nic for nic in summary.nics if nic.device == "dpu/dpu-p1")
    assert (p0.operstate, p1.operstate) == ("up", "down")
    assert p0.receive_bytes_per_second == 1000.0


def test_the_registry_is_back_to_the_agents_own_after_the_fixture() -> None:
    assert "toy" not in registrations()
    assert "toy" not in sections()
