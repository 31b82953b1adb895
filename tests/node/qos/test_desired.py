"""From a policy to the HTB tree: structure, stable class minors, and onto the kernel."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.policy.limits import u32_filters_of
from agent.common.policy.model import (
    Match,
    QosPolicy,
    load_policies,
    load_policy_file,
    parse_document,
)
from agent.common.policy.units import PortRange
from agent.node.qos import tc
from agent.node.qos.desired import (
    CATCH_ALL_PREFS,
    FIRST_LEAF_MINOR,
    ROOT_MINOR,
    allocate_minors,
    build_tree,
    u32_filters,
)
from agent.node.qos.htb import Action, U32Match, plan
from tests import ROOT
from tests.conftest import VethPair
from tests.node.qos import DEVICE, api_policy_document, netlink_put

POLICIES = ROOT / "policies"
GBIT = 10**9


def training() -> QosPolicy:
    (loaded,) = load_policy_file(POLICIES / "training-node.yaml")
    return loaded.policy


def policy(text: str) -> QosPolicy:
    (loaded,) = load_policies(text, "test.yaml")
    return loaded.policy


def test_training_node_tree() -> None:
    desired = build_tree(training())
    tree = desired.tree

    assert tree.device == "eth0"
    root = tree.classes[0]
    assert (root.minor, root.parent_minor, root.rate_bps, root.ceil_bps) == (
        ROOT_MINOR, None, 100 * GBIT, 100 * GBIT,
    )  # fmt: skip
    assert desired.minors == {
        "collectives": 0x10, "checkpoint": 0x11, "data-loading": 0x12, "best-effort": 0x13,
    }  # fmt: skip
    leaves = {c.name: c for c in tree.classes[1:]}
    assert (leaves["collectives"].rate_bps, leaves["collectives"].ceil_bps) == (
        60 * GBIT,
        100 * GBIT,
    )
    assert leaves["collectives"].prio == 0 and leaves["best-effort"].prio == 7
    assert leaves["best-effort"].ceil_bps == 100 * GBIT  # ceil defaults to the bandwidth
    assert tree.default_minor == 0x13
    # Ports match IPv4 and IPv6; the storage subnet is IPv4 only; cgroup entries are left
    # to nftables.
    assert [(f.pref, f.flow_minor, f.match) for f in tree.filters] == [
        (100, 0x10, U32Match(protocol="ip", dport=PortRange(29500, 29599))),
        (101, 0x10, U32Match(protocol="ipv6", dport=PortRange(29500, 29599))),
        (102, 0x11, U32Match(protocol="ip", dst="10.40.0.0/16", ip_proto=6,
                             dport=PortRange.single(2049))),
        # What no class matched: the default class, by catch-all filters.
        (0xFFFE, 0x13, U32Match(protocol="ip")),
        (0xFFFF, 0x13, U32Match(protocol="ipv6")),
    ]  # fmt: skip


def test_port_lists_multiply_out() -> None:
    text = """
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {name: p}
spec:
  interface: eth1
  direction: egress
  bandwidth: 1Gbit
  defaultClass: rest
  classes:
    - name: rpc
      priority: 0
      rate: 50%
      match:
        - {srcCidr: 10.0.0.0/8, srcPorts: ["8000", "8443"], dstPorts: ["1-1023"], protocol: udp}
    - {name: rest, priority: 7, rate: 10%}
"""
    tree = build_tree(policy(text)).tree

    assert [(f.match.sport, f.match.dport, f.match.ip_proto) for f in tree.filters[:-2]] == [
        (PortRange(8000, 8000), PortRange(1, 1023), 17),
        (PortRange(8443, 8443), PortRange(1, 1023), 17),
    ]
    assert tree.classes[1].rate_bps == 500_000_000


def test_minors_are_stable_across_class_changes() -> None:
    first = allocate_minors(["a", "b", "c"], {})
    without_b = allocate_minors(["a", "c"], first)
    with_d = allocate_minors(["a", "c", "d"], without_b)

    assert first == {"a": FIRST_LEAF_MINOR, "b": FIRST_LEAF_MINOR + 1, "c": FIRST_LEAF_MINOR + 2}
    assert without_b == {"a": FIRST_LEAF_MINOR, "c": FIRST_LEAF_MINOR + 2}
    assert with_d["d"] == FIRST_LEAF_MINOR + 1  # the lowest free minor


def test_one_class_edit_is_one_change() -> None:
    before = build_tree(training())
    text = (POLICIES / "training-node.yaml").read_text().replace("rate: 20Gbit", "rate: 15Gbit")

    after = build_tree(policy(text), previous_minors=before.minors)
    changes = plan(after.tree, before.tree)

    assert len(changes) == 1
    assert changes[0].action is Action.CHANGE
    assert str(changes[0]).startswith('~ class fa:11 "checkpoint" rate 20Gbit -> 15Gbit')


def test_policy_tree_onto_the_kernel(shaped_pair: VethPair) -> None:
    text = (
        (POLICIES / "training-node.yaml")
        .read_text()
        .replace("interface: eth0", f"interface: {shaped_pair.device}")
    )
    text = text.replace("bandwidth: 100Gbit", "bandwidth: 1Gbit")
    for old, new in (("60Gbit", "600Mbit"), ("100Gbit", "1Gbit"), ("20Gbit", "200Mbit"),
                     ("80Gbit", "800Mbit"), ("15Gbit", "150Mbit"), ("60Gbit", "600Mbit"),
                     ("5Gbit", "50Mbit")):  # fmt: skip
        text = text.replace(f": {old}", f": {new}")
    desired = build_tree(policy(text)).tree

    first = netlink_put(desired, shaped_pair.netns)
    second = netlink_put(desired, shaped_pair.netns)

    assert first and second == []
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == desired


# --- validation's count of the u32 filters ----------------------------------------------

_port_ranges = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 3000)).map(
        lambda t: f"{t[0]}-{min(65535, t[0] + t[1])}"
    ),
    min_size=1,
    max_size=4,
)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "srcCidr": st.sampled_from(["10.0.0.0/8", "fd00::/64"]),
        "dstCidr": st.sampled_from(["10.1.0.0/16", "fd01::/64"]),
        "srcPorts": _port_ranges,
        "dstPorts": _port_ranges,
        "protocol": st.sampled_from(["tcp", "udp"]),
        "dscp": st.integers(0, 63),
        "cgroup": st.just("job/a"),
        "fwmark": st.just("0x1/0xff"),
    },
).filter(
    lambda e: (
        bool(e)
        and not (
            "srcCidr" in e and "dstCidr" in e and (":" in e["srcCidr"]) != (":" in e["dstCidr"])
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(_entries, min_size=1, max_size=4))
def test_validation_counts_exactly_the_u32_filters_the_node_builds(
    entries: list[dict[str, Any]],
) -> None:
    document = api_policy_document(DEVICE)
    matches = tuple(Match.model_validate(e, by_alias=True) for e in entries)
    model = parse_document(document, "doc.yaml")
    assert isinstance(model, QosPolicy)
    classes = list(model.effective_classes())
    classes[0] = replace(classes[0], match=matches)

    built = u32_filters(classes, allocate_minors([c.name for c in classes], {}))
    counted = u32_filters_of(matches)

    assert counted.prefs == len(built)
    assert counted.filters == sum(len(tc.match_entries(f.match)) for f in built)


def test_a_policy_at_every_expansion_limit_applies_and_reads_back_on_the_kernel(
    shaped_pair: VethPair,
) -> None:
    # 10 Tbit (HTB's 64-bit rates), 4 classes of 256 u32 filters each: 1,024 in all.
    document = api_policy_document(shaped_pair.device, bandwidth="10Tbit", defaultClass="c0")
    document["spec"]["classes"] = [
        {
            "name": f"c{i}",
            "priority": i,
            "rate": "2.5Tbit",
            "match": [{"dstPorts": [str(10_000 + 1000 * i + p) for p in range(128)]}],
        }
        for i in range(4)
    ]
    model = parse_document(document, "doc.yaml")
    assert isinstance(model, QosPolicy)
    desired = build_tree(model).tree
    assert len(desired.filters) == 1024 + len(CATCH_ALL_PREFS)  # and the catch-alls

    netlink_put(desired, shaped_pair.netns)

    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == desired
    assert netlink_put(desired, shaped_pair.netns) == []
