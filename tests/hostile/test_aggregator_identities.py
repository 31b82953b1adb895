"""Identities cannot be forged: a certificate's names are read from the certificate (not
gRPC's C-string copy of the CN), refused when they hold a NUL or any non-printable
character, and its SANs, when it has any, are its identity rather than its CN. Real
certificates (tests/pki.py), real mTLS channels, for the aggregator and for the agent's
own mTLS listener, which share the rule (agent/common/security.py)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

import grpc
import pytest

from agent.common.policy.documents import encode_document
from agent.common.security import TlsFiles
from agent.node.api.server import ApiServer
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from tests.aggregator.inprocess import InProcessAggregator, aggregator
from tests.node.api.test_listeners import apply_code, hub, loopback, start_api, tls_channel
from tests.node.qos import api_policy_document
from tests.pki import Issued, Pki

__all__ = ["hub", "start_api"]  # fixtures of the agent's listener tests, used here

OPERATOR = "rt-operator"
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture
def mtls_aggregator(pki: Pki) -> Iterator[InProcessAggregator]:
    with aggregator(
        grpc_tls_cert=pki.server.cert,
        grpc_tls_key=pki.server.key,
        grpc_client_ca=pki.ca.cert,
        grpc_allowed_identities=(OPERATOR,),
    ) as running:
        yield running


def apply_fleet_policy(running: InProcessAggregator, pki: Pki, client: Issued) -> grpc.StatusCode:
    stub = running.stub(client, pki.ca.cert_pem)
    request = pb.ApplyPolicyRequest(
        object=encode_document(api_policy_document("fab0", "train-net")), validate_only=True
    )
    try:
        stub.ApplyPolicy(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def register_as(
    running: InProcessAggregator, pki: Pki, client: Issued, node: str
) -> grpc.StatusCode:
    stub = running.stub(client, pki.ca.cert_pem)
    hello = pb.AgentMessage(register=pb.Register(node_name=node))
    try:
        list(stub.Connect(iter([hello]), timeout=10))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_common_name_with_a_nul_does_not_pass_as_the_allowed_identity_before_it(
    mtls_aggregator: InProcessAggregator, pki: Pki
) -> None:
    forged = pki.ca.issue(f"{OPERATOR}\0evil", file_name="forged")
    genuine = pki.ca.issue(OPERATOR)

    assert apply_fleet_policy(mtls_aggregator, pki, forged) in REFUSED
    assert apply_fleet_policy(mtls_aggregator, pki, genuine) == grpc.StatusCode.OK


def test_an_agent_cannot_register_as_the_node_before_the_nul_in_its_common_name(
    mtls_aggregator: InProcessAggregator, pki: Pki
) -> None:
    forged = pki.ca.issue("node-a\0evil", file_name="forged-node")
    genuine = pki.ca.issue("node-a")

    assert register_as(mtls_aggregator, pki, forged, "node-a") in REFUSED
    assert register_as(mtls_aggregator, pki, genuine, "node-a") == grpc.StatusCode.OK


def test_a_control_character_in_any_san_makes_the_certificate_no_identity(
    mtls_aggregator: InProcessAggregator, pki: Pki
) -> None:
    crafted = pki.ca.issue("crafted", dns=[OPERATOR], uris=["spiffe://fabric/x\x1b[2K"])

    assert apply_fleet_policy(mtls_aggregator, pki, crafted) in REFUSED


def test_a_certificate_with_sans_is_not_its_common_name(
    mtls_aggregator: InProcessAggregator, pki: Pki
) -> None:
    # A CA that issues "node-7" with a CN its requester chose must not make node-7 an
    # operator: the SANs are the identity when there are any.
    node_with_operator_cn = pki.ca.issue(OPERATOR, dns=["node-7"], file_name="node-7")
    operator_by_san = pki.ca.issue("anything", uris=[OPERATOR], file_name="operator-san")

    assert apply_fleet_policy(mtls_aggregator, pki, node_with_operator_cn) in REFUSED
    assert register_as(mtls_aggregator, pki, node_with_operator_cn, "node-7") == (
        grpc.StatusCode.OK
    )
    assert apply_fleet_policy(mtls_aggregator, pki, operator_by_san) == grpc.StatusCode.OK


def test_the_agents_mtls_listener_refuses_a_forged_common_name_too(
    start_api: Callable[..., ApiServer], pki: Pki
) -> None:
    allowed = "fabric-aggregator"
    api = start_api(
        loopback(TlsFiles(pki.server.cert, pki.server.key, pki.ca.cert), frozenset({allowed}))
    )
    forged = pki.ca.issue(f"{allowed}\0evil", file_name="forged")

    code, _ = apply_code(tls_channel(api.tcp_port, pki.ca.cert_pem, forged))
    allowed_code, _ = apply_code(tls_channel(api.tcp_port, pki.ca.cert_pem, pki.allowed))

    assert code in REFUSED
    assert allowed_code == grpc.StatusCode.OK


# --- who may hold a node's stream ---


def registration(node: str) -> pb.AgentMessage:
    return pb.AgentMessage(register=pb.Register(node_name=node))


class OpenStream:
    """An agent stream kept open until `close`, its first answer read."""

    def __init__(self, stub: pb_grpc.AggregatorServiceStub, node: str) -> None:
        self._outgoing: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self._outgoing.put(registration(node))
        self.call = stub.Connect(iter(self._outgoing.get, None), timeout=30)
        self.first = next(self.call)

    def close(self) -> None:
        self._outgoing.put(None)
        self.call.cancel()


def test_an_agent_stream_over_plaintext_tcp_is_refused_unless_the_operator_allows_it() -> None:
    with aggregator() as strict:
        with pytest.raises(grpc.RpcError) as refused:
            list(strict.stub().Connect(iter([registration("node-a")]), timeout=10))
        strict_nodes = strict.call(lambda: len(strict.fleet.registry))
    with aggregator(insecure_plaintext_agents=True) as lax:
        answers = list(lax.stub().Connect(iter([registration("node-a")]), timeout=10))
        insecure = lax.metrics.insecure_agent_streams._value.get()

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "mTLS" in (refused.value.details() or "")
    assert strict_nodes == 0
    assert answers[0].WhichOneof("kind") == "registered"
    assert insecure == 1


def test_a_second_stream_for_a_live_node_is_refused_and_the_first_keeps_its_stream() -> None:
    with aggregator(insecure_plaintext_agents=True) as running:
        real = OpenStream(running.stub(), "node-a")
        try:
            with pytest.raises(grpc.RpcError) as refused:
                list(running.stub().Connect(iter([registration("node-a")]), timeout=10))
            holder = running.call(lambda: running.fleet.sessions["node-a"].replaced.is_set())
            duplicates = running.metrics.refused.labels("duplicate")._value.get()
        finally:
            real.close()

    assert real.first.WhichOneof("kind") == "registered"
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "live stream" in (refused.value.details() or "")
    assert holder is False
    assert duplicates == 1
