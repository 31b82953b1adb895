"""The agent's gRPC listeners with real clients: the unix socket, plaintext TCP, TLS and
mTLS on TCP, health, reflection, certificate reload; and the agent process wiring them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.common.channel import CLIENT_KEEPALIVE_TIME_MS, SERVER_MIN_PING_INTERVAL_MS
from agent.common.listeners import TcpSettings
from agent.common.policy.documents import encode_document
from agent.common.policy.model import PolicyObject
from agent.common.security import AllowedClients, ReadOnly, TlsFiles, authorize_mutation
from agent.node.api.server import QOS_SERVICE, TELEMETRY_SERVICE, ApiServer
from agent.node.api.telemetry import SnapshotHub
from agent.node.qos.reconciler import ApiOutcome, PolicyView
from agent.proto.fabric.v1 import qos_service_pb2 as qos_pb
from agent.proto.fabric.v1 import qos_service_pb2_grpc as qos_grpc
from agent.proto.fabric.v1 import telemetry_service_pb2 as telemetry_pb
from agent.proto.fabric.v1 import telemetry_service_pb2_grpc as telemetry_grpc
from tests import ROOT
from tests.conftest import free_port
from tests.node.api import snapshot
from tests.node.qos import api_policy_document
from tests.pki import Issued, Pki

ALLOWED = "fabric-aggregator"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EVERY_SERVICE = {
    "fabric.v1.TelemetryService",
    "fabric.v1.QosService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}
# A valid policy, validated only: what gets through the authorizer reaches FakeReconciler.
APPLY = qos_pb.ApplyPolicyRequest(
    object=encode_document(api_policy_document("eth0")), validate_only=True
)
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
# Every test channel gets its own connections: gRPC otherwise shares subchannels between
# channels with equal arguments, and these tests are about new handshakes.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class FakeReconciler:
    """Stands in for the agent's Reconciler: the listener tests are about who gets
    through to QosService, not what it then does."""

    def __init__(self) -> None:
        self.first_pass = threading.Event()
        self.wake = threading.Event()
        self.applied: list[str] = []

    def apply_object(
        self, obj: PolicyObject, *, ttl_s: float | None = None, validate_only: bool = False
    ) -> ApiOutcome:
        self.applied.append(obj.metadata.name)
        return ApiOutcome(None, ())

    def policies(self) -> list[PolicyView]:
        return []


@pytest.fixture
def hub() -> SnapshotHub:
    return SnapshotHub(0.05)


@pytest.fixture
def start_api(hub: SnapshotHub) -> Iterator[Callable[..., ApiServer]]:
    """Starts ApiServers over `hub` with a FakeReconciler; stopped after the test."""
    started: list[ApiServer] = []
    # Short directories: unix socket paths are limited to 107 bytes.
    directories: list[tempfile.TemporaryDirectory[str]] = []

    def start(
        tcp: TcpSettings | None = None, readiness: Mapping[str, threading.Event] | None = None
    ) -> ApiServer:
        directory = tempfile.TemporaryDirectory(prefix="fabric-api-")
        directories.append(directory)
        api = ApiServer(
            Path(directory.name) / "agent.sock",
            hub,
            qos_backend=FakeReconciler(),  # type: ignore[arg-type]
            tcp=tcp,
            readiness=readiness,
        )
        api.start()
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop(grace_s=0)
    for directory in directories:
        directory.cleanup()


def loopback(tls: TlsFiles | None = None, allowed: frozenset[str] = frozenset()) -> TcpSettings:
    return TcpSettings(("127.0.0.1", 0), tls, allowed)


def mtls(pki: Pki, allowed: frozenset[str] = frozenset({ALLOWED})) -> TcpSettings:
    return loopback(TlsFiles(pki.server.cert, pki.server.key, pki.ca.cert), allowed)


def unix_channel(api: ApiServer) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{api.socket_path}", options=CHANNEL_OPTIONS)


def tcp_channel(port: int | None) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


def tls_channel(port: int | None, trusted: bytes, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)


def get_snapshot(channel: grpc.Channel) -> telemetry_pb.GetSnapshotResponse:
    stub = telemetry_grpc.TelemetryServiceStub(channel)
    return stub.GetSnapshot(telemetry_pb.GetSnapshotRequest(), timeout=10)


def apply_code(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    """ApplyPolicy's status: the authorizer's refusal, or whatever the servicer answers."""
    try:
        qos_grpc.QosServiceStub(channel).ApplyPolicy(APPLY, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def failure(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    return {service.name for service in response.list_services_response.service}


def health_status(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
    return status


def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# --- reflection and health ---


def test_reflection_lists_every_service_on_unix_and_tcp(
    start_api: Callable[..., ApiServer],
) -> None:
    api = start_api(tcp=loopback())

    with unix_channel(api) as unix, tcp_channel(api.tcp_port) as tcp:
        on_unix, on_tcp = list_services(unix), list_services(tcp)

    assert on_unix == on_tcp == EVERY_SERVICE


def test_health_follows_first_snapshot_and_first_reconcile(
    start_api: Callable[..., ApiServer], hub: SnapshotHub
) -> None:
    published, reconciled = threading.Event(), threading.Event()
    api = start_api(
        tcp=loopback(), readiness={TELEMETRY_SERVICE: published, QOS_SERVICE: reconciled}
    )

    with unix_channel(api) as unix, tcp_channel(api.tcp_port) as tcp:
        before = {
            (name, service): health_status(channel, service)
            for name, channel in (("unix", unix), ("tcp", tcp))
            for service in ("", TELEMETRY_SERVICE, QOS_SERVICE)
        }
        reconciled.set()
        qos_serving = eventually(lambda: health_status(tcp, QOS_SERVICE) == SERVING)
        telemetry_meanwhile = health_status(unix, TELEMETRY_SERVICE)
        hub.publish(snapshot(1))
        published.set()
        telemetry_serving = eventually(lambda: health_status(unix, TELEMETRY_SERVICE) == SERVING)

    for name in ("unix", "tcp"):
        assert before[(name, "")] == SERVING
        assert before[(name, TELEMETRY_SERVICE)] == NOT_SERVING
        assert before[(name, QOS_SERVICE)] == NOT_SERVING
    assert qos_serving
    assert telemetry_meanwhile == NOT_SERVING
    assert telemetry_serving


def test_health_watchers_see_not_serving_on_stop(start_api: Callable[..., ApiServer]) -> None:
    api = start_api(tcp=loopback())
    seen: list[int] = []

    with tcp_channel(api.tcp_port) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        seen.append(next(stream).status)
        api.stop(grace_s=1)
        # The stream ends with the server; what it said before is the point.
        with contextlib.suppress(grpc.RpcError):
            seen.extend(response.status for response in stream)

    assert seen[:2] == [SERVING, NOT_SERVING]


# --- plaintext TCP: read-only ---


def test_plaintext_tcp_reads_and_refuses_mutations(
    start_api: Callable[..., ApiServer], hub: SnapshotHub
) -> None:
    hub.publish(snapshot(7))
    api = start_api(tcp=loopback())

    with tcp_channel(api.tcp_port) as tcp, unix_channel(api) as unix:
        response = get_snapshot(tcp)
        over_tcp, details = apply_code(tcp)
        listed = qos_grpc.QosServiceStub(tcp).ListPolicies(qos_pb.ListPoliciesRequest(), timeout=10)
        over_unix, _ = apply_code(unix)

    assert response.snapshot.seq == 7
    assert over_tcp == grpc.StatusCode.PERMISSION_DENIED
    assert "mutations over TCP need mTLS with an allowed client identity" in details
    assert list(listed.policies) == []
    assert over_unix == grpc.StatusCode.OK


def test_tls_without_client_ca_is_read_only(
    start_api: Callable[..., ApiServer], hub: SnapshotHub, pki: Pki
) -> None:
    hub.publish(snapshot(3))
    api = start_api(tcp=loopback(TlsFiles(pki.server.cert, pki.server.key)))

    with tls_channel(api.tcp_port, pki.ca.cert_pem) as channel:
        response = get_snapshot(channel)
        code, _ = apply_code(channel)

    assert response.snapshot.seq == 3
    assert code == grpc.StatusCode.PERMISSION_DENIED


# --- mTLS ---


def test_mtls_allowed_client_reads_and_passes_the_authorizer(
    start_api: Callable[..., ApiServer], hub: SnapshotHub, pki: Pki
) -> None:
    hub.publish(snapshot(5))
    api = start_api(tcp=mtls(pki))

    with tls_channel(api.tcp_port, pki.ca.cert_pem, pki.allowed) as channel:
        response = get_snapshot(channel)
        code, details = apply_code(channel)
        services = list_services(channel)

    assert response.snapshot.seq == 5
    assert code == grpc.StatusCode.OK, details
    assert services == EVERY_SERVICE


def test_mtls_client_not_on_the_list_reads_but_may_not_change(
    start_api: Callable[..., ApiServer], hub: SnapshotHub, pki: Pki
) -> None:
    hub.publish(snapshot(5))
    api = start_api(tcp=mtls(pki))

    with tls_channel(api.tcp_port, pki.ca.cert_pem, pki.other) as channel:
        response = get_snapshot(channel)
        code, details = apply_code(channel)

    assert response.snapshot.seq == 5
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'intruder' is not in grpc_allowed_identities" in details


def test_mtls_identity_may_be_a_uri_or_dns_san(
    start_api: Callable[..., ApiServer], pki: Pki
) -> None:
    spiffe = "spiffe://cluster.local/ns/fabric/sa/scheduler"
    by_uri = pki.ca.issue("scheduler-pod-1", uris=[spiffe])
    by_dns = pki.ca.issue("aggregator-2", dns=["aggregator.fabric.svc"])
    by_ip = pki.ca.issue("ip-only", ips=["10.0.0.7"])
    api = start_api(tcp=mtls(pki, frozenset({spiffe, "aggregator.fabric.svc", "10.0.0.7"})))

    codes = {}
    for name, client in (("uri", by_uri), ("dns", by_dns), ("ip", by_ip)):
        with tls_channel(api.tcp_port, pki.ca.cert_pem, client) as channel:
            codes[name], _ = apply_code(channel)

    assert codes["uri"] == grpc.StatusCode.OK
    assert codes["dns"] == grpc.StatusCode.OK
    # An IP SAN names an address, not a client: it is no identity.
    assert codes["ip"] == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("client", ["stranger", "none", "plaintext"])
def test_mtls_refuses_the_handshake_without_a_certificate_of_the_client_ca(
    start_api: Callable[..., ApiServer], hub: SnapshotHub, pki: Pki, client: str
) -> None:
    hub.publish(snapshot(1))
    api = start_api(tcp=mtls(pki))
    if client == "plaintext":
        channel = tcp_channel(api.tcp_port)
    else:
        channel = tls_channel(
            api.tcp_port, pki.ca.cert_pem, pki.stranger if client == "stranger" else None
        )

    with channel:
        code = failure(lambda: get_snapshot(channel))

    assert code == grpc.StatusCode.UNAVAILABLE


class FakeContext:
    """A ServicerContext as far as authorizers look: auth_context and abort."""

    def __init__(self, auth: Mapping[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, list[bytes]]:
        return self._auth

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class Aborted(Exception):
    code: grpc.StatusCode
    details: str


def test_allowed_clients_without_a_certificate_identity_is_unauthenticated() -> None:
    authorizer = AllowedClients({ALLOWED})
    tls_without_cert = FakeContext({"transport_security_type": [b"ssl"]})
    plaintext = FakeContext({})

    for context in (tls_without_cert, plaintext):
        with pytest.raises(Aborted) as caught:
            authorize_mutation(authorizer, context)  # type: ignore[arg-type]
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_read_only_refuses_even_a_verified_identity() -> None:
    context = FakeContext(
        {"transport_security_type": [b"ssl"], "x509_common_name": [ALLOWED.encode()]}
    )

    with pytest.raises(Aborted) as caught:
        authorize_mutation(ReadOnly(), context)  # type: ignore[arg-type]

    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


# --- certificate reload ---


def test_reload_serves_new_certificates_and_keeps_old_ones_when_bad(
    start_api: Callable[..., ApiServer], hub: SnapshotHub, pki: Pki
) -> None:
    hub.publish(snapshot(1))
    api = start_api(tcp=mtls(pki))
    renewed = pki.other_ca.issue("agent-renewed", server=True, ips=["127.0.0.1"])
    old_ca, new_ca = pki.ca.cert_pem, pki.other_ca.cert_pem

    def trusted_by(ca: bytes) -> bool:
        with tls_channel(api.tcp_port, ca, pki.allowed) as channel:
            try:
                get_snapshot(channel)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                return False
            return True

    # Garbage, then a new certificate with the old key: both refused, old kept.
    pki.server.cert.write_bytes(b"not a certificate\n")
    garbage_reloaded = api.reload_tls()
    after_garbage = trusted_by(old_ca)
    pki.server.cert.write_bytes(renewed.cert_pem)
    mismatch_reloaded = api.reload_tls()
    after_mismatch = trusted_by(old_ca)
    # Then the matching key: new handshakes get the new certificate.
    pki.server.key.write_bytes(renewed.key_pem)
    reloaded = api.reload_tls()
    unchanged_reloaded = api.reload_tls()

    assert (garbage_reloaded, after_garbage) == (False, True)
    assert (mismatch_reloaded, after_mismatch) == (False, True)
    assert reloaded
    assert not unchanged_reloaded
    assert trusted_by(new_ca)
    assert not trusted_by(old_ca)


def test_keepalive_contract() -> None:
    assert SERVER_MIN_PING_INTERVAL_MS <= CLIENT_KEEPALIVE_TIME_MS


# --- the agent process ---


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    socket: Path
    port: int

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=30)
        return stderr


@pytest.fixture
def run_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(*flags: str, port: int | None = None) -> AgentProcess:
        port = port or free_port()
        directory = tempfile.mkdtemp(prefix="fabric-agent-", dir=tmp_path)
        sock = Path(directory) / "agent.sock"
        (tmp_path / "policies").mkdir(exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--collectors", "host",
             "--metrics-listen", f"127.0.0.1:{free_port()}", "--grpc-socket", str(sock),
             "--grpc-listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
             "--policy-dir", str(tmp_path / "policies"), "--interval", "200ms",
             "--reconcile-interval", "200ms", *flags],
            cwd=ROOT, env=dict(os.environ), stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        agent = AgentProcess(process, sock, port)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def test_agent_serves_health_and_read_only_tcp(run_agent: Callable[..., AgentProcess]) -> None:
    agent = run_agent()

    with tcp_channel(agent.port) as tcp:
        grpc.channel_ready_future(tcp).result(timeout=30)
        serving = eventually(
            lambda: all(
                health_status(tcp, service) == SERVING
                for service in ("", TELEMETRY_SERVICE, QOS_SERVICE)
            ),
            timeout_s=30,
        )
        response = get_snapshot(tcp)
        code, _ = apply_code(tcp)
    stderr = agent.stop()

    assert serving, stderr
    assert response.snapshot.node_name
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert agent.process.returncode == 0, stderr
    assert f"gRPC API on 127.0.0.1:{agent.port} (plaintext, read-only)" in stderr


def test_agent_exits_1_when_the_tcp_port_is_taken(
    run_agent: Callable[..., AgentProcess],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        agent = run_agent(port=port)
        agent.process.wait(timeout=60)
        stderr = agent.stop()

    assert agent.process.returncode == 1, stderr
    assert f"cannot listen on 127.0.0.1:{port} for the gRPC API" in stderr
    assert not agent.socket.exists()


def test_agent_mtls_and_certificate_reload_on_sighup(
    run_agent: Callable[..., AgentProcess], pki: Pki
) -> None:
    agent = run_agent(
        "--grpc-tls-cert", str(pki.server.cert), "--grpc-tls-key", str(pki.server.key),
        "--grpc-client-ca", str(pki.ca.cert), "--grpc-allowed-identities", f"{ALLOWED},other",
    )  # fmt: skip
    renewed = pki.other_ca.issue("agent-renewed", server=True, ips=["127.0.0.1"])

    def health_with(ca: bytes, client: Issued) -> int | None:
        with tls_channel(agent.port, ca, client) as channel:
            try:
                return health_status(channel)
            except grpc.RpcError:
                return None

    up = eventually(lambda: health_with(pki.ca.cert_pem, pki.allowed) == SERVING, timeout_s=30)
    with tls_channel(agent.port, pki.ca.cert_pem, pki.allowed) as allowed:
        allowed_code, details = apply_code(allowed)
    with tls_channel(agent.port, pki.ca.cert_pem, pki.other) as other:
        other_code, other_details = apply_code(other)
    pki.server.cert.write_bytes(renewed.cert_pem)
    pki.server.key.write_bytes(renewed.key_pem)
    agent.process.send_signal(signal.SIGHUP)
    reloaded = eventually(lambda: health_with(pki.other_ca.cert_pem, pki.allowed) == SERVING)
    stderr = agent.stop()

    assert up, stderr
    # Past the authorizer; the real agent then checks the policy against this host.
    assert allowed_code not in REFUSED, details
    assert other_code == grpc.StatusCode.PERMISSION_DENIED, other_details
    assert reloaded, stderr
    assert "TLS reload: new connections use the certificate" in stderr
    assert agent.process.returncode == 0, stderr
