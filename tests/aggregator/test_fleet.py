"""The aggregator's fleet logic in one event loop, over a real SQLite store: what each
agent session is sent, what orchestrators are answered, and how reports, removals,
snapshots and store failures are handled. The gRPC layer and real agents are covered in
test_fleet_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from agent.aggregator.events import EventHub, WatcherLimitError
from agent.aggregator.fleet import (
    AgentSession,
    Fleet,
    NodeAlreadyConnected,
    UnknownNode,
    UnknownPolicy,
)
from agent.aggregator.registry import Liveness
from agent.aggregator.store import Assignment, Store, StoreError, open_store
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests.aggregator.conftest import run
from tests.node.qos import api_policy_document

LIVENESS = Liveness(summary_interval_s=1.0, stale_after_missed=3, gone_after_s=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_140_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def fleet_on(store: Store | None = None, clock: Clock | None = None) -> AsyncIterator[Fleet]:
    store = store or open_store("sqlite://:memory:")
    fleet = Fleet(store, LIVENESS, clock=clock or Clock())
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()
        await store.close()


def register(name: str, **labels: str) -> pb.Register:
    return pb.Register(node_name=name, labels=labels, agent_version="0.1.0")


def drain(session: AgentSession) -> list[pb.AggregatorMessage]:
    messages = []
    while not session.outbox.empty():
        messages.append(session.outbox.get_nowait())
    return messages


def kinds(messages: list[pb.AggregatorMessage]) -> list[str]:
    return [str(m.WhichOneof("kind")) for m in messages]


def assignment(name: str = "train-net", **selector: str) -> Assignment:
    return Assignment(name, api_policy_document("fab0", name), selector)


def report(
    name: str, revision: int, outcome: pb.PolicyOutcome.ValueType, message: str = ""
) -> pb.AgentMessage:
    return pb.AgentMessage(
        policy_report=pb.PolicyReport(
            name=name, revision=revision, outcome=outcome, message=message
        )
    )


def states(statuses: list[pb.NodePolicyStatus]) -> dict[str, str]:
    return {
        s.node: pb.NodePolicyState.Name(s.state).removeprefix("NODE_POLICY_STATE_")
        for s in statuses
    }


async def soon(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def answer_reports(fleet: Fleet, session: AgentSession, outcome: Any) -> None:
    """Act as the agent: report `outcome` for every assignment sent to `session`."""
    while True:
        message = await session.outbox.get()
        if message.HasField("assignment"):
            sent = message.assignment
            await fleet.receive(session, report(sent.name, sent.revision, outcome, "why"))


# --- registration ---


def test_registration_sends_the_count_then_every_matching_policy() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            await fleet.store.put_assignment(assignment("train-net", pool="training"))
            await fleet.store.put_assignment(assignment("infer-net", pool="inference"))
            await fleet.store.put_assignment(assignment("all-net"))
            await soon(lambda: len(fleet.assignments) == 3)

            session = await fleet.attach(register("node-a", pool="training"))

            messages = drain(session)
            assert kinds(messages) == ["registered", "assignment", "assignment"]
            assert messages[0].registered.assignments == 2
            assert [m.assignment.name for m in messages[1:]] == ["all-net", "train-net"]
            assert messages[1].assignment.object.policy.metadata.name == "all-net"
            assert await fleet.store.node_labels("node-a") == {"pool": "training"}
            assert "node-a" in await fleet.store.live_nodes()

    run(scenario())


def test_a_new_stream_for_a_node_is_refused_while_the_old_one_is_live() -> None:
    async def scenario() -> None:
        clock = Clock()
        async with fleet_on(clock=clock) as fleet:
            first = await fleet.attach(register("node-a"))
            clock.now += LIVENESS.stale_after_s

            with pytest.raises(NodeAlreadyConnected, match="already has a live stream"):
                await fleet.attach(register("node-a"))

            assert fleet.sessions["node-a"] is first
            assert not first.replaced.is_set()

    run(scenario())


def test_a_new_stream_for_a_node_replaces_the_old_one_once_it_is_stale() -> None:
    async def scenario() -> None:
        clock = Clock()
        async with fleet_on(clock=clock) as fleet:
            first = await fleet.attach(register("node-a"))
            clock.now += LIVENESS.stale_after_s + 0.1
            second = await fleet.attach(register("node-a"))

            assert first.replaced.is_set()
            assert fleet.sessions["node-a"] is second
            fleet.detach(first)  # the old stream's handler ends later
            assert fleet.sessions["node-a"] is second

    run(scenario())


# --- fan-out ---


def test_apply_reaches_matching_sessions_and_reports_each_node_as_data() -> None:
    async def scenario() -> None:
        clock = Clock()
        async with fleet_on(clock=clock) as fleet:
            a = await fleet.attach(register("node-a", pool="training"))
            b = await fleet.attach(register("node-b", pool="training"))
            c = await fleet.attach(register("node-c", pool="inference"))
            stale = await fleet.attach(register("node-d", pool="training"))
            fleet.detach(stale)
            # Another replica's node: in the store with labels and a live lease.
            await fleet.store.set_node_labels("node-e", {"pool": "training"})
            await fleet.store.node_alive("node-e", 60)
            await soon(lambda: "node-e" in fleet.store_labels)
            for session in (a, b, c):
                drain(session)
            agents = [
                asyncio.create_task(answer_reports(fleet, a, pb.POLICY_OUTCOME_APPLIED)),
                asyncio.create_task(answer_reports(fleet, b, pb.POLICY_OUTCOME_FAILED)),
            ]
            clock.now += 10  # node-d's summaries stopped: stale
            fleet.sweep()

            revision, statuses = await fleet.apply(
                assignment(pool="training"), validate_only=False, wait_s=5
            )

            for task in agents:
                task.cancel()
            assert revision > 0
            assert states(statuses) == {
                "node-a": "APPLIED",
                "node-b": "FAILED",
                "node-d": "UNREACHABLE",
                "node-e": "PENDING",
            }
            by_node = {s.node: s.message for s in statuses}
            assert by_node["node-b"] == "why"
            assert "another replica" in by_node["node-e"]
            assert c.outbox.empty()
            assert fleet.metrics.fanout._sum.get() > 0  # all connected nodes reported

    run(scenario())


def test_apply_without_reports_answers_pending_after_the_wait() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a", pool="training"))
            drain(a)
            started = asyncio.get_running_loop().time()

            _, statuses = await fleet.apply(
                assignment(pool="training"), validate_only=False, wait_s=0.3
            )

            assert asyncio.get_running_loop().time() - started >= 0.3
            assert states(statuses) == {"node-a": "PENDING"}
            assert kinds(drain(a)) == ["assignment"]

    run(scenario())


def test_validate_only_lists_the_nodes_and_stores_nothing() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a", pool="training"))
            drain(a)

            revision, statuses = await fleet.apply(
                assignment(pool="training"), validate_only=True, wait_s=5
            )

            assert revision == 0
            assert states(statuses) == {"node-a": "PENDING"}
            assert await fleet.store.list_assignments() == []
            assert a.outbox.empty()

    run(scenario())


def test_a_store_write_from_elsewhere_reaches_the_sessions_through_the_watch() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a", pool="training"))
            drain(a)

            stored = await fleet.store.put_assignment(assignment(pool="training"))
            await soon(lambda: not a.outbox.empty())
            (message,) = drain(a)
            assert message.assignment.revision == stored.revision

            # The selector stops matching: the node is told to remove it.
            await fleet.store.put_assignment(assignment(pool="inference"))
            await soon(lambda: not a.outbox.empty())
            (message,) = drain(a)
            assert message.removal.name == "train-net"

    run(scenario())


def test_a_report_about_an_older_revision_is_ignored() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a"))
            drain(a)
            first, _ = await fleet.apply(assignment(), validate_only=False, wait_s=0)
            second, _ = await fleet.apply(assignment(), validate_only=False, wait_s=0)

            await fleet.receive(a, report("train-net", first, pb.POLICY_OUTCOME_APPLIED))

            assert fleet.reports["train-net"]["node-a"].revision == second
            assert fleet.reports["train-net"]["node-a"].state == pb.NODE_POLICY_STATE_PENDING

    run(scenario())


def test_delete_sends_removals_and_waits_for_their_reports() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a", pool="training"))
            b = await fleet.attach(register("node-b", pool="training"))
            await fleet.apply(assignment(pool="training"), validate_only=False, wait_s=0)
            fleet.detach(b)
            drain(a)

            async def agent() -> None:
                message = await a.outbox.get()
                assert message.removal.name == "train-net"
                await fleet.receive(a, report("train-net", 0, pb.POLICY_OUTCOME_REMOVED))

            task = asyncio.create_task(agent())
            statuses = await fleet.delete("train-net", wait_s=5)
            await task

            assert states(statuses) == {"node-a": "APPLIED", "node-b": "UNREACHABLE"}
            assert await fleet.store.get_assignment("train-net") is None
            with pytest.raises(UnknownPolicy):
                await fleet.delete("train-net", wait_s=0)

    run(scenario())


# --- reads ---


def test_nodes_merge_this_replicas_records_with_the_stores_other_nodes() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            await fleet.attach(register("node-a", pool="training"))
            await fleet.store.set_node_labels("node-b", {"pool": "training"})
            await fleet.store.set_node_labels("node-c", {"pool": "inference"})
            await fleet.store.node_alive("node-c", 60)
            await soon(lambda: len(fleet.store_labels) == 3)

            views, more = await fleet.page({"pool": "training"}, [], "", 10)
            assert [(v.name, v.status) for v in views] == [
                ("node-a", pb.NODE_STATUS_CONNECTED),
                ("node-b", pb.NODE_STATUS_UNREACHABLE),
            ]
            assert not more
            connected, _ = await fleet.page({}, [pb.NODE_STATUS_CONNECTED], "", 10)
            assert [v.name for v in connected] == ["node-a", "node-c"]
            # Pages merge this replica's nodes and the store's in name order.
            first, more = await fleet.page({}, [], "", 2)
            rest, last = await fleet.page({}, [], first[-1].name, 2)
            assert ([v.name for v in first], more) == (["node-a", "node-b"], True)
            assert ([v.name for v in rest], last) == (["node-c"], False)
            assert (await fleet.node("node-c")).to_proto().status == pb.NODE_STATUS_CONNECTED
            with pytest.raises(UnknownNode):
                await fleet.node("node-z")

    run(scenario())


def test_snapshot_requests_go_down_the_stream_and_time_out() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a"))
            drain(a)

            async def agent() -> None:
                request = (await a.outbox.get()).snapshot_request
                reply = pb.SnapshotReply(request_id=request.request_id, snapshot=b"bytes")
                await fleet.receive(a, pb.AgentMessage(snapshot=reply))

            task = asyncio.create_task(agent())
            assert (await fleet.snapshot("node-a", 2)).snapshot == b"bytes"
            await task

            silent = await fleet.snapshot("node-a", 0.05)
            assert "did not answer" in silent.error
            assert a.snapshots == {}
            offline = await fleet.snapshot("node-z", 1)
            assert "offline" in offline.error

    run(scenario())


def test_a_second_register_on_a_stream_is_refused() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            a = await fleet.attach(register("node-a"))
            with pytest.raises(ValueError, match="first message"):
                await fleet.receive(a, pb.AgentMessage(register=register("node-b")))

    run(scenario())


# --- events and failures ---


def test_policy_reports_become_events_for_watchers() -> None:
    async def scenario() -> None:
        async with fleet_on() as fleet:
            subscription = fleet.events.subscribe([pb.EVENT_KIND_POLICY_STATUS])
            a = await fleet.attach(register("node-a"))
            drain(a)
            revision, _ = await fleet.apply(assignment(), validate_only=False, wait_s=0)

            await fleet.receive(
                a, report("train-net", revision, pb.POLICY_OUTCOME_FAILED, "no fab0")
            )

            item = await asyncio.wait_for(subscription.next(), 1)
            assert item is not None
            event, missed = item
            assert (event.node, event.subject, missed) == ("node-a", "train-net", 0)
            assert "failed: no fab0" in event.message
            assert len(subscription) == 0  # the registration event was filtered out

    run(scenario())


def test_a_slow_event_watcher_loses_the_oldest_and_is_told_how_many() -> None:
    async def scenario() -> None:
        hub = EventHub(lambda node: {"pool": "training"}, queue_size=3, max_watchers=1)
        subscription = hub.subscribe(selector={"pool": "training"})
        for index in range(5):
            hub.publish(pb.Event(kind=pb.EVENT_KIND_XID, node="n", subject=str(index)))

        first = await subscription.next()
        assert first is not None
        assert (first[0].subject, first[1]) == ("2", 2)
        with pytest.raises(WatcherLimitError):
            hub.subscribe()
        subscription.close()
        assert await subscription.next() is not None  # what was queued stays readable
        hub.subscribe()  # the closed one freed its slot

    run(scenario())


class FailingLiveness:
    """A SQLite store whose liveness writes fail, as an unreachable etcd's would."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def node_alive(self, node: str, ttl_s: int) -> None:
        raise StoreError("etcd://test", "mark node alive", "connection refused")


def test_a_failing_store_write_is_counted_and_the_stream_goes_on() -> None:
    async def scenario() -> None:
        store: Any = FailingLiveness(open_store("sqlite://:memory:"))
        async with fleet_on(store) as fleet:
            session = await fleet.attach(register("node-a"))
            await fleet.receive(session, pb.AgentMessage(summary=pb.NodeSummary(seq=1)))

            errors = fleet.metrics.store_errors.labels("node alive")._value.get()
            assert errors == 2
            assert fleet.sessions["node-a"] is session
            assert fleet.registry.get("node-a") is not None

    run(scenario())


class UnreadableStore(FailingLiveness):
    async def list_assignments(self) -> list[Assignment]:
        raise StoreError("etcd://test", "list assignments", "connection refused")


def test_a_replica_whose_store_cannot_be_read_does_not_start() -> None:
    async def scenario() -> None:
        store: Any = UnreadableStore(open_store("sqlite://:memory:"))
        fleet = Fleet(store, LIVENESS)
        with pytest.raises(StoreError, match="list assignments"):
            await fleet.start()
        await store.close()

    run(scenario())


class FlakyWatch(FailingLiveness):
    """A SQLite store whose first watch fails when `cut` is set, as a watch on an etcd
    that went away does; later watches work."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.cut = asyncio.Event()
        self.watches = 0

    async def node_alive(self, node: str, ttl_s: int) -> None:
        await self._store.node_alive(node, ttl_s)

    def watch(self) -> Any:
        self.watches += 1
        if self.watches > 1:
            return self._store.watch()
        cut = self.cut

        @asynccontextmanager
        async def failing() -> AsyncIterator[AsyncIterator[Any]]:
            async def changes() -> AsyncIterator[Any]:
                await cut.wait()
                raise StoreError("etcd://test", "watch", "connection lost")
                yield  # an async generator

            yield changes()

        return failing()


def test_a_lost_store_watch_is_retried_and_catches_up_on_what_it_missed() -> None:
    async def scenario() -> None:
        store: Any = FlakyWatch(open_store("sqlite://:memory:"))
        async with fleet_on(store) as fleet:
            a = await fleet.attach(register("node-a"))
            drain(a)
            assert fleet.store_ok

            store.cut.set()
            await soon(lambda: not fleet.store_ok)
            # Written while this replica is not watching: the relisting finds it.
            await store.put_assignment(assignment())
            await soon(lambda: fleet.store_ok, timeout_s=5)

            assert fleet.metrics.store_errors.labels("watch")._value.get() == 1
            await soon(lambda: not a.outbox.empty())
            assert kinds(drain(a)) == ["assignment"]

    run(scenario())
