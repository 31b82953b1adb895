"""systemd notify protocol: the Notifier itself, and the agent's messages over a run."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.common.sdnotify import Notifier, watchdog_interval_s
from tests import ROOT
from tests.conftest import free_port


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's; a short path (sun_path is 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield path, sock


def receive(sock: socket.socket, timeout_s: float = 5.0) -> dict[str, str]:
    sock.settimeout(timeout_s)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def receive_until(sock: socket.socket, key: str) -> list[dict[str, str]]:
    """Messages up to and including the first that carries `key`."""
    messages = [receive(sock)]
    while key not in messages[-1]:
        messages.append(receive(sock))
    return messages


# --- Notifier ---


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})

    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    notifier.close()


def test_ready_with_status_to_a_path_socket(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})

    assert notifier.ready("sampling") is True

    assert receive(sock) == {"READY": "1", "STATUS": "sampling"}
    notifier.close()


def test_abstract_socket() -> None:
    name = f"fabric-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier(f"@{name}")

        notifier.stopping()

        assert receive(sock) == {"STOPPING": "1"}
        notifier.close()


def test_reloading_carries_monotonic_usec(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    notifier.reloading()

    message = receive(sock)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= before + 5_000_000
    notifier.close()


def test_send_error_is_logged_once_and_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))

    results = [notifier.watchdog(), notifier.watchdog()]

    assert results == [False, False]
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval_s(environ, pid=4242) == expected


# --- the agent under a notify socket ---


def test_agent_notifies_ready_watchdog_reload_and_stop(
    notify_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, sock = notify_socket
    port = free_port()
    (tmp_path / "policies").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
    env.update({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--collectors",
            "host",
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "state"),
            "--grpc-socket",
            str(tmp_path / "agent.sock"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--policy-dir",
            str(tmp_path / "policies"),
            "--interval",
            "200ms",
            "--reconcile-interval",
            "200ms",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Ready: the first message, and by then a snapshot is being served.
        ready = receive(sock, timeout_s=30)
        assert ready["READY"] == "1"
        assert "sampling 1 collector(s)" in ready["STATUS"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b'fabric_collector_success{collector="host"} 1.0' in response.read()

        # Watchdog: about every WATCHDOG_USEC / 2.
        pings = []
        for _ in range(4):
            assert receive(sock) == {"WATCHDOG": "1"}
            pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < gap < 0.8 for gap in gaps), gaps

        # Reload: RELOADING=1, then READY=1 after the next reconcile pass.
        process.send_signal(signal.SIGHUP)
        after_hup = receive_until(sock, "READY")
        kinds = [next(iter(m)) for m in after_hup if "WATCHDOG" not in m]
        assert kinds == ["RELOADING", "READY"], after_hup

        # Stop: STOPPING=1, then a clean exit.
        process.send_signal(signal.SIGTERM)
        messages = receive_until(sock, "STOPPING")
        assert [m for m in messages if "WATCHDOG" not in m] == [{"STOPPING": "1"}]
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
