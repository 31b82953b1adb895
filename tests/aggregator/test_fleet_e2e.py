"""The fleet end to end: real aggregator and agent processes, real gRPC clients, a real
kernel. Agents run on the simulated 8-GPU node; those that are to enforce a fleet policy
run in a network namespace of their own, where the policy's interface exists or not."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from agent import __version__
from agent.common.policy.documents import encode_document
from agent.node.qos.tc import TcCapabilities
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2_grpc import AggregatorServiceStub
from agent.proto.fabric.v1 import telemetry_service_pb2
from tests.aggregator.conftest import EtcdServer
from tests.aggregator.processes import Agent, Aggregator, ClientTls, Lab, ServerTls
from tests.conftest import netns_unavailable
from tests.node.qos import api_policy_document
from tests.pki import Ca, Issued

POLICY = "fleet-net"
TRAINING = {"pool": "training"}
CONNECTED, STALE, UNREACHABLE = (
    pb.NODE_STATUS_CONNECTED,
    pb.NODE_STATUS_STALE,
    pb.NODE_STATUS_UNREACHABLE,
)
APPLIED, FAILED, PENDING = (
    pb.NODE_POLICY_STATE_APPLIED,
    pb.NODE_POLICY_STATE_FAILED,
    pb.NODE_POLICY_STATE_PENDING,
)
REFUSED = "fabric_aggregator_agents_refused_total"
# Long enough for every connected node to report on a 2-core machine under load.
WAIT_S = 10


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def apply_request(interface: str, selector: dict[str, str]) -> pb.ApplyPolicyRequest:
    """The two-class QoS policy `POLICY` on `interface`, for the nodes `selector` picks."""
    return pb.ApplyPolicyRequest(
        object=encode_document(api_policy_document(interface, name=POLICY)),
        selector=selector,
        wait=seconds(WAIT_S),
    )


def apply(stub: AggregatorServiceStub, selector: dict[str, str]) -> dict[str, pb.NodePolicyStatus]:
    """ApplyPolicy of `POLICY` on fab0, waiting for reports: each node's status by name."""
    response = stub.ApplyPolicy(apply_request("fab0", selector), timeout=WAIT_S + 10)
    assert response.revision > 0
    return {status.node: status for status in response.nodes}


def delete(stub: AggregatorServiceStub) -> dict[str, pb.NodePolicyStatus]:
    request = pb.DeletePolicyRequest(name=POLICY, wait=seconds(WAIT_S))
    response = stub.DeletePolicy(request, timeout=WAIT_S + 10)
    return {status.node: status for status in response.nodes}


def registered_here(aggregator: Aggregator, name: str) -> bool:
    """`name` is connected to this aggregator and has sent it a summary (a node another
    replica serves, or one the store remembers, shows no summary)."""
    node = aggregator.nodes().get(name)
    return node is not None and node.status == CONNECTED and len(node.summary.gpus) == 8


def sqlite_store(lab: Lab) -> str:
    return f"sqlite://{lab.directory / 'state.db'}"


@pytest.fixture
def lab(tmp_path: Path, fakenvml_library: Path) -> Iterator[Lab]:
    with Lab(tmp_path, fakenvml_library) as started:
        yield started


@pytest.fixture
def shaping(tc_capabilities: TcCapabilities) -> None:
    """Namespaces can be made here (root), and their kernel shapes with HTB and u32."""
    if not tc_capabilities.htb:
        pytest.skip("kernel has no htb qdisc")
    if not tc_capabilities.u32:
        pytest.skip("kernel has no u32 classifier")


# --- one aggregator, three nodes ---


@dataclass
class Fleet:
    lab: Lab
    aggregator: Aggregator
    agents: dict[str, Agent]
    # Why the agents share the test's namespace (None: each has its own).
    no_netns: str | None


@pytest.fixture(scope="class")
def fleet(tmp_path_factory: pytest.TempPathFactory, fakenvml_library: Path) -> Iterator[Fleet]:
    """One aggregator on SQLite and three agents: node-a and node-b in pool training,
    node-c in pool inference. Each in its own namespace where the host allows: node-a
    and node-c with interface fab0, node-b with fab1 only."""
    no_netns = netns_unavailable()
    with Lab(tmp_path_factory.mktemp("fleet"), fakenvml_library) as lab:
        aggregator = lab.aggregator("aggregator", sqlite_store(lab))
        agents = {}
        for name, pool, interface in (
            ("node-a", "training", "fab0"),
            ("node-b", "training", "fab1"),
            ("node-c", "inference", "fab0"),
        ):
            netns = lab.netns(interface) if no_netns is None else None
            agents[name] = lab.agent(name, {"pool": pool, "rack": "r1"}, aggregator, netns=netns)
        lab.wait_for(
            lambda: all(registered_here(aggregator, name) for name in agents),
            "three nodes connected with summaries",
            30,
        )
        yield Fleet(lab, aggregator, agents, no_netns)


class TestThreeNodes:
    def test_nodes_register_and_send_summaries(self, fleet: Fleet) -> None:
        stub = fleet.aggregator.stub

        first = fleet.aggregator.nodes()

        def advanced() -> dict[str, pb.Node] | None:
            nodes = fleet.aggregator.nodes()
            return (
                nodes if all(nodes[n].summary.seq > first[n].summary.seq for n in first) else None
            )

        later = fleet.lab.wait_for(advanced, "every node's summary seq advancing")
        training = stub.ListNodes(pb.ListNodesRequest(selector=TRAINING))
        page_1 = stub.ListNodes(pb.ListNodesRequest(page_size=2))
        page_2 = stub.ListNodes(pb.ListNodesRequest(page_size=2, page_token=page_1.next_page_token))
        got = stub.GetNode(pb.GetNodeRequest(name="node-b", full_snapshot=True), timeout=15)
        top = stub.QueryTop(
            pb.QueryTopRequest(entity=pb.TOP_ENTITY_GPU, metric="gpu_power_watts", limit=3)
        )

        assert sorted(first) == ["node-a", "node-b", "node-c"]
        pools = {"node-a": "training", "node-b": "training", "node-c": "inference"}
        for name, node in later.items():
            assert node.status == CONNECTED, name
            assert dict(node.labels) == {"pool": pools[name], "rack": "r1"}
            assert node.agent_version == __version__
            assert {"gpu", "nvlink", "qos", "qos-enforce"} <= set(node.capabilities)
            assert len(node.summary.gpus) == 8
            assert node.last_seen.seconds > 0
        assert [n.name for n in training.nodes] == ["node-a", "node-b"]
        assert [n.name for n in page_1.nodes] == ["node-a", "node-b"]
        assert page_1.next_page_token
        assert [n.name for n in page_2.nodes] == ["node-c"]
        assert page_2.next_page_token == ""
        assert got.node.name == "node-b" and got.snapshot_error == ""
        snapshot = telemetry_service_pb2.GetSnapshotResponse.FromString(got.snapshot).snapshot
        assert snapshot.node_name == "node-b"
        assert len(snapshot.gpus) == 8
        values = [entry.value for entry in top.entries]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert all(entry.node in first and entry.entity.isdigit() for entry in top.entries)
        assert values[0] > 0

    def test_a_selector_no_label_could_match_is_invalid(self, fleet: Fleet) -> None:
        # The grammar agents' labels follow: a selector outside it could never match.
        with pytest.raises(grpc.RpcError) as refused:
            fleet.aggregator.stub.ApplyPolicy(apply_request("fab0", {"pool": "a b"}), timeout=10)

        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "selector: label pool='a b'" in str(refused.value.details())

    def test_policy_fans_out_by_selector_and_is_removed(self, fleet: Fleet, shaping: None) -> None:
        if fleet.no_netns is not None:
            pytest.skip(fleet.no_netns)
        stub = fleet.aggregator.stub
        node_a, node_c = fleet.agents["node-a"], fleet.agents["node-c"]
        assert node_a.netns is not None and node_c.netns is not None

        with fleet.aggregator.events(pb.EVENT_KIND_POLICY_STATUS) as events:
            applied = apply(stub, TRAINING)
            events.wait(
                lambda seen: {e.node for e in seen if e.subject == POLICY} >= {"node-a", "node-b"},
                "policy status events from node-a and node-b",
            )
        a_kernel, c_kernel = node_a.netns.qdiscs(), node_c.netns.qdiscs()
        held = {name: agent.fleet_policies() for name, agent in fleet.agents.items()}

        assert sorted(applied) == ["node-a", "node-b"]
        assert applied["node-a"].state == APPLIED, applied["node-a"].message
        assert applied["node-b"].state == FAILED
        assert "unknown interface 'fab0'" in applied["node-b"].message
        assert " htb " in a_kernel
        assert " htb " not in c_kernel
        assert held == {"node-a": [POLICY], "node-b": [], "node-c": []}
        messages = {e.node: e.message for e in events.seen}
        assert messages["node-a"].endswith("applied")
        assert "failed" in messages["node-b"] and "fab0" in messages["node-b"]

        removed = delete(stub)

        assert "node-c" not in removed
        assert removed["node-a"].state == APPLIED
        assert removed["node-a"].message == "removed"
        assert " htb " not in node_a.netns.qdiscs()
        assert node_a.fleet_policies() == []


# --- liveness, restarts, identity, replicas ---


def test_killed_agent_turns_stale_then_unreachable(lab: Lab) -> None:
    aggregator = lab.aggregator("aggregator", sqlite_store(lab))
    agent = lab.agent("node-x", TRAINING, aggregator)
    lab.wait_for(lambda: registered_here(aggregator, "node-x"), "node-x connected", 30)

    with aggregator.events(pb.EVENT_KIND_NODE_STALE, pb.EVENT_KIND_NODE_GONE) as events:
        agent.process.kill()
        lab.wait_for(lambda: aggregator.nodes()["node-x"].status == STALE, "node-x stale")
        lab.wait_for(
            lambda: aggregator.nodes()["node-x"].status == UNREACHABLE, "node-x unreachable"
        )
        events.wait(lambda seen: len(seen) >= 2, "stale and gone events")
    unreachable = lab.wait_for(
        lambda: aggregator.metric("fabric_aggregator_nodes", status="unreachable") == 1.0,
        "fabric_aggregator_nodes{status='unreachable'} 1",
        5,
    )

    assert [(e.kind, e.node) for e in events.seen] == [
        (pb.EVENT_KIND_NODE_STALE, "node-x"),
        (pb.EVENT_KIND_NODE_GONE, "node-x"),
    ]
    assert unreachable
    assert aggregator.metric("fabric_aggregator_nodes", status="connected") == 0.0


def test_desired_state_survives_an_aggregator_restart(lab: Lab, shaping: None) -> None:
    store = sqlite_store(lab)
    first = lab.aggregator("aggregator-1", store)
    netns = lab.netns("fab0")
    agent = lab.agent("node-a", TRAINING, first, netns=netns)
    lab.wait_for(lambda: registered_here(first, "node-a"), "node-a connected", 30)
    assert apply(first.stub, TRAINING)["node-a"].state == APPLIED

    assert first.process.stop() == 0
    second = lab.aggregator("aggregator-2", store, port=first.port)
    # Its reconnect backoff is at most 1, 2, 4 s in turn.
    lab.wait_for(lambda: registered_here(second, "node-a"), "node-a registered again", 10)
    # The new aggregator sent the assignment it read from the store, and the agent
    # applied it (again): nothing was dropped as "no longer assigned".
    lab.wait_for(
        lambda: second.metric("fabric_aggregator_policy_reports_total", outcome="applied") == 1.0,
        "node-a reporting the stored policy applied to the new aggregator",
    )
    held, kernel = agent.fleet_policies(), netns.qdiscs()
    removed = delete(second.stub)

    assert held == [POLICY]
    assert " htb " in kernel
    assert removed["node-a"].state == APPLIED and removed["node-a"].message == "removed"
    assert " htb " not in netns.qdiscs()
    assert agent.fleet_policies() == []


def _client(aggregator: Aggregator, ca: Ca, identity: Issued) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, identity.key_pem, identity.cert_pem)
    return grpc.secure_channel(aggregator.address, credentials)


def test_mtls_binds_agents_to_their_certificates_and_mutations_to_identities(
    lab: Lab, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca = Ca(tls_dir, "fleet-ca")
    server = ca.issue("aggregator", server=True, dns=["localhost"], ips=["127.0.0.1"])
    node_a, operator, intruder = (ca.issue(n) for n in ("node-a", "operator", "intruder"))
    tls = ServerTls(server.cert, server.key, ca.cert, ("operator",))
    aggregator = lab.aggregator("aggregator", sqlite_store(lab), tls=tls)
    agent_tls = ClientTls(ca.cert, node_a.cert, node_a.key)
    # A selector no node matches: the accepted apply must not shape the test's host.
    request = apply_request("fab0", {"pool": "nowhere"})
    request.wait.Clear()

    lab.agent("node-b", TRAINING, aggregator, tls=agent_tls, process_name="impostor")
    lab.agent("node-a", TRAINING, aggregator, tls=agent_tls)
    lab.wait_for(lambda: registered_here(aggregator, "node-a"), "node-a connected", 30)
    lab.wait_for(
        lambda: (aggregator.metric(REFUSED, reason="identity") or 0) >= 1, "the impostor refused"
    )
    nodes = aggregator.nodes()
    with _client(aggregator, ca, intruder) as channel, pytest.raises(grpc.RpcError) as refused:
        AggregatorServiceStub(channel).ApplyPolicy(request, timeout=10)
    with _client(aggregator, ca, operator) as channel:
        accepted = AggregatorServiceStub(channel).ApplyPolicy(request, timeout=10)

    assert sorted(nodes) == ["node-a"]
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "intruder" in (refused.value.details() or "")
    assert accepted.revision > 0 and list(accepted.nodes) == []


def test_replicas_on_one_etcd_share_desired_state(
    lab: Lab, etcd_server: EtcdServer, shaping: None
) -> None:
    store = f"etcd://127.0.0.1:{etcd_server.port}?prefix=/fabric-{secrets.token_hex(4)}/"
    replica_1 = lab.aggregator("replica-1", store)
    replica_2 = lab.aggregator("replica-2", store)
    netns = lab.netns("fab0")
    agent = lab.agent("node-a", TRAINING, replica_2, netns=netns)
    lab.wait_for(lambda: registered_here(replica_2, "node-a"), "node-a on replica 2", 30)
    lab.wait_for(
        lambda: (node := replica_1.nodes().get("node-a")) and node.status == CONNECTED,
        "replica 1 seeing node-a through the store",
    )

    applied = apply(replica_1.stub, TRAINING)
    lab.wait_for(netns.has_htb, "htb on fab0 in node-a's namespace")
    held = agent.fleet_policies()
    removed = delete(replica_1.stub)
    lab.wait_for(lambda: not netns.has_htb(), "htb gone from fab0")

    assert list(applied) == ["node-a"]
    assert applied["node-a"].state in (PENDING, APPLIED), applied["node-a"].message
    if applied["node-a"].state == PENDING:
        assert "another replica" in applied["node-a"].message
    assert held == [POLICY]
    assert list(removed) == ["node-a"]
    assert removed["node-a"].state == PENDING
    assert "another replica" in removed["node-a"].message
    assert agent.fleet_policies() == []
