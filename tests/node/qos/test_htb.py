"""The pure tree model and planner: no kernel."""

from __future__ import annotations

import dataclasses
import random

import pytest

from agent.node.qos.htb import (
    Action,
    HtbClass,
    HtbTree,
    LeafQdisc,
    PortRange,
    U32Filter,
    U32Match,
    merge_port_blocks,
    plan,
    port_blocks,
    quantum_for_rate,
)

GBIT = 10**9


def covered(blocks: list[tuple[int, int]]) -> list[int]:
    return sorted(p for p in range(0x10000) for v, m in blocks if p & m == v)


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [
        (80, 80, [(80, 0xFFFF)]),
        (0, 65535, [(0, 0)]),
        (1024, 2047, [(1024, 0xFC00)]),
        (6000, 6007, [(6000, 0xFFF8)]),
        (5, 8, [(5, 0xFFFF), (6, 0xFFFE), (8, 0xFFFF)]),
    ],
)
def test_port_blocks_known_ranges(first: int, last: int, expected: list[tuple[int, int]]) -> None:
    assert port_blocks(first, last) == expected


def test_port_blocks_cover_exactly_the_range_and_merge_back() -> None:
    rng = random.Random(7)
    for _ in range(30):
        first = rng.randrange(0, 65536)
        last = rng.randrange(first, min(65536, first + 3000))
        blocks = port_blocks(first, last)
        assert covered(blocks) == list(range(first, last + 1))
        # Maximal: no two neighbouring blocks could be one aligned block.
        assert len(blocks) <= 32
        assert merge_port_blocks(blocks) == PortRange(first, last)


def test_port_range_rejects_bad_ports() -> None:
    with pytest.raises(ValueError):
        PortRange(10, 5)
    with pytest.raises(ValueError):
        port_blocks(0, 70000)


def test_quantum_is_clamped() -> None:
    assert quantum_for_rate(100_000) == 1514
    assert quantum_for_rate(100 * GBIT) == 200_000
    assert quantum_for_rate(8_000_000) == 100_000


def tree(rate_10: int = 60 * GBIT, default: int = 0x12) -> HtbTree:
    return HtbTree(
        device="eth0",
        root_major=0xFA,
        default_minor=default,
        classes=(
            HtbClass.with_rate(0x1, None, 100 * GBIT),
            HtbClass.with_rate(0x10, 0x1, rate_10, 100 * GBIT, 1, "collectives"),
            HtbClass.with_rate(0x11, 0x1, 30 * GBIT, 100 * GBIT, 2, "storage"),
            HtbClass.with_rate(0x12, 0x1, 10 * GBIT, 100 * GBIT, 3, "default"),
        ),
        filters=(
            U32Filter(10, 0x10, U32Match(ip_proto=6, dport=PortRange(5000, 5100))),
            U32Filter(20, 0x11, U32Match(dst="10.1.0.0/16", dscp=10)),
        ),
    )


def test_tree_derives_leaf_qdiscs() -> None:
    assert tree().leaves == (
        LeafQdisc(0x10, "pfifo"),
        LeafQdisc(0x11, "pfifo"),
        LeafQdisc(0x12, "pfifo"),
    )


def test_tree_rejects_filter_to_inner_class() -> None:
    with pytest.raises(ValueError, match="not a leaf"):
        dataclasses.replace(tree(), filters=(U32Filter(1, 0x1, U32Match()),))


def test_plan_from_nothing_builds_everything_in_order() -> None:
    changes = plan(tree(), None)

    assert [str(c).split()[:2] for c in changes][:2] == [["+", "qdisc"], ["+", "class"]]
    assert sum(1 for c in changes if isinstance(c.subject, HtbClass)) == 4
    assert sum(1 for c in changes if isinstance(c.subject, U32Filter)) == 2
    assert [c.phase for c in changes] == sorted(c.phase for c in changes)


def test_a_different_default_class_never_changes_the_qdisc() -> None:
    """HTB refuses to change a qdisc (EINVAL): the default class is the desired tree's
    catch-all filters' business, the qdisc keeps the default it was created with."""
    catch_all = U32Filter(0xFFFE, 0x12, U32Match())
    before = dataclasses.replace(tree(default=0x12), filters=(*tree().filters, catch_all))
    moved = dataclasses.replace(catch_all, flow_minor=0x11)
    after = dataclasses.replace(tree(default=0x11), filters=(*tree().filters, moved))

    changes = plan(after, before)

    assert [str(c) for c in changes] == ["~ filter pref 65534 ip -> :12 => ip -> :11"]


def test_a_filter_leaving_a_deleted_class_moves_before_the_class_goes() -> None:
    """The default class changes to one that exists and the old one is deleted: the
    catch-all moves first, so no packet meets the deleted class as the qdisc's default."""
    before = dataclasses.replace(
        tree(default=0x12), filters=(*tree().filters, U32Filter(0xFFFE, 0x12, U32Match()))
    )
    after = dataclasses.replace(
        before,
        default_minor=0x11,
        classes=before.classes[:-1],
        filters=(*tree().filters, U32Filter(0xFFFE, 0x11, U32Match())),
        leaf_qdiscs=None,
    )

    changes = plan(after, before)

    assert [str(c) for c in changes] == [
        "~ filter pref 65534 ip -> :12 => ip -> :11",
        '- class fa:12 "default" parent :1 rate 10Gbit ceil 100Gbit prio 3 quantum 200000',
    ]
    assert [c.phase for c in changes] == sorted(c.phase for c in changes)


def test_plan_same_tree_is_empty() -> None:
    assert plan(tree(), tree()) == []


def test_plan_one_rate_is_one_class_change() -> None:
    changes = plan(tree(rate_10=50 * GBIT), tree())

    assert len(changes) == 1
    assert changes[0].action is Action.CHANGE
    assert str(changes[0]) == '~ class fa:10 "collectives" rate 60Gbit -> 50Gbit'


def test_plan_replaces_changed_filter_by_pref() -> None:
    desired = dataclasses.replace(
        tree(), filters=(U32Filter(10, 0x11, U32Match(ip_proto=17)), tree().filters[1])
    )
    changes = plan(desired, tree())

    assert [(c.action, c.subject) for c in changes] == [(Action.CHANGE, desired.filters[0])]


def test_plan_deletes_removed_class_after_its_filters() -> None:
    full = tree()
    desired = dataclasses.replace(
        full,
        classes=full.classes[:2] + full.classes[3:],
        filters=full.filters[:1],
        leaf_qdiscs=None,
    )
    changes = plan(desired, full)

    assert [str(c).split()[:2] for c in changes] == [["-", "filter"], ["-", "class"]]
