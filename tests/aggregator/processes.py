"""Real processes for the fleet end-to-end tests: aggregators, agents on the simulated
GPU node, and the network namespaces the QoS-enforcing agents run in.

A `Lab` starts them and takes everything down when it closes, whatever the test did:
every process by its PID (SIGTERM, then SIGKILL after a grace period), every namespace
deleted. Agents in a namespace reach the aggregator on the host's loopback through a
`LoopbackForward`, so the tests never touch the host's own interfaces.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import netns as pyroute2_netns

from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2_grpc import AggregatorServiceStub
from agent.proto.fabric.v1 import qos_service_pb2
from agent.proto.fabric.v1.qos_service_pb2_grpc import QosServiceStub
from tests import ROOT
from tests.conftest import free_port
from tests.exposition import series

T = TypeVar("T")


SCENARIO = ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json"
SYSFS = ROOT / "tests/fixtures/sysfs"
# Liveness short enough for a test: a summary every 200 ms, stale after 3 missed (0.6 s),
# gone after 3 s of silence.
LIVENESS_FLAGS = ("--summary-interval", "200ms", "--stale-after-missed", "3", "--gone-after", "3s")
AGENT_INTERVAL = "200ms"
# How long a process has between SIGTERM and SIGKILL.
STOP_GRACE_S = 10.0


# --- processes ---


@dataclass
class Process:
    """One started process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_GRACE_S)

    def wait(self, timeout_s: float = STOP_GRACE_S) -> int:
        """The exit code; SIGKILL when the process is still running after `timeout_s`."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            return self.popen.wait(timeout=STOP_GRACE_S)

    def stop(self) -> int:
        self.terminate()
        return self.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def scrape(url: str) -> dict[str, float]:
    """Every series of a /metrics page: 'name{label="value",...}' -> value."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- network namespaces ---


@dataclass(frozen=True)
class Netns:
    """A namespace with loopback and a veth pair `interface` <-> `interface`p, all up."""

    name: str
    interface: str

    def qdiscs(self, device: str | None = None) -> str:
        """`tc qdisc show` of `device` (the namespace's `interface` by default)."""
        result = subprocess.run(
            ["tc", "-n", self.name, "qdisc", "show", "dev", device or self.interface],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout

    def has_htb(self) -> bool:
        return " htb " in self.qdiscs()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class LoopbackForward:
    """127.0.0.1:`port` inside namespace `netns`, relayed to 127.0.0.1:`port` of the
    test's own namespace. A connection is relayed while both ends are open; one that
    cannot reach the far side is closed at once, as a refused connection would be."""

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        self._listener = pyroute2_netns.create_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"forward-{netns}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._relay(sock)

    def _accept(self) -> None:
        try:
            inside, _ = self._listener.accept()
        except BlockingIOError:
            return
        inside.setblocking(True)
        try:
            outside = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            inside.close()
            return
        outside.settimeout(None)
        self._peers[inside], self._peers[outside] = outside, inside
        for sock in (inside, outside):
            self._selector.register(sock, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock)
        self._peers.pop(peer, None)
        for end in (sock, peer):
            self._selector.unregister(end)
            end.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in list(self._peers):
            if sock in self._peers:
                self._drop(sock)
        self._selector.close()
        self._listener.close()


# --- the processes under test ---


@dataclass(frozen=True)
class ServerTls:
    """The aggregator's mTLS: its certificate and key, the CA of client certificates,
    and the identities that may mutate over TCP."""

    cert: Path
    key: Path
    client_ca: Path
    allowed_identities: Sequence[str]


@dataclass(frozen=True)
class ClientTls:
    """An agent's mTLS to the aggregator: the aggregator's CA, its own certificate."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class Aggregator:
    """A running `fabric-aggregator` and a client on its unix socket (everything allowed)."""

    process: Process
    socket: Path
    port: int
    metrics_port: int
    stub: AggregatorServiceStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            return self.metrics().get(series(name, **labels))
        except OSError:
            return None

    def nodes(self, **selector: str) -> dict[str, pb.Node]:
        """Every node matching `selector` (one page: fewer than 100 here), by name."""
        return {
            n.name: n for n in self.stub.ListNodes(pb.ListNodesRequest(selector=selector)).nodes
        }

    @contextlib.contextmanager
    def events(self, *kinds: pb.EventKind.ValueType) -> Iterator[EventStream]:
        """A WatchEvents stream of `kinds`, subscribed by the time this yields."""
        before = self.metric("fabric_aggregator_event_watchers") or 0.0
        stream = EventStream(self.stub, kinds)
        try:
            wait_for(
                lambda: (self.metric("fabric_aggregator_event_watchers") or 0.0) > before,
                "the event stream subscribed",
            )
            yield stream
        finally:
            stream.close()


class EventStream:
    """A WatchEvents call, read on its own thread into a queue."""

    def __init__(self, stub: AggregatorServiceStub, kinds: Sequence[pb.EventKind.ValueType]):
        self._call = stub.WatchEvents(pb.WatchEventsRequest(kinds=kinds))
        self._queue: queue.Queue[pb.Event] = queue.Queue()
        self.seen: list[pb.Event] = []
        self._thread = threading.Thread(target=self._read, name="watch-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for response in self._call:
                self._queue.put(response.event)

    def wait(
        self, check: Callable[[list[pb.Event]], bool], what: str, timeout_s: float = 10
    ) -> None:
        """Read events into `seen` until `check(seen)`."""
        deadline = time.monotonic() + timeout_s
        while not check(self.seen):
            left = deadline - time.monotonic()
            try:
                self.seen.append(self._queue.get(timeout=max(left, 0.0)))
            except queue.Empty:
                seen = [(pb.EventKind.Name(e.kind), e.node, e.message) for e in self.seen]
                raise AssertionError(f"no {what} within {timeout_s:g}s; seen: {seen}") from None

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


@dataclass
class Agent:
    """A running `fabric-agent` with the aggregator uplink, and a client on its own
    unix socket."""

    name: str
    process: Process
    netns: Netns | None
    qos: QosServiceStub

    def fleet_policies(self) -> list[str]:
        """Names of the policies the agent holds from the fleet."""
        listed = self.qos.ListPolicies(qos_service_pb2.ListPoliciesRequest(), timeout=5)
        return [p.name for p in listed.policies if p.source == qos_service_pb2.POLICY_SOURCE_FLEET]


def init_store(store: str) -> str:
    """`fabric-aggregator init`: a missing store made, an existing one left alone."""
    result = subprocess.run(
        [sys.executable, "-m", "agent.aggregator.main", "init", "--store", store],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"init {store}: {result.stderr}"
    return result.stdout


def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout_s: float = 10.0,
    *,
    processes: Sequence[Process] = (),
) -> T:
    """Poll `check` until it returns something true; AssertionError naming `what` (and
    the log of any of `processes` that died) when it has not within `timeout_s`. Calls
    that fail with a gRPC or OS error count as not yet."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except (grpc.RpcError, OSError) as exc:
            last = exc
        dead = [p for p in processes if not p.alive()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {p.name} exited {p.popen.returncode}:\n{p.log_tail()}" for p in dead
            )
            raise AssertionError(f"not {what} within {timeout_s:g}s (last: {last!r})\n{logs}")
        time.sleep(0.1)


class Lab:
    """Everything one test (or module) starts; all of it taken down on `close`."""

    def __init__(self, directory: Path, nvml_library: Path) -> None:
        self.directory = directory
        self._nvml_library = nvml_library
        # Unix socket paths must stay short (108 bytes); pytest's tmp paths are long.
        self._sockets = Path(tempfile.mkdtemp(prefix="fabric-fleet-"))
        self.processes: list[Process] = []
        self._channels: list[grpc.Channel] = []
        self._namespaces: list[str] = []
        self._forwards: dict[tuple[str, int], LoopbackForward] = {}

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        # SIGTERM to all first, so they shut down side by side.
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                process.wait()
        for forward in self._forwards.values():
            forward.close()
        # Deleting a namespace deletes its veth pair with it.
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        shutil.rmtree(self._sockets, ignore_errors=True)

    def _start(self, name: str, argv: Sequence[str], netns: Netns | None = None) -> Process:
        log = self.directory / f"{name}.log"
        env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
        if netns is not None:
            # nsenter, not `ip netns exec`: that remounts /sys, and the agent's sysfs
            # root is the fixture tree anyway; only its sockets and tc use the namespace.
            argv = ["nsenter", f"--net=/run/netns/{netns.name}", *argv]
        with log.open("ab") as output:
            popen = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def _channel(self, target: str) -> grpc.Channel:
        channel = grpc.insecure_channel(target)
        self._channels.append(channel)
        return channel

    def netns(self, interface: str) -> Netns:
        """A fresh namespace with `interface` (a veth pair inside it), deleted on close."""
        name = f"fab{secrets.token_hex(4)}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", interface, "type", "veth", "peer", "name", f"{interface}p")
        for device in (interface, f"{interface}p"):
            _ip("-n", name, "link", "set", device, "up")
        return Netns(name, interface)

    def aggregator(
        self, name: str, store: str, *, port: int | None = None, tls: ServerTls | None = None
    ) -> Aggregator:
        """A started aggregator, serving on its unix socket, TCP `port` (a free one by
        default) and a free metrics port."""
        port = port or free_port()
        metrics_port = free_port()
        socket_path = self._sockets / f"{name}.sock"
        argv = [
            sys.executable, "-m", "agent.aggregator.main", "run", "--replica-name", name,
            "--store", store, "--grpc-socket", str(socket_path),
            "--grpc-listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
            *LIVENESS_FLAGS,
        ]  # fmt: skip
        if tls is not None:
            argv += [
                "--grpc-tls-cert", str(tls.cert), "--grpc-tls-key", str(tls.key),
                "--grpc-client-ca", str(tls.client_ca),
                "--grpc-allowed-identities", ",".join(tls.allowed_identities),
            ]  # fmt: skip
        else:
            argv.append("--insecure-plaintext-agents")
        init_store(store)
        process = self._start(name, argv)
        stub = AggregatorServiceStub(self._channel(f"unix:{socket_path}"))
        aggregator = Aggregator(process, socket_path, port, metrics_port, stub)

        def serving() -> bool:
            aggregator.metrics()
            stub.ListNodes(pb.ListNodesRequest(), timeout=1)
            return True

        wait_for(serving, f"aggregator {name} serving", 20, processes=[process])
        return aggregator

    def agent(
        self,
        name: str,
        labels: Mapping[str, str],
        aggregator: Aggregator,
        *,
        netns: Netns | None = None,
        tls: ClientTls | None = None,
        process_name: str | None = None,
    ) -> Agent:
        """An agent on the simulated 8-GPU node registering as `name` with the aggregator
        (started, not waited for: the tests wait for what they expect of it)."""
        process_name = process_name or name
        state = self.directory / process_name
        (state / "policies").mkdir(parents=True, exist_ok=True)
        socket_path = self._sockets / f"{process_name}.sock"
        port = aggregator.port
        if netns is not None and (netns.name, port) not in self._forwards:
            self._forwards[netns.name, port] = LoopbackForward(netns.name, port)
        argv = [
            sys.executable, "-m", "agent", "run", "--node-name", name,
            "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
            "--aggregator", f"127.0.0.1:{port}", "--interval", AGENT_INTERVAL,
            "--nvml-library", str(self._nvml_library), "--sysfs-root", str(SYSFS),
            "--interfaces", "lo", "--grpc-socket", str(socket_path), "--grpc-listen", "none",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(state / "state"),
            "--policy-dir", str(state / "policies"),
        ]  # fmt: skip
        if tls is not None:
            argv += [
                "--aggregator-tls-ca", str(tls.ca), "--aggregator-tls-cert", str(tls.cert),
                "--aggregator-tls-key", str(tls.key),
            ]  # fmt: skip
        process = self._start(process_name, argv, netns)
        qos = QosServiceStub(self._channel(f"unix:{socket_path}"))
        return Agent(name, process, netns, qos)

    def wait_for(self, check: Callable[[], T | None], what: str, timeout_s: float = 10.0) -> T:
        """`wait_for`, failing early (with its log) when a process of this lab died."""
        running = [p for p in self.processes if p.alive()]
        return wait_for(check, what, timeout_s, processes=running)
