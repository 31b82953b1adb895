"""An agent (or a peer holding an agent's certificate) attacking the aggregator: what
it sends costs the aggregator a bounded amount of memory, and never the other nodes'
enforcement or the operator's view."""

from __future__ import annotations

import asyncio

from agent.aggregator.limits import MAX_REPORT_MESSAGE_BYTES
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests.aggregator.conftest import run
from tests.aggregator.test_fleet import assignment, fleet_on, register, report

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
