"""An agent (or a peer holding an agent's certificate) attacking the aggregator: what
it sends costs the aggregator a bounded amount of memory, and never the other nodes'
enforcement or the operator's view."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aetcd
import grpc
import pytest

from agent.aggregator import fleet as fleet_module
from agent.aggregator.fleet import Fleet, FleetFull
from agent.aggregator.limits import MAX_REPORT_MESSAGE_BYTES, MAX_UNREGISTERED_PER_PEER
from agent.aggregator.registry import Liveness
from agent.aggregator.store import StoreError, open_store
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from tests.aggregator.conftest import EtcdServer, etcd_server, run
from tests.aggregator.inprocess import aggregator
from tests.aggregator.test_fleet import Clock, assignment, fleet_on, register, report

__all__ = ["etcd_server"]  # the session's etcd, used here

MIB = 1024 * 1024


def test_removals_an_agent_makes_up_are_not_kept_by_the_aggregator() -> None:
    async def act() -> int:
        async with fleet_on() as fleet:
            session = await fleet.attach(register("node-1"))
            for i in range(10_000):
                await fleet.receive(session, report(f"ghost-{i}", 0, pb.POLICY_OUTCOME_REMOVED))
            return len(fleet.removed)

    assert run(act()) == 0


def test_a_delete_hears_each_holders_removal_then_forgets_them() -> None:
    async def act() -> list[pb.NodePolicyStatus]:
        async with fleet_on() as fleet:
            session = await fleet.attach(register("node-1", pool="a"))
            await fleet.apply(assignment("train-net", pool="a"), validate_only=False, wait_s=0)
            deleting = fleet.delete("train-net", wait_s=10)

            async def agent() -> None:
                while "train-net" in session.sent:
                    await asyncio.sleep(0.01)
                removal = report("train-net", 0, pb.POLICY_OUTCOME_REMOVED)
                await fleet.receive(session, removal)

            statuses, _ = await asyncio.gather(deleting, agent())
            assert fleet.removed == {}
            return statuses

    statuses = run(act())
    assert [(s.node, s.state, s.message) for s in statuses] == [
        ("node-1", pb.NODE_POLICY_STATE_APPLIED, "removed")
    ]


def test_kept_reports_with_megabyte_names_are_dropped_and_counted() -> None:
    async def act() -> tuple[dict[str, set[str]], float, int]:
        async with fleet_on() as fleet:
            watcher = fleet.events.subscribe()
            session = await fleet.attach(register("node-1"))
            for i in range(20):
                name = f"{i}" + "x" * MIB
                await fleet.receive(session, report(name, 0, pb.POLICY_OUTCOME_KEPT))
            invalid = fleet.metrics.policy_reports.labels("invalid")._value.get()
            events = []
            while len(watcher):
                item = await watcher.next()
                assert item is not None
                events.append(item[0])
            return fleet.kept, invalid, sum(e.ByteSize() for e in events)

    kept, invalid, event_bytes = run(act())
    assert kept == {}
    assert invalid == 20
    assert event_bytes < 64 * 1024


def test_a_megabyte_failure_message_is_cut_before_it_is_kept_or_published() -> None:
    async def act() -> tuple[str, list[pb.Event]]:
        async with fleet_on() as fleet:
            session = await fleet.attach(register("node-1"))
            await fleet.apply(assignment("train-net"), validate_only=False, wait_s=0)
            watcher = fleet.events.subscribe(kinds=[pb.EVENT_KIND_POLICY_STATUS])
            revision = session.sent["train-net"]
            failed = report("train-net", revision, pb.POLICY_OUTCOME_FAILED, "y" * MIB)
            await fleet.receive(session, failed)
            item = await watcher.next()
            assert item is not None
            return fleet.reports["train-net"]["node-1"].message, [item[0]]

    message, events = run(act())
    assert MAX_REPORT_MESSAGE_BYTES <= len(message) < MAX_REPORT_MESSAGE_BYTES + 16
    assert len(events[0].message) < MAX_REPORT_MESSAGE_BYTES + 64


# --- a store holding values that do not decode ---

GARBAGE = [b"\xff\xfe not json", b"[1, 2]", b'{"name": "x"}', b'{"name": 5, "policy": []}']
LABELS_GARBAGE = [b"\xff\xfe not json", b"[1, 2]", b'{"pool": 5}', b'"pool=a"']


async def etcd_put(port: int, key: str, value: bytes) -> None:
    client = aetcd.Client(host="127.0.0.1", port=port)
    try:
        await client.put(key.encode(), value)
    finally:
        await client.close()


def etcd_url(server: EtcdServer) -> tuple[str, str]:
    prefix = f"/fabric-garbage-{secrets.token_hex(4)}/"
    return f"etcd://127.0.0.1:{server.port}?prefix={prefix}", prefix


def test_etcd_values_that_do_not_decode_cost_only_their_own_keys(
    etcd_server: EtcdServer,
) -> None:
    url, prefix = etcd_url(etcd_server)

    async def act() -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
        store = open_store(url, create=True)
        await store.identity(create=True)
        await store.put_assignment(assignment("train-net"))
        await store.set_node_labels("node-1", {"pool": "a"})
        for i, value in enumerate(GARBAGE):
            await etcd_put(etcd_server.port, f"{prefix}assignments/bad-{i}", value)
        for i, value in enumerate(LABELS_GARBAGE):
            await etcd_put(etcd_server.port, f"{prefix}labels/bad-{i}", value)
        try:
            async with fleet_on(store) as fleet:
                names = sorted(fleet.assignments)
                labels = dict(fleet.store_labels)
                # Garbage arriving through the watch, then a good change after it.
                await etcd_put(etcd_server.port, f"{prefix}assignments/train-net", b"\x00")
                await etcd_put(etcd_server.port, f"{prefix}labels/node-1", b"{")
                await store.put_assignment(assignment("later-net"))
                for _ in range(500):
                    if "later-net" in fleet.assignments:
                        break
                    await asyncio.sleep(0.01)
                return names, labels, sorted(fleet.assignments)
        finally:
            await store.close()

    names, labels, after = run(act())

    assert names == ["train-net"]
    assert labels == {"node-1": {"pool": "a"}}
    # The watch goes on past garbage; the last good revision of a garbled key stays.
    assert after == ["later-net", "train-net"]


def test_sqlite_rows_that_do_not_decode_cost_only_their_own_records(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'state.db'}"

    async def prepare() -> None:
        store = open_store(url, create=True)
        try:
            await store.identity(create=True)
            await store.put_assignment(assignment("train-net"))
            await store.set_node_labels("node-1", {"pool": "a"})
        finally:
            await store.close()

    run(prepare())
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db, db:
        for i, value in enumerate(GARBAGE):
            db.execute(
                "INSERT INTO assignments (name, record, revision) VALUES (?, ?, ?)",
                (f"bad-{i}", value, 100 + i),
            )
        for i, value in enumerate(LABELS_GARBAGE):
            db.execute(
                "INSERT INTO node_labels (node, labels, revision) VALUES (?, ?, ?)",
                (f"bad-{i}", value, 200 + i),
            )

    async def act() -> tuple[list[str], dict[str, dict[str, str]], int]:
        store = open_store(url)
        async with fleet_on(store) as fleet:
            names, labels = sorted(fleet.assignments), dict(fleet.store_labels)
            # Writing a garbled record again repairs it.
            repaired = await store.put_assignment(assignment("bad-0"))
            return names, labels, repaired.revision

    names, labels, revision = run(act())

    assert names == ["train-net"]
    assert labels == {"node-1": {"pool": "a"}}
    assert revision > 0


# --- registration churn ---


def test_nodes_that_register_once_and_vanish_are_forgotten_and_never_lock_new_nodes_out() -> None:
    clock = Clock()
    liveness = Liveness(summary_interval_s=1.0, gone_after_s=30.0, forget_after_s=100.0)

    async def act() -> tuple[bool, int, dict[str, dict[str, str]], list[str]]:
        store = open_store("sqlite://:memory:")
        fleet = Fleet(store, liveness, clock=clock, max_nodes=50)
        await fleet.start()
        try:
            for i in range(50):
                fleet.detach(await fleet.attach(register(f"ghost-{i}", pool="a")))
                # Their liveness leases run out in the store's own (real) time.
                await store.node_gone(f"ghost-{i}")
            clock.now += 60
            fleet.sweep()
            await fleet.forget_silent()
            with contextlib.suppress(FleetFull):
                await fleet.attach(register("new-node"))
            locked_out = "new-node" not in fleet.sessions
            clock.now += 60
            fleet.sweep()
            forgotten = await fleet.forget_silent()
            await fleet.attach(register("new-node", pool="b"))
            return locked_out, len(forgotten), await store.list_nodes(), sorted(fleet.sessions)
        finally:
            await fleet.stop()
            await store.close()

    locked_out, forgotten, stored, sessions = run(act())

    assert locked_out  # within forget_after, ghosts still count
    assert forgotten == 50
    assert stored == {"new-node": {"pool": "b"}}
    assert sessions == ["new-node"]


def test_a_silent_stream_keeps_its_node_and_a_node_back_before_forget_after_stays() -> None:
    clock = Clock()
    liveness = Liveness(summary_interval_s=1.0, gone_after_s=30.0, forget_after_s=100.0)

    async def act() -> tuple[list[str], list[str]]:
        store = open_store("sqlite://:memory:")
        fleet = Fleet(store, liveness, clock=clock)
        await fleet.start()
        try:
            silent = await fleet.attach(register("silent"))  # stream open, no summaries
            fleet.detach(await fleet.attach(register("returning")))
            clock.now += 90
            fleet.sweep()
            fleet.detach(await fleet.attach(register("returning")))
            clock.now += 90
            fleet.sweep()
            forgotten = await fleet.forget_silent()
            await fleet.receive(silent, pb.AgentMessage(summary=pb.NodeSummary()))
            return forgotten, sorted(await store.list_nodes())
        finally:
            await fleet.stop()
            await store.close()

    forgotten, stored = run(act())

    assert forgotten == []
    assert stored == ["returning", "silent"]


# --- an agent that does not read its stream ---


def test_an_agent_that_never_reads_its_stream_is_cut_off_not_queued_for_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = 8 * 1024
    monkeypatch.setattr(fleet_module, "MAX_OUTBOX_BYTES", bound)

    async def act() -> tuple[bool, int, bool, int]:
        async with fleet_on() as fleet:
            deaf = await fleet.attach(register("deaf"))
            for i in range(200):  # about 140 bytes each
                await fleet.apply(assignment(f"policy-{i}"), validate_only=False, wait_s=0)
            cut, queued = deaf.overflowed.is_set(), deaf.queued_bytes
            fleet.detach(deaf)
            # Registering again: the whole resync is queued, whatever its size.
            again = await fleet.attach(register("deaf"))
            return cut, queued, again.overflowed.is_set(), again.outbox.qsize()

    cut, queued, cut_again, resync = run(act())

    assert cut
    assert queued <= bound
    assert not cut_again
    assert resync == 201  # registered, then every policy


def test_a_stream_cut_off_for_not_reading_ends_with_resource_exhausted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet_module, "MAX_OUTBOX_BYTES", 1)
    with aggregator(insecure_plaintext_agents=True) as running:
        stub = running.stub()
        calls = iter([pb.AgentMessage(register=pb.Register(node_name="deaf"))])
        stream = stub.Connect(_then_wait(calls), timeout=20)
        assert next(stream).WhichOneof("kind") == "registered"
        stub.GetNode(pb.GetNodeRequest(name="deaf", full_snapshot=True), timeout=5)

        with pytest.raises(grpc.RpcError) as ended:
            list(stream)

    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "register again" in str(ended.value.details())


def _then_wait(messages: Iterator[pb.AgentMessage]) -> Iterator[pb.AgentMessage]:
    """The messages, then a stream that stays open without sending."""
    yield from messages
    time.sleep(15)


# --- streams that never register ---


def test_streams_left_silent_before_registering_are_bounded_per_peer_and_then_freed() -> None:
    done = threading.Event()

    def silent() -> Iterator[pb.AgentMessage]:
        done.wait(30)
        return
        yield

    with aggregator(insecure_plaintext_agents=True) as running:
        stub = running.stub()
        try:
            held = [stub.Connect(silent(), timeout=30) for _ in range(MAX_UNREGISTERED_PER_PEER)]
            refusal = None
            deadline = time.monotonic() + 20
            while refusal is None and time.monotonic() < deadline:
                extra = stub.Connect(silent(), timeout=2)
                try:
                    list(extra)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        refusal = exc
            for call in held:
                call.cancel()
            registered = None
            while registered is None and time.monotonic() < deadline + 10:
                hello = iter([pb.AgentMessage(register=pb.Register(node_name="node-1"))])
                try:
                    registered = next(stub.Connect(hello, timeout=5)).WhichOneof("kind")
                except grpc.RpcError:
                    time.sleep(0.2)
        finally:
            done.set()

    assert refusal is not None
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "register at once" in str(refusal.details())
    assert registered == "registered"


def test_a_garbled_store_id_stops_the_aggregator_naming_the_store(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    etcd, prefix = etcd_url(etcd_server)
    sqlite = f"sqlite://{tmp_path / 'state.db'}"

    async def garble() -> None:
        for url in (etcd, sqlite):
            store = open_store(url, create=True)
            await store.identity(create=True)
            await store.close()
        await etcd_put(etcd_server.port, f"{prefix}store/id", b"\xff" * 100_000)

    run(garble())
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db, db:
        db.execute("UPDATE store_meta SET value = 'x\n' WHERE key = 'store_id'")

    async def identity(url: str) -> StoreError:
        store = open_store(url)
        try:
            with pytest.raises(StoreError) as failed:
                await store.identity()
            return failed.value
        finally:
            await store.close()

    for url in (etcd, sqlite):
        error = run(identity(url))
        assert url in str(error)
        assert "is not one init makes" in str(error)
        assert len(str(error)) < 500


# --- WatchEvents slots ---


def test_tcp_readers_taking_every_watch_slot_leave_the_unix_socket_its_own() -> None:
    with aggregator() as running:
        tcp = running.stub()
        held = [tcp.WatchEvents(pb.WatchEventsRequest(), timeout=60) for _ in range(256)]
        try:
            deadline = time.monotonic() + 20
            while len(running.fleet.events) < 256 and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as refused:
                next(tcp.WatchEvents(pb.WatchEventsRequest(), timeout=10))
            with grpc.insecure_channel(f"unix:{running.config.grpc_socket}") as channel:
                local = pb_grpc.AggregatorServiceStub(channel)
                watch = local.WatchEvents(pb.WatchEventsRequest(), timeout=20)
                while len(running.fleet.events) < 257 and time.monotonic() < deadline:
                    time.sleep(0.05)
                running.call(running.fleet.attach(pb.Register(node_name="node-1")))
                event = next(watch).event
                watch.cancel()
        finally:
            for call in held:
                call.cancel()

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "on the TCP listener" in str(refused.value.details())
    assert (event.kind, event.node) == (pb.EVENT_KIND_NODE_REGISTERED, "node-1")


def test_nodes_known_only_from_the_store_are_forgotten_once_not_live_for_forget_after() -> None:
    clock = Clock()
    liveness = Liveness(summary_interval_s=1.0, gone_after_s=30.0, forget_after_s=100.0)

    async def act() -> tuple[list[str], list[str], dict[str, dict[str, str]]]:
        store = open_store("sqlite://:memory:")
        try:
            # Nodes of an earlier run (or of another replica): labels, no record here.
            for i in range(50):
                await store.set_node_labels(f"ghost-{i}", {"pool": "a"})
            await store.set_node_labels("elsewhere", {"pool": "a"})
            await store.node_alive("elsewhere", 3600)
            fleet = Fleet(store, liveness, clock=clock)
            await fleet.start()
            try:
                early = await fleet.forget_silent()
                clock.now += 150
                late = await fleet.forget_silent()
            finally:
                await fleet.stop()
            return early, late, await store.list_nodes()
        finally:
            await store.close()

    early, late, stored = run(act())

    assert early == []
    assert sorted(late) == sorted(f"ghost-{i}" for i in range(50))
    assert stored == {"elsewhere": {"pool": "a"}}
