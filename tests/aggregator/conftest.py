from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import free_port

T = TypeVar("T")

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Short raft ticks make etcd's minimum lease TTL 1 s: it is ceil(1.5 * election timeout),
# 2 s with the default 1 s election timeout, which would round a 1 s test ttl up.
ETCD_HEARTBEAT_MS = 10
ETCD_ELECTION_MS = 100


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive one test's coroutine; pytest-asyncio is not a dependency."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


@dataclass(frozen=True)
class EtcdServer:
    client_url: str
    port: int


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real single-member etcd on loopback, for the whole session."""
    if not os.path.exists(ETCD):
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    data_dir: Path = tmp_path_factory.mktemp("etcd")
    client_port, peer_port = free_port(), free_port()
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    log = (data_dir / "etcd.log").open("wb")
    process = subprocess.Popen(
        [
            ETCD,
            "--name=default",
            f"--data-dir={data_dir / 'data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            f"--heartbeat-interval={ETCD_HEARTBEAT_MS}",
            f"--election-timeout={ETCD_ELECTION_MS}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                log.flush()
                pytest.fail(
                    f"etcd exited {process.returncode}: {(data_dir / 'etcd.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=1) as response:
                    if b'"health":"true"' in response.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"etcd not healthy in 20 s: {(data_dir / 'etcd.log').read_text()}")
            time.sleep(0.1)
        yield EtcdServer(client_url, client_port)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind: a new SQLite file, or a new key prefix on the
    session's etcd."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'state.db'}"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return f"etcd://127.0.0.1:{server.port}?prefix=/fabric-test-{secrets.token_hex(4)}/"


@pytest.fixture(params=["sqlite", "etcd"])
def unreachable_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL whose backend cannot be reached."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'no-such-directory' / 'state.db'}"
    return f"etcd://127.0.0.1:{free_port()}?timeout_s=1"
