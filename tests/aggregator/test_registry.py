"""The aggregator's fleet view: registration, liveness from missed summaries with an
injected clock, the events summaries imply, and list / top-N queries."""

from __future__ import annotations

import pytest

from agent.aggregator.registry import Liveness, NodeRegistry, QueryError
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_140_000.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock, events: list[pb.Event]) -> NodeRegistry:
    liveness = Liveness(summary_interval_s=1.0, stale_after_missed=3, gone_after_s=30.0)
    return NodeRegistry(liveness, clock=clock, on_event=events.append)


def register(reg: NodeRegistry, name: str, **labels: str) -> None:
    reg.register(pb.Register(node_name=name, labels=labels, agent_version="0.1.0"))


def summary(
    *,
    tx: float = 0.0,
    util: float = 0.5,
    nvlink_errors: int = 0,
    links_down: tuple[int, ...] = (),
    lost: bool = False,
    xids: dict[int, int] | None = None,
    nic_errors: int = 0,
    drift: int = 0,
) -> pb.NodeSummary:
    gpu = pb.GpuSummary(
        index=0,
        uuid="GPU-0",
        lost=lost,
        utilization_ratio=util,
        power_watts=500.0,
        nvlink_links=18,
        nvlink_links_down=list(links_down),
        nvlink_errors=nvlink_errors,
        new_xids=[pb.XidDelta(xid=x, count=c) for x, c in (xids or {}).items()],
    )
    nic = pb.NicSummary(
        device="eth0", operstate="up", transmit_bytes_per_second=tx, errors=nic_errors
    )
    return pb.NodeSummary(
        gpus=[gpu], nics=[nic], reconcile=pb.ReconcileSummary(drift_corrections=drift)
    )


def kinds(events: list[pb.Event]) -> list[tuple[str, str, str]]:
    return [(pb.EventKind.Name(e.kind), e.node, e.subject) for e in events]


def test_silent_node_goes_stale_then_gone_and_comes_back() -> None:
    clock, events = Clock(), []
    reg = registry(clock, events)
    register(reg, "n1")
    reg.summary("n1", summary())

    clock.now += 3.0
    assert reg.sweep() == []  # 3 s silent: not yet more than 3 intervals
    clock.now += 0.5
    assert reg.sweep() == [("n1", pb.NODE_STATUS_STALE)]
    assert reg.sweep() == []  # reported once
    clock.now += 27.0
    assert reg.sweep() == [("n1", pb.NODE_STATUS_UNREACHABLE)]
    reg.summary("n1", summary())

    record = reg.get("n1")
    assert record is not None and record.status == pb.NODE_STATUS_CONNECTED
    assert kinds(events) == [
        ("EVENT_KIND_NODE_REGISTERED", "n1", ""),
        ("EVENT_KIND_NODE_STALE", "n1", ""),
        ("EVENT_KIND_NODE_GONE", "n1", ""),
        ("EVENT_KIND_NODE_REGISTERED", "n1", ""),
    ]
    assert events[1].message == "3 summaries missed"


def test_a_node_with_a_longer_interval_is_judged_by_its_own() -> None:
    clock, events = Clock(), []
    reg = registry(clock, events)
    slow = pb.Register(node_name="slow", agent_version="0.1.0")
    slow.summary_interval.FromSeconds(12)
    reg.register(slow)
    register(reg, "fast")

    clock.now += 10.0  # one summary of "slow" late at most; "fast" missed ten
    assert reg.sweep() == [("fast", pb.NODE_STATUS_STALE)]
    clock.now += 26.5  # 36.5 s: "slow" missed three of its 12 s summaries
    assert reg.sweep() == [("slow", pb.NODE_STATUS_STALE), ("fast", pb.NODE_STATUS_UNREACHABLE)]
    clock.now += 11.0  # gone after 48 s: three intervals and one more, past the fleet's 30 s
    assert reg.sweep() == []
    clock.now += 1.0
    assert reg.sweep() == [("slow", pb.NODE_STATUS_UNREACHABLE)]
    assert [e.message for e in events if e.node == "slow"][1] == "3 summaries missed"


def test_liveness_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="must be longer than stale"):
        Liveness(summary_interval_s=10.0, stale_after_missed=3, gone_after_s=30.0)


def test_summaries_raise_events_on_transitions_only() -> None:
    clock, events = Clock(), []
    reg = registry(clock, events)
    register(reg, "n1")
    reg.summary("n1", summary())
    reg.summary("n1", summary(links_down=(7,), xids={79: 1}, drift=2))
    reg.summary("n1", summary(links_down=(7,), lost=True))
    reg.summary("n1", summary(links_down=(7,), lost=True))

    assert kinds(events)[1:] == [
        ("EVENT_KIND_NVLINK_DOWN", "n1", "gpu 0 link 7"),
        ("EVENT_KIND_XID", "n1", "gpu 0"),
        ("EVENT_KIND_DRIFT", "n1", "qos"),
        ("EVENT_KIND_GPU_LOST", "n1", "gpu 0"),
    ]


def test_summary_from_an_unregistered_node_is_refused() -> None:
    reg = registry(Clock(), [])
    with pytest.raises(KeyError, match="unregistered node 'n9'"):
        reg.summary("n9", summary())


def test_list_by_selector_and_status() -> None:
    clock = Clock()
    reg = registry(clock, [])
    register(reg, "b", pool="training")
    register(reg, "a", pool="training")
    register(reg, "c", pool="inference")
    clock.now += 5.0
    reg.summary("a", summary())
    reg.sweep()

    assert [r.name for r in reg.nodes()] == ["a", "b", "c"]
    assert [r.name for r in reg.nodes({"pool": "training"})] == ["a", "b"]
    assert [r.name for r in reg.nodes(statuses=[pb.NODE_STATUS_STALE])] == ["b", "c"]
    assert [r.name for r in reg.nodes({"pool": "training"}, [pb.NODE_STATUS_CONNECTED])] == ["a"]


def test_top_by_latest_rates() -> None:
    reg = registry(Clock(), [])
    for name, tx in (("n1", 5e9), ("n2", 9e9), ("n3", 1e9), ("n4", 9e9)):
        register(reg, name, pool="training" if name != "n2" else "other")
        reg.summary(name, summary(tx=tx))

    top = reg.top(pb.TOP_ENTITY_NIC, "nic_transmit_bytes_per_second", 3)
    selected = reg.top(
        pb.TOP_ENTITY_NODE, "nic_transmit_bytes_per_second", 2, selector={"pool": "training"}
    )

    assert top == [("n2", "eth0", 9e9), ("n4", "eth0", 9e9), ("n1", "eth0", 5e9)]
    assert selected == [("n4", "", 9e9), ("n1", "", 5e9)]


def test_top_errors_over_a_window_and_in_the_latest_summary() -> None:
    clock = Clock()
    reg = registry(clock, [])
    register(reg, "n1")
    register(reg, "n2")
    reg.summary("n1", summary(nvlink_errors=10))
    clock.now += 120
    reg.summary("n1", summary(nvlink_errors=1))
    reg.summary("n2", summary(nvlink_errors=4))
    clock.now += 1
    reg.summary("n2", summary())

    over_5m = reg.top(pb.TOP_ENTITY_GPU, "nvlink_errors", 5, window_s=300)
    over_1m = reg.top(pb.TOP_ENTITY_NODE, "nvlink_errors", 5, window_s=60)
    latest = reg.top(pb.TOP_ENTITY_NODE, "nvlink_errors", 5)

    assert over_5m == [("n1", "0", 11.0), ("n2", "0", 4.0)]
    assert over_1m == [("n2", "", 4.0), ("n1", "", 1.0)]
    # n2's latest summary had no errors; n1's latest had 1.
    assert latest == [("n1", "", 1.0)]


def test_top_links_by_errors_and_down() -> None:
    clock = Clock()
    reg = registry(clock, [])
    register(reg, "n1")
    register(reg, "n2")
    erring = summary(nvlink_errors=7, links_down=(3,))
    erring.gpus[0].nvlink_link_errors.add(link=5, errors=6)
    erring.gpus[0].nvlink_link_errors.add(link=2, errors=1)
    reg.summary("n1", erring)
    clock.now += 1
    reg.summary("n1", summary(links_down=(3,)))
    reg.summary("n2", summary(nvlink_errors=2))

    links = reg.top(pb.TOP_ENTITY_NVLINK, "nvlink_errors", 5, window_s=60)
    nodes = reg.top(pb.TOP_ENTITY_NODE, "nvlink_errors", 5, window_s=60)
    down = reg.top(pb.TOP_ENTITY_NVLINK, "nvlink_down", 5)

    assert links == [("n1", "0/5", 6.0), ("n1", "0/2", 1.0)]
    assert nodes == [("n1", "", 7.0), ("n2", "", 2.0)]  # links are not counted twice
    assert down == [("n1", "0/3", 1.0)]


def test_unknown_top_metric_names_the_known_ones() -> None:
    reg = registry(Clock(), [])
    with pytest.raises(QueryError, match="unknown metric 'bogus' for TOP_ENTITY_NIC"):
        reg.top(pb.TOP_ENTITY_NIC, "bogus", 3)
