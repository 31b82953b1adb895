from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from agent.node.collectors.base import CollectorContext, SharedResources
from agent.node.config import AgentConfig
from agent.node.nvml import NvmlOptions
from agent.node.qos.kernel import TcCapabilities
from agent.node.qos.tc import detect_capabilities
from agent.node.runtime import build_collectors
from agent.node.sampler import Sampler
from tests import fakenvml as fakenvml_driver
from tests.pki import Ca, Pki


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden/ from this run"
    )


def free_port() -> int:
    """A loopback TCP port nothing listens on now, for an agent under test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- netns ---
# Throwaway network namespaces for kernel tests. A veth pair joins two namespaces the test
# creates, so traffic between the two addresses crosses the veth (two addresses in one
# namespace would talk over loopback). Nothing here touches the host's own namespace.


@dataclass(frozen=True)
class VethPair:
    """`device` in namespace `netns`, wired to `peer_device` in `peer_netns`, one /30."""

    netns: str
    device: str
    address: str
    peer_netns: str
    peer_device: str
    peer_address: str
    prefixlen: int = 30


def iperf3_intervals(pair: VethPair, seconds: int, interval_s: float = 1.0) -> list[float]:
    """Mbit/s per `interval_s` of a TCP flow from `pair.netns` to port 5201 of the peer,
    as the receiver counted it."""
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{pair.peer_netns}", "iperf3", "-s", "-1", "-B",
         pair.peer_address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # the server's listen: iperf3 has no readiness signal
        client = subprocess.run(
            ["nsenter", f"--net=/run/netns/{pair.netns}", "iperf3", "-c", pair.peer_address,
             "-t", str(seconds), "-i", str(interval_s), "-J"],
            capture_output=True, text=True, timeout=seconds + 30, check=True,
        )  # fmt: skip
        report: dict[str, Any] = json.loads(client.stdout)
        return [i["sum"]["bits_per_second"] / 1e6 for i in report["intervals"]]
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in ("ip", "nsenter", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NamespaceError(RuntimeError):
    """A network namespace could not be made here."""


@contextmanager
def veth_namespaces() -> Iterator[VethPair]:
    """Two fresh namespaces joined by a veth pair, both ends and loopback up; deleted
    after. Raises NamespaceError when a namespace cannot be made.

    Names start with `fab` (never `veth*`, which the default interface patterns exclude).
    """
    token = secrets.token_hex(3)
    # A random /30 in 10.250/16: only ever inside the namespaces made here.
    network = f"10.250.{secrets.randbelow(256)}.{secrets.randbelow(64) * 4}"
    base = network.rsplit(".", 1)[0] + "."
    host = int(network.rsplit(".", 1)[1])
    pair = VethPair(
        netns=f"fab{token}-a",
        device=f"fab{token}a",
        address=f"{base}{host + 1}",
        peer_netns=f"fab{token}-b",
        peer_device=f"fab{token}b",
        peer_address=f"{base}{host + 2}",
    )
    created: list[str] = []
    try:
        for netns in (pair.netns, pair.peer_netns):
            try:
                _ip("netns", "add", netns)
            except subprocess.CalledProcessError as exc:
                raise NamespaceError(
                    f"cannot create a network namespace: {exc.stderr.strip()}"
                ) from None
            created.append(netns)
        _ip("-n", pair.netns, "link", "add", pair.device, "type", "veth", "peer", "name",
            pair.peer_device, "netns", pair.peer_netns)  # fmt: skip
        for netns, device, address in (
            (pair.netns, pair.device, pair.address),
            (pair.peer_netns, pair.peer_device, pair.peer_address),
        ):
            _ip("-n", netns, "addr", "add", f"{address}/{pair.prefixlen}", "dev", device)
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", device, "up")
        yield pair
    finally:
        # Deleting a namespace deletes the veth pair with it.
        for netns in reversed(created):
            subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)


@pytest.fixture
def veth_pair() -> Iterator[VethPair]:
    """`veth_namespaces` for one test; skipped where namespaces cannot be made."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    try:
        with veth_namespaces() as pair:
            yield pair
    except NamespaceError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def netns_sysfs(veth_pair: VethPair, tmp_path: Path) -> Iterator[Path]:
    """A sysfs mounted from inside `veth_pair.netns`: its class/net lists that namespace's
    interfaces (the host's /sys shows the host's). Use it as `sysfs_root`."""
    root = tmp_path / "netns-sysfs"
    root.mkdir()
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{veth_pair.netns}", "mount", "-t", "sysfs", "sysfs",
         str(root)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)


class VethTraffic:
    """UDP datagrams both ways across a veth pair, from sockets opened inside its
    namespaces (through pyroute2, which enters the namespace in a child process)."""

    port = 47_809

    def __init__(self, pair: VethPair) -> None:
        self._pair = pair
        self._sockets: list[socket.socket] = []
        for namespace, address in (
            (pair.netns, pair.address),
            (pair.peer_netns, pair.peer_address),
        ):
            sock = pyroute2_netns.create_socket(
                namespace, socket.AF_INET, socket.SOCK_DGRAM, flags=0
            )
            self._sockets.append(sock)
            sock.bind((address, self.port))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, count: int, payload_bytes: int = 1000) -> None:
        """`count` datagrams each way, synchronously."""
        near, far = self._sockets
        payload = b"\xab" * payload_bytes
        for _ in range(count):
            near.sendto(payload, (self._pair.peer_address, self.port))
            far.sendto(payload, (self._pair.address, self.port))

    def start(self) -> None:
        """Keep a trickle flowing (about 1000 datagrams a second each way) until `stop`."""

        def run() -> None:
            while not self._stop.wait(0.001):
                self.send(1)

        self._thread = threading.Thread(target=run, name="veth-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        # Open sockets would keep a deleted namespace, and its veth, alive.
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


@pytest.fixture
def veth_traffic(veth_pair: VethPair) -> Iterator[VethTraffic]:
    """Senders at both ends of `veth_pair`; stopped and closed before the pair goes."""
    traffic = VethTraffic(veth_pair)
    try:
        yield traffic
    finally:
        traffic.close()


# --- shaping ---
# A veth pair whose near end the QoS tests shape, where this kernel has HTB and u32.


@pytest.fixture(scope="session")
def tc_capabilities() -> TcCapabilities:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return detect_capabilities()


@pytest.fixture
def shaped_pair(veth_pair: VethPair, tc_capabilities: TcCapabilities) -> VethPair:
    """`veth_pair`, when this kernel can shape with HTB and classify with u32."""
    if not tc_capabilities.htb:
        pytest.skip("kernel has no htb qdisc")
    if not tc_capabilities.u32:
        pytest.skip("kernel has no u32 classifier")
    return veth_pair


# --- fakenvml ---
# The simulated NVML driver (tests/fakenvml). One library serves the whole test process;
# each test selects a scenario and must close its NVML sessions, so the next test's init
# reads its own scenario.


@pytest.fixture(scope="session")
def fakenvml_library() -> Path:
    """tests/fakenvml/libnvidia-ml.so.1, built with make if missing or stale."""
    return fakenvml_driver.build()


@pytest.fixture
def fakenvml(
    fakenvml_library: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[fakenvml_driver.FakeNvml]:
    """The fake driver with FAKE_NVML_SCENARIO set (hgx-h200-8gpu.json unless the test calls
    `use`), scenario time frozen (moved by `advance` or `tick`) and call counts zeroed."""
    monkeypatch.setenv(
        "FAKE_NVML_SCENARIO", str(fakenvml_driver.SCENARIOS / fakenvml_driver.DEFAULT_SCENARIO)
    )
    fake = fakenvml_driver.FakeNvml(fakenvml_library)
    fake.freeze()
    fake.reset_counts()
    yield fake
    fake.freeze(False)
    assert fake.refcount() == 0, "NVML left initialised: close every NvmlSession the test opened"


@pytest.fixture
def nvml_context(
    fakenvml: fakenvml_driver.FakeNvml,
) -> Iterator[CollectorContext]:
    """A collector context whose config points at the fake driver; its shared resources
    (the NVML session) are closed after the test."""
    shared = SharedResources()
    yield CollectorContext(NvmlOptions(fakenvml.library), shared)
    shared.close()


SYSFS_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sysfs"


@contextmanager
def simulated_sampler(
    fakenvml: fakenvml_driver.FakeNvml, state_dir: Path, node: str, job_dir: Path | None = None
) -> Iterator[Sampler]:
    """A sampler over every default collector on the simulated node: the fake driver's
    GPUs, the fixture sysfs's loopback and the jobs in `job_dir` (none: an empty one under
    `state_dir`, never the host's); closed, with its NVML session, on exit."""
    config = AgentConfig(
        node_name=node,
        state_dir=state_dir,
        job_dir=job_dir if job_dir is not None else state_dir / "jobs",
        nvml_library=fakenvml.library,
        sysfs_root=SYSFS_FIXTURE,
        interfaces=("lo",),
    )
    shared = SharedResources()
    sampler = Sampler(
        build_collectors(config, shared), node_name=node, interval_s=1.0, timeout_s=5.0
    )
    try:
        yield sampler
    finally:
        sampler.close()
        shared.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "tls"
    directory.mkdir()
    ca = Ca(directory, "fabric-ca")
    other_ca = Ca(directory, "other-ca")
    return Pki(
        ca=ca,
        other_ca=other_ca,
        server=ca.issue("agent", server=True, dns=["localhost"], ips=["127.0.0.1"]),
        allowed=ca.issue("fabric-aggregator"),
        other=ca.issue("intruder"),
        stranger=other_ca.issue("fabric-aggregator-elsewhere"),
    )
