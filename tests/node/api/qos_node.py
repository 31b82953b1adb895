"""The QoS side of an agent in this process, over the fake kernel, serving QosService on
a unix socket: what the API tests talk to (the `node` fixture)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from agent.node.api.server import QOS_SERVICE, ApiServer
from agent.node.api.telemetry import SnapshotHub
from agent.node.collectors.base import SharedResources
from agent.node.collectors.qos import RECONCILER_KEY
from agent.node.config import AgentConfig
from agent.node.qos.api_objects import API_FILE
from agent.node.qos.reconciler import Reconciler
from agent.node.runtime import build_collectors
from agent.node.sampler import Sampler
from agent.proto.fabric.v1.qos_service_pb2_grpc import QosServiceStub
from tests.node.qos import DEVICE, SPARE, fake_settings
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write

INTERVAL_S = 0.2


@dataclasses.dataclass
class Node:
    """An agent's QoS side in this process (reconcile loop, qos collector, API server on
    a unix socket) over the fake kernel, and a client on the socket."""

    stub: QosServiceStub
    fake: FakeKernel
    spare: str
    state_dir: Path
    loops: list[threading.Thread]
    # The unix socket, as fabricctl's --agent takes it.
    target: str

    def kernel(self) -> str:
        """Everything the agent could have changed."""
        return self.fake.dump()

    def alive(self) -> bool:
        return all(loop.is_alive() for loop in self.loops)

    def api_objects(self) -> list[str]:
        """Names in the agent's persisted API policies."""
        path = self.state_dir / API_FILE
        if not path.exists():
            return []
        return [o["name"] for o in json.loads(path.read_text())["objects"]]


@contextmanager
def qos_node(tmp_path: Path) -> Iterator[Node]:
    """The file policy `node` on DEVICE, the spare interface for API policies, and the
    QoS side of an agent serving QosService on its unix socket."""
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    cgroups = tmp_path / "cgroup"
    cgroups.mkdir()
    write(dirs[0], DEVICE)
    fake = FakeKernel([DEVICE, SPARE])
    reconciler = Reconciler(fake_settings(dirs, cgroups), fake)
    shared = SharedResources()
    shared.get(RECONCILER_KEY, lambda: reconciler, Reconciler.close)
    config = AgentConfig(collectors=("qos",), state_dir=dirs[1], policy_dir=dirs[0])
    sampler = Sampler(
        build_collectors(config, shared),
        node_name="test",
        interval_s=INTERVAL_S,
        timeout_s=INTERVAL_S * 0.8,
    )
    hub = SnapshotHub(INTERVAL_S)
    directory = tempfile.mkdtemp(prefix="fabric-qos-")
    server = ApiServer(
        Path(directory) / "agent.sock",
        hub,
        qos_backend=reconciler,
        readiness={QOS_SERVICE: reconciler.first_pass},
    )
    stop = threading.Event()
    loops = [
        threading.Thread(target=reconciler.run, args=(stop, 5.0), daemon=True),
        threading.Thread(target=sampler.run, args=(stop, hub.publish), daemon=True),
    ]
    server.start()
    for loop in loops:
        loop.start()
    channel = grpc.insecure_channel(f"unix:{directory}/agent.sock")
    target = f"unix:{directory}/agent.sock"
    try:
        assert reconciler.first_pass.wait(10), "no reconcile pass within 10 s"
        yield Node(QosServiceStub(channel), fake, SPARE, dirs[1], loops, target)
        assert all(loop.is_alive() for loop in loops), "a loop died"
    finally:
        channel.close()
        stop.set()
        reconciler.wake.set()
        for loop in loops:
            loop.join(10)
        server.stop()
        sampler.close()
        shared.close()
        shutil.rmtree(directory, ignore_errors=True)
