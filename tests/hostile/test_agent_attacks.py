"""The node agent against a hostile user or an unlucky operator: policy files swapped
under the reader, state files set aside in a restart loop, and a policy directory
filled past what a node holds. Each case costs only itself: the reader never blocks,
the disk does not fill, what is enforced stays."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from agent.common.policy.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENTS
from agent.common.policy.model import (
    PolicyError,
    PolicyObject,
    load_policies,
    parse_document,
    read_policy_text,
)
from agent.node.api.server import MAX_CONNECTIONS
from agent.node.exporter import (
    MAX_METRICS_CONNECTIONS,
    METRICS_IDLE_TIMEOUT_S,
    ExpositionCache,
)
from agent.node.qos.api_objects import API_FILE, FAILED, RefusedError
from agent.node.qos.files import MAX_POLICY_DIRECTORY_BYTES, MAX_POLICY_FILES, FileRead, read_files
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import (
    MAX_SET_ASIDE,
    MAX_STATE_BYTES,
    STATE_FILE,
    StateError,
    StateSaveError,
    load_state,
    write_json_atomic,
)
from agent.node.sampler import Sampler
from tests.hostile.test_agent_api import Api, api
from tests.node.api.test_listeners import CHANNEL_OPTIONS
from tests.node.qos import DEVICE, SPARE, api_policy, assignment_document, fake_settings
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_daemon import wait_until
from tests.node.qos.test_reconciler import POLICY, write
from tests.node.test_exporter import served

__all__ = ["api", "served"]  # the in-process API and metrics server

# Generous: a read that takes this long is one that waits for a FIFO's writer.
READ_TIMEOUT_S = 10.0


@contextmanager
def regular_at_check(
    monkeypatch: pytest.MonkeyPatch, swapped: Path, regular: Path
) -> Iterator[None]:
    """`swapped` looks like the regular file `regular` to stat and lstat by name: the
    file as it was when checked, before an attacker put a FIFO in its place."""
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(path, str | os.PathLike) and os.fspath(path) == str(swapped):
            return real_stat(regular)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    yield


def finishes(call: Callable[[], object], fifo: Path) -> tuple[bool, object]:
    """(whether `call` returned or raised within READ_TIMEOUT_S, what it gave). A reader
    still waiting on `fifo` is released by a writer that opens and closes it."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT_S)
    done = not thread.is_alive()
    if not done:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(READ_TIMEOUT_S)
    return done, outcome[0] if outcome else None


# --- files swapped between their check and their read -----------------------------------


def test_a_policy_file_swapped_for_a_fifo_after_its_check_is_refused_and_blocks_no_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write(tmp_path, DEVICE)
    fifo = tmp_path / "swapped.yaml"
    os.mkfifo(fifo)

    with regular_at_check(monkeypatch, fifo, good):
        done, result = finishes(lambda: read_files([fifo, good], interface_exists=bool), fifo)

    assert done, "the read waited for a writer of the FIFO"
    assert isinstance(result, FileRead), result
    assert "not a regular file" in result.broken[str(fifo)]
    assert [p.policy.metadata.name for p in result.policies] == ["node"]
    with pytest.raises(PolicyError, match="not a regular file"):
        read_policy_text(fifo)


def test_a_state_file_swapped_for_a_fifo_after_its_check_is_unusable_not_a_blocked_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = tmp_path / "regular.json"
    regular.write_text('{"version": 1, "policies": []}')
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    fifo = state_dir / STATE_FILE
    os.mkfifo(fifo)

    with regular_at_check(monkeypatch, fifo, regular):
        done, result = finishes(lambda: load_state(state_dir), fifo)

    assert done, "the agent's start waited for a writer of the FIFO"
    assert isinstance(result, StateError), result
    assert "not a regular file" in str(result)


# --- state files set aside, start after start -----------------------------------------


def test_a_restart_loop_over_a_corrupt_state_file_keeps_only_the_newest_set_aside_copies(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    starts = MAX_SET_ASIDE * 4
    state_file = dirs[1] / STATE_FILE

    for start in range(starts):
        dirs[1].mkdir(exist_ok=True)
        state_file.write_text(f"corrupt at start {start}")
        agent = Reconciler(fake_settings(dirs, cgroups), kernel)
        try:
            assert agent.reconcile().result == "success"
        finally:
            agent.close()

    aside = sorted(dirs[1].glob(f"{STATE_FILE}.corrupt-*"))
    assert [p.read_text() for p in aside] == [
        f"corrupt at start {start}" for start in range(starts - MAX_SET_ASIDE, starts)
    ]
    assert load_state(dirs[1]).policies["node"].device == DEVICE


# --- a policy directory past what a node holds ------------------------------------------


def test_a_directory_of_twice_the_policy_file_bound_costs_one_problem_and_loses_nothing(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    assert reconciler.reconcile().result == "success"
    enforced = kernel.tree(DEVICE)
    # Cheap to refuse one by one, and sorted before node.yaml: what a node may be handed.
    for i in range(2 * MAX_POLICY_FILES):
        (dirs[0] / f"flood-{i:05}.yaml").write_text("kind: QosPolicy\n\tbroken: here\n")

    result = reconciler.reconcile()

    assert len(result.violations) == MAX_POLICY_FILES + 1
    (directory,) = [v for v in result.violations if v.file == str(dirs[0])]
    assert directory.reason.startswith(f"{MAX_POLICY_FILES + 1} of {2 * MAX_POLICY_FILES + 1} ")
    assert "from flood-01024.yaml on" in directory.reason
    assert kernel.tree(DEVICE) == enforced
    (node,) = [v for v in reconciler.policies() if v.name == "node"]
    assert node.state == FAILED
    assert "not read" in node.message and "the version last applied stays" in node.message


def test_files_past_the_directorys_byte_bound_are_not_parsed_and_what_they_enforce_stays(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    assert reconciler.reconcile().result == "success"
    enforced = kernel.tree(DEVICE)
    # Each within the document limit, and refused at its second line: together they
    # take every byte the directory may.
    head = "kind: QosPolicy\n\tbroken: here\n#"
    filler = head + "x" * (MAX_DOCUMENT_BYTES - len(head) - 1) + "\n"
    files = MAX_POLICY_DIRECTORY_BYTES // MAX_DOCUMENT_BYTES
    for i in range(files):
        (dirs[0] / f"big-{i:02}.yaml").write_text(filler)

    result = reconciler.reconcile()

    (directory,) = [v for v in result.violations if v.file == str(dirs[0])]
    assert directory.reason.startswith(f"1 of {files + 1} policy files not read")
    assert "from node.yaml on" in directory.reason
    assert kernel.tree(DEVICE) == enforced
    (node,) = [v for v in reconciler.policies() if v.name == "node"]
    assert node.state == FAILED
    assert "not read" in node.message and "the version last applied stays" in node.message

    for path in dirs[0].glob("big-*.yaml"):
        path.unlink()
    write(dirs[0], DEVICE, rate="300Mbit")
    assert reconciler.reconcile().result == "success"
    assert kernel.tree(DEVICE) != enforced


# --- many documents in one file ---------------------------------------------------------


def test_a_megabyte_of_empty_documents_is_one_problem_of_its_file_and_costs_no_other(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    assert reconciler.reconcile().result == "success"
    enforced = kernel.tree(DEVICE)
    flood = dirs[0] / "flood.yaml"
    flood.write_text("---\n{}\n" * 140_000)

    result = reconciler.reconcile()

    (violation,) = [v for v in result.violations if v.file == str(flood)]
    assert violation.reason == f"holds more than {MAX_DOCUMENTS} documents"
    assert violation.line == 2 * MAX_DOCUMENTS + 1
    (listed,) = [v for v in reconciler.policies() if v.file == str(flood)]
    assert listed.message == f"line {violation.line}:1: {violation.reason}"
    assert kernel.tree(DEVICE) == enforced


def test_a_file_of_as_many_policies_as_documents_allowed_loads_them_all() -> None:
    policies = [
        POLICY.format(name=f"p{i}", device=f"eth{i}", rate="500Mbit") for i in range(MAX_DOCUMENTS)
    ]

    loaded = load_policies("---\n".join(policies), "many.yaml")

    assert len(loaded) == MAX_DOCUMENTS
    with pytest.raises(PolicyError, match=f"more than {MAX_DOCUMENTS} documents"):
        load_policies("---\n".join([*policies, policies[0]]), "many.yaml")


# --- API objects past what a start reads back --------------------------------------------


def megabyte_assignment(name: str) -> PolicyObject:
    """An assignment of nearly 1 MiB to class bulk of job-net: 250 cgroup paths of 4,000
    characters (cgroups not there yet: they wait, and cost no u32 filter)."""
    stem = "/".join(["a" * 250] * 16)[:3990]
    document = assignment_document(name, stem, "job-net", "bulk")
    document["spec"]["match"] = [{"cgroup": f"{stem}/{j:05}"} for j in range(250)]
    return parse_document(document, "request")


def test_api_objects_past_what_a_start_reads_back_are_refused_and_the_others_survive_a_restart(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    agent = Reconciler(fake_settings(dirs, cgroups), kernel)
    agent.apply_object(api_policy(SPARE))
    enforced = kernel.tree(SPARE)
    applied: list[str] = []
    try:
        with pytest.raises(RefusedError) as refused:
            for i in range(2 * MAX_STATE_BYTES // MAX_DOCUMENT_BYTES):
                agent.apply_object(megabyte_assignment(f"job-{i}"))
                applied.append(f"job-{i}")
    finally:
        agent.close()

    (problem,) = refused.value.problems
    assert problem.kind == "LIMIT" and problem.subject == f"job-{len(applied)}"
    assert API_FILE in problem.description
    assert (dirs[1] / API_FILE).stat().st_size <= MAX_STATE_BYTES
    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        restarted.reconcile()
        assert {e.name for e in restarted.api.entries()} == {"job-net", *applied}
    finally:
        restarted.close()
    assert kernel.tree(SPARE) == enforced
    assert not list(dirs[1].glob("*.corrupt-*"))


def test_a_state_file_is_never_written_past_what_a_start_reads_back(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    write_json_atomic(path, {"version": 1})

    with pytest.raises(StateSaveError) as refused:
        write_json_atomic(path, {"version": 1, "padding": "x" * MAX_STATE_BYTES})

    assert refused.value.errno == errno.EFBIG
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


# --- connections held open on the API's listeners ---------------------------------------


def connection(target: str) -> grpc.Channel:
    """A channel with a connection of its own (channels otherwise share one)."""
    return grpc.insecure_channel(
        target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )


def answers(channel: grpc.Channel) -> bool:
    try:
        HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return True


def test_connections_held_open_on_tcp_are_bounded_and_leave_the_unix_socket_served(
    api: Api,
) -> None:
    target = f"127.0.0.1:{api.server.tcp_port}"
    held = [connection(target) for _ in range(MAX_CONNECTIONS + 32)]
    try:
        answered = sum(answers(channel) for channel in held)

        assert answered == MAX_CONNECTIONS
        assert answers(api.unix())
    finally:
        for channel in held:
            channel.close()
    # Connections closed are taken again.
    fresh = connection(target)
    try:
        wait_until(lambda: answers(fresh), 30, "a TCP call once the others closed")
    finally:
        fresh.close()


def test_metrics_connections_that_send_nothing_are_bounded_then_dropped_and_scrapes_go_on(
    served: tuple[Sampler, ExpositionCache, str],
) -> None:
    sampler, cache, url = served
    cache.update(sampler.sample())
    address = urllib.parse.urlsplit(url)
    threads_before = threading.active_count()
    silent: list[socket.socket] = []
    try:
        for _ in range(MAX_METRICS_CONNECTIONS + 8):
            silent.append(socket.create_connection((address.hostname or "", address.port or 0)))
        # A thread a connection held, none for those past the bound.
        handlers = threading.active_count() - threads_before

        assert handlers <= MAX_METRICS_CONNECTIONS
        open_ = list(silent)

        def all_dropped() -> bool:
            readable, _, _ = select.select(open_, [], [], 1.0)
            closed = [c for c in readable if c.recv(1) == b""]
            open_[:] = [c for c in open_ if c not in closed]
            return not open_

        wait_until(all_dropped, 3 * METRICS_IDLE_TIMEOUT_S, "the silent connections dropped")
    finally:
        for connection in silent:
            connection.close()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.status == 200
