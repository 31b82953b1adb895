"""A lost store never strips nodes. The aggregator runs only on a store that
`fabric-aggregator init` made: a SQLite file emptied to 0 bytes, a missing file or a
wiped etcd prefix stop it with a message naming the store. And a store made anew (a new
store id) does not make agents remove the fleet policies it does not know: they keep
them, report them KEPT, until an operator releases them."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.aggregator.store import StoreNotInitialised, open_store
from agent.common.exits import ExitCode
from agent.common.policy.documents import encode_document
from agent.ctl import main as ctl
from agent.node.api.telemetry import SnapshotHub
from agent.node.uplink.stream import Uplink, UplinkSettings
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests import ROOT
from tests.aggregator.conftest import EtcdServer, etcd_server, run
from tests.aggregator.inprocess import InProcessAggregator, aggregator
from tests.conftest import free_port
from tests.node.qos import api_policy_document
from tests.node.uplink.test_uplink import FakePolicies

__all__ = ["etcd_server"]  # the session's etcd, used here


def fabric_aggregator(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.aggregator.main", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def run_on(tmp_path: Path, store: str) -> subprocess.CompletedProcess[str]:
    """`fabric-aggregator run` on `store`; it must exit by itself (a refusal)."""
    return fabric_aggregator(
        "run", "--store", store, "--grpc-socket", str(tmp_path / "a.sock"),
        "--grpc-listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{free_port()}",
    )  # fmt: skip


def test_an_emptied_store_file_stops_the_aggregator_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = f"sqlite://{path}"
    assert fabric_aggregator("init", "--store", store).returncode == 0
    path.write_bytes(b"")  # the file survives, its contents do not

    result = run_on(tmp_path, store)

    assert result.returncode == ExitCode.FAILURE
    assert str(path) in result.stderr
    assert "no aggregator schema" in result.stderr
    assert path.read_bytes() == b"", "the emptied file must be left for the operator"
    assert not (tmp_path / "a.sock").exists()


def test_init_never_makes_a_new_store_over_an_emptied_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"")

    result = fabric_aggregator("init", "--store", f"sqlite://{path}")

    assert result.returncode == ExitCode.FAILURE
    assert "move it aside" in result.stderr
    assert path.read_bytes() == b""


def test_a_missing_store_file_needs_init_which_makes_it_once(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'state.db'}"

    refused = run_on(tmp_path, store)
    made = fabric_aggregator("init", "--store", store)
    again = fabric_aggregator("init", "--store", store)

    assert refused.returncode == ExitCode.FAILURE
    assert "fabric-aggregator init" in refused.stderr
    assert made.returncode == 0 and "initialised a new, empty store" in made.stdout
    assert again.returncode == 0 and "already initialised" in again.stdout
    assert made.stdout.split("store id ")[1] == again.stdout.split("store id ")[1]


def test_a_wiped_etcd_prefix_is_not_a_store_until_init(etcd_server: EtcdServer) -> None:
    url = f"etcd://127.0.0.1:{etcd_server.port}?prefix=/fabric-wiped-{time.time_ns()}/"

    async def identities() -> tuple[str, str]:
        store = open_store(url, create=False)
        try:
            with pytest.raises(StoreNotInitialised, match="never initialised"):
                await store.identity()
            made = await store.identity(create=True)
            read = await store.identity()
        finally:
            await store.close()
        return made.store_id, read.store_id

    made, read = run(identities())

    assert made == read != ""


# --- agents keep what a new store does not know ---


class Agent:
    """A real agent uplink (its policies faked) registering as node-a with `target`."""

    def __init__(self, target: str, state: Path) -> None:
        self.policies = FakePolicies()
        self.store_id_path = state / "fleet-store-id"
        settings = UplinkSettings(
            target=target,
            node_name="node-a",
            labels={"pool": "training"},
            capabilities=("qos-enforce",),
            summary_interval_s=0.2,
            store_id_path=self.store_id_path,
            backoff_min_s=0.05,
            backoff_max_s=0.2,
        )
        self.uplink = Uplink(settings, self.policies, SnapshotHub(0.2))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.uplink.run, args=(self._stop,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[[str], Agent]]:
    started: list[Agent] = []

    def start(target: str) -> Agent:
        started.append(Agent(target, tmp_path))
        return started[-1]

    yield start
    for one in started:
        one.close()


def eventually(check: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:g}s"
        time.sleep(0.05)


def apply_policy(running: InProcessAggregator, name: str) -> None:
    document = api_policy_document("fab0", name)
    request = pb.ApplyPolicyRequest(object=encode_document(document), selector={"pool": "training"})
    running.unix_stub().ApplyPolicy(request, timeout=10)


def fabricctl(*args: str) -> dict[str, Any]:
    """`fabricctl ARGS` (-o json), in this process; its answer."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ctl.main(list(args))
    assert code == ExitCode.OK, out.getvalue()
    answer: dict[str, Any] = json.loads(out.getvalue())
    return answer


def kept_on(running: InProcessAggregator) -> list[str] | None:
    """node-a's kept policies; None before it registered."""
    try:
        node = running.unix_stub().GetNode(pb.GetNodeRequest(name="node-a"), timeout=10).node
    except grpc.RpcError:
        return None
    return list(node.kept_policies)


def test_a_new_store_does_not_strip_fleet_policies_until_an_operator_releases_them(
    tmp_path: Path, agent: Callable[[str], Agent]
) -> None:
    port = free_port()
    listen = {"grpc_listen": f"127.0.0.1:{port}", "insecure_plaintext_agents": True}
    first_store = f"sqlite://{tmp_path / 'first.db'}"
    # The same aggregator address, a store made anew (the old one lost).
    second_store = f"sqlite://{tmp_path / 'second.db'}"

    with aggregator(first_store, **listen) as first:
        node = agent(f"127.0.0.1:{port}")
        apply_policy(first, "train-net")
        apply_policy(first, "infer-net")
        eventually(lambda: node.policies.held == {"train-net", "infer-net"}, "both applied")
        eventually(node.store_id_path.exists, "the store id remembered")
        first_id = first.fleet.identity.store_id if first.fleet.identity else ""

    with aggregator(second_store, **listen) as second:
        apply_policy(second, "infer-net")  # the operator re-publishes one of them
        eventually(lambda: kept_on(second) == ["train-net"], "train-net reported kept")
        held_while_kept = set(node.policies.held)
        remembered_while_kept = node.store_id_path.read_text().strip()

        released = fabricctl(
            "--aggregator", f"unix://{second.config.grpc_socket}", "-o", "json", "release-kept"
        )
        eventually(lambda: node.policies.held == {"infer-net"}, "train-net removed")
        second_id = second.fleet.identity.store_id if second.fleet.identity else ""
        eventually(lambda: kept_on(second) == [], "nothing kept any more")

    assert held_while_kept == {"train-net", "infer-net"}
    assert remembered_while_kept == first_id
    assert [n["node"] for n in released["nodes"]] == ["node-a"]
    assert node.store_id_path.read_text().strip() == second_id != first_id
