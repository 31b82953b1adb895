"""The listener set-up the agent and the aggregator share: options, authorizers, binding
order and errors, the socket's mode, TLS loading. Real servers, no services."""

from __future__ import annotations

import socket
import stat
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent.common.channel import SERVER_KEEPALIVE_OPTIONS
from agent.common.errors import ConfigError, ListenError
from agent.common.listeners import SOCKET_MODE, Listeners, TcpSettings, server_options
from agent.common.security import AllowAll, AllowedClients, Authorizer, ReadOnly, TlsFiles
from tests.pki import Pki


@dataclass
class Built:
    """What `Listeners` asked the daemon's build function for, per server."""

    calls: list[tuple[dict[str, int], Authorizer, bool]] = field(default_factory=list)
    servers: list[grpc.Server] = field(default_factory=list)

    def __call__(
        self, options: Sequence[tuple[str, int]], authorizer: Authorizer, mtls: bool
    ) -> grpc.Server:
        self.calls.append((dict(options), authorizer, mtls))
        server = grpc.server(ThreadPoolExecutor(max_workers=2), options=list(options))
        self.servers.append(server)
        return server


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fabric-l-") as directory:
        yield Path(directory) / "api.sock"


def listeners(socket_path: Path, tcp: TcpSettings | None, built: Built) -> Listeners[grpc.Server]:
    return Listeners(
        socket_path,
        tcp,
        built,
        name="the test API",
        socket_name="the test socket",
        max_send_bytes=8_000_000,
        max_receive_bytes=4_000_000,
    )


def test_server_options_carry_limits_and_keepalive() -> None:
    options = dict(server_options(max_send_bytes=2, max_receive_bytes=1))
    assert options["grpc.max_send_message_length"] == 2
    assert options["grpc.max_receive_message_length"] == 1
    assert dict(SERVER_KEEPALIVE_OPTIONS).items() <= options.items()


def test_unix_gets_allow_all_and_tcp_binds_exclusively(socket_path: Path) -> None:
    built = Built()

    listeners(socket_path, TcpSettings(("127.0.0.1", 0)), built)

    (unix_options, unix_auth, unix_mtls), (tcp_options, tcp_auth, tcp_mtls) = built.calls
    assert isinstance(unix_auth, AllowAll) and not unix_mtls
    assert "grpc.so_reuseport" not in unix_options
    assert isinstance(tcp_auth, ReadOnly) and not tcp_mtls
    assert tcp_auth.alternative == "the test socket"
    assert tcp_options["grpc.so_reuseport"] == 0
    assert tcp_options["grpc.max_send_message_length"] == 8_000_000


def test_bind_and_restrict(socket_path: Path) -> None:
    built = Built()
    pair = listeners(socket_path, TcpSettings(("127.0.0.1", 0)), built)
    try:
        pair.bind()
        for server in pair.servers:
            server.start()
        pair.restrict_socket()

        assert pair.tcp_port is not None and pair.tcp_port > 0
        assert pair.bound_tcp() == f"127.0.0.1:{pair.tcp_port}"
        assert stat.S_IMODE(socket_path.stat().st_mode) == SOCKET_MODE
        assert len(pair.servers) == 2
    finally:
        for server in built.servers:
            server.stop(0).wait()
        pair.remove_socket()
    assert not socket_path.exists()


def test_a_taken_port_fails_before_the_socket_is_made(socket_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        pair = listeners(socket_path, TcpSettings(("127.0.0.1", port)), Built())

        with pytest.raises(ListenError) as failed:
            pair.bind()

    assert f"cannot listen on 127.0.0.1:{port} for the test API" in str(failed.value)
    assert "set grpc_listen to another port, or none" in str(failed.value)
    assert not socket_path.exists()


def test_a_path_that_is_not_a_socket_is_kept(socket_path: Path) -> None:
    socket_path.write_text("precious")
    pair = listeners(socket_path, None, Built())

    with pytest.raises(ListenError, match="exists and is not a socket"):
        pair.bind()

    assert socket_path.read_text() == "precious"
    assert pair.servers == [pair.unix] and pair.tcp_port is None and pair.bound_tcp() is None


def test_tcp_settings_describe_their_security() -> None:
    tls = TlsFiles(Path("cert.pem"), Path("key.pem"))
    mtls = TlsFiles(Path("cert.pem"), Path("key.pem"), Path("ca.pem"))

    assert TcpSettings(("::1", 9479)).target == "[::1]:9479"
    assert TcpSettings(("127.0.0.1", 0)).describe() == "plaintext, read-only"
    assert TcpSettings(("127.0.0.1", 0), tls).describe(reads="reads") == "TLS, reads"
    both = TcpSettings(("127.0.0.1", 0), mtls, frozenset({"b", "a"}))
    assert both.describe(changes="changes") == "mTLS, changes for a, b"
    assert TcpSettings(("127.0.0.1", 0), mtls).describe() == "mTLS, QoS changes for nobody"
    assert isinstance(both.authorizer(), AllowedClients)
    assert both.mtls and not TcpSettings(("127.0.0.1", 0), tls).mtls


def test_tcp_settings_refuse_identities_without_mtls() -> None:
    with pytest.raises(ValueError, match="mTLS"):
        TcpSettings(("127.0.0.1", 0), TlsFiles(Path("c"), Path("k")), frozenset({"x"}))


def test_certificates_loaded_once_and_reloaded(socket_path: Path, pki: Pki) -> None:
    files = TlsFiles(pki.server.cert, pki.server.key, pki.ca.cert)
    built = Built()
    pair = listeners(socket_path, TcpSettings(("127.0.0.1", 0), files), built)

    assert pair.certificates is not None
    assert built.calls[1][2] is True  # the TCP server is told its clients carry certificates
    assert pair.reload_tls() is False  # unchanged files
    assert listeners(socket_path, None, Built()).reload_tls() is False


def test_a_certificate_gone_since_the_config_check_is_a_config_error(
    socket_path: Path, tmp_path: Path
) -> None:
    missing = TlsFiles(tmp_path / "gone.pem", tmp_path / "gone.key")
    with pytest.raises(ConfigError, match="grpc_tls_cert"):
        listeners(socket_path, TcpSettings(("127.0.0.1", 0), missing), Built())
