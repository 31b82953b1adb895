"""The `QosKernel` contract: the netlink kernel (in a throwaway namespace, needs root) and
the in-memory fake the QoS logic is tested against must behave alike. Every test runs on
both; what the test does to the kernel behind the agent's back goes through `Hands`,
which for the real kernel is `tc`, `ip` and `nft` in the namespace."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pytest

from agent.common.policy.units import PortRange
from agent.node.qos.htb import HtbClass, HtbTree, U32Filter, U32Match, plan
from agent.node.qos.kernel import (
    AgentObjects,
    DeleteNftTable,
    EnsureRedirect,
    KernelStateConflict,
    LoadNftTable,
    NftError,
    QosKernel,
    RemoveRedirect,
    RemoveTree,
    TcApplyError,
    TcError,
    TreeChanges,
    ifb_name,
)
from agent.node.qos.netlink_kernel import NetlinkKernel
from tests.conftest import VethPair
from tests.node.qos.fake_kernel import FakeKernel

MBIT = 10**6


class Hands(Protocol):
    """What a test does to the kernel that the agent did not."""

    def add_foreign_root(self, device: str) -> None: ...

    def delete_class(self, device: str, minor: int) -> None: ...

    def add_foreign_ingress_filter(self, interface: str) -> None: ...

    def change_nft_table(self) -> None: ...

    def delete_interface(self, name: str) -> None: ...


class RealHands:
    def __init__(self, netns: str) -> None:
        self.netns = netns

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=True, capture_output=True)

    def add_foreign_root(self, device: str) -> None:
        self.run("tc", "qdisc", "add", "dev", device, "root", "handle", "5:", "tbf", "rate",
                 "1mbit", "burst", "32kbit", "latency", "400ms")  # fmt: skip

    def delete_class(self, device: str, minor: int) -> None:
        for pref in ("10", "20"):  # the class's filters first, as the kernel insists
            self.run("tc", "filter", "del", "dev", device, "parent", "fa:", "pref", pref)
        self.run("tc", "class", "del", "dev", device, "classid", f"fa:{minor:x}")

    def add_foreign_ingress_filter(self, interface: str) -> None:
        self.run("tc", "qdisc", "add", "dev", interface, "ingress")
        self.run("tc", "filter", "add", "dev", interface, "ingress", "protocol", "ip", "pref",
                 "7", "u32", "match", "ip", "dport", "22", "0xffff", "flowid", "1:1")  # fmt: skip

    def change_nft_table(self) -> None:
        self.run("nft", "add", "chain", "inet", "fabric_agent", "extra")

    def delete_interface(self, name: str) -> None:
        self.run("ip", "link", "del", name)


@dataclass
class Subject:
    """A kernel under test, the hands behind its back, and two of its interfaces."""

    kernel: QosKernel
    hands: Hands
    device: str
    other: str


@pytest.fixture(params=["netlink", "fake"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if request.param == "fake":
        fake = FakeKernel(["fab0", "fab1"])
        yield Subject(fake, fake, "fab0", "fab1")
        return
    pair: VethPair = request.getfixturevalue("shaped_pair")
    other = f"{pair.device[:11]}-o"
    subprocess.run(
        ["ip", "-n", pair.netns, "link", "add", other, "type", "veth", "peer", "name", f"{other}x"],
        check=True,
    )
    subprocess.run(["ip", "-n", pair.netns, "link", "set", other, "up"], check=True)
    kernel = NetlinkKernel(pair.netns)
    try:
        yield Subject(kernel, RealHands(pair.netns), pair.device, other)
    finally:
        kernel.close()


def tree(device: str, rate_10: int = 600 * MBIT) -> HtbTree:
    return HtbTree(
        device=device,
        root_major=0xFA,
        default_minor=0x11,
        classes=(
            HtbClass.with_rate(0x1, None, 1000 * MBIT),
            HtbClass.with_rate(0x10, 0x1, rate_10, 1000 * MBIT, 1, "collectives"),
            HtbClass.with_rate(0x11, 0x1, 100 * MBIT, 1000 * MBIT, 3, "default"),
        ),
        filters=(
            U32Filter(10, 0x10, U32Match(ip_proto=6, dport=PortRange.single(5201))),
            U32Filter(20, 0x10, U32Match(protocol="ipv6", dport=PortRange(29500, 29599))),
        ),
    )


def put(kernel: QosKernel, desired: HtbTree, *, take_over: bool = False) -> int:
    """Plan from what the kernel has and apply; how many changes that took."""
    actual = kernel.read_tree(desired.device, take_over=take_over)
    changes = plan(desired, actual)
    if changes:
        kernel.apply(TreeChanges(desired.device, tuple(changes), actual))
    return len(changes)


def test_a_fresh_interface_holds_nothing_of_the_agents(subject: Subject) -> None:
    kernel = subject.kernel

    assert kernel.read_tree(subject.device) is None
    assert not kernel.read_redirect(subject.device).complete
    assert kernel.read_nft_table() is None
    assert kernel.interface_exists(subject.device)
    assert not kernel.interface_exists("fabnosuch0")
    assert kernel.capabilities().htb and kernel.capabilities().u32


def test_a_tree_reads_back_as_applied_and_then_needs_nothing(subject: Subject) -> None:
    desired = tree(subject.device)

    made = put(subject.kernel, desired)

    assert made > 0
    assert subject.kernel.read_tree(subject.device) == desired
    assert put(subject.kernel, desired) == 0
    assert set(subject.kernel.class_stats(subject.device)) == {0x1, 0x10, 0x11}


def test_one_rate_is_one_change(subject: Subject) -> None:
    put(subject.kernel, tree(subject.device))
    edited = tree(subject.device, rate_10=500 * MBIT)

    changes = plan(edited, subject.kernel.read_tree(subject.device))
    subject.kernel.apply(
        TreeChanges(subject.device, tuple(changes), subject.kernel.read_tree(subject.device))
    )

    assert [str(c) for c in changes] == ['~ class fa:10 "collectives" rate 600Mbit -> 500Mbit']
    assert subject.kernel.read_tree(subject.device) == edited


def test_a_class_deleted_behind_the_agents_back_reads_as_missing(subject: Subject) -> None:
    desired = tree(subject.device)
    put(subject.kernel, desired)

    subject.hands.delete_class(subject.device, 0x10)

    actual = subject.kernel.read_tree(subject.device)
    assert actual is not None and {c.minor for c in actual.classes} == {0x1, 0x11}
    assert put(subject.kernel, desired) == 4  # the class, its leaf and its two filters
    assert subject.kernel.read_tree(subject.device) == desired


def test_a_missing_device_is_an_error(subject: Subject) -> None:
    with pytest.raises(TcError, match="fabnosuch0: no such device"):
        subject.kernel.read_tree("fabnosuch0")
    with pytest.raises(TcError, match="fabnosuch0"):
        subject.kernel.read_redirect("fabnosuch0")


def test_a_foreign_root_qdisc_is_a_conflict_unless_taken_over(subject: Subject) -> None:
    subject.hands.add_foreign_root(subject.device)

    with pytest.raises(KernelStateConflict, match=f"{subject.device}: root qdisc is tbf 5:"):
        subject.kernel.read_tree(subject.device)
    assert subject.kernel.read_tree(subject.device, take_over=True) is None
    put(subject.kernel, tree(subject.device), take_over=True)
    assert subject.kernel.read_tree(subject.device) == tree(subject.device)


def test_a_failed_change_rolls_the_device_back(subject: Subject) -> None:
    previous = tree(subject.device)
    put(subject.kernel, previous)
    changes = plan(tree(subject.device, rate_10=400 * MBIT), previous)
    # A change to a class the kernel does not have: refused after the first change ran.
    ghost = HtbClass.with_rate(0x20, 0x1, 10 * MBIT)
    changes.append(dataclasses.replace(changes[0], subject=ghost, before=ghost))

    with pytest.raises(TcApplyError, match=r"~ class fa:20 .* rolled back"):
        subject.kernel.apply(TreeChanges(subject.device, tuple(changes), previous))

    assert subject.kernel.read_tree(subject.device) == previous


def test_removing_a_tree_leaves_nothing_and_twice_is_fine(subject: Subject) -> None:
    put(subject.kernel, tree(subject.device))

    subject.kernel.apply(RemoveTree(subject.device))
    subject.kernel.apply(RemoveTree(subject.device))

    assert subject.kernel.read_tree(subject.device) is None


def test_ingress_redirect_to_an_ifb_carries_a_tree_and_goes_with_it(subject: Subject) -> None:
    kernel, device = subject.kernel, subject.device
    ifb = ifb_name(device)

    kernel.apply(EnsureRedirect(device, ifb))
    put(kernel, tree(ifb))

    redirect = kernel.read_redirect(device)
    assert redirect.complete and redirect.redirect_to == ifb and redirect.conflict() is None
    assert kernel.read_tree(ifb) == tree(ifb)
    kernel.apply(RemoveRedirect(device))
    assert not kernel.read_redirect(device).complete
    assert not kernel.interface_exists(ifb)


def test_someone_elses_ingress_filter_is_a_conflict(subject: Subject) -> None:
    subject.hands.add_foreign_ingress_filter(subject.other)

    redirect = subject.kernel.read_redirect(subject.other)

    assert isinstance(redirect.conflict(), KernelStateConflict)
    with pytest.raises(KernelStateConflict, match="not the agent's"):
        subject.kernel.apply(EnsureRedirect(subject.other, ifb_name(subject.other)))


def nft_body(device: str) -> str:
    return (
        "chain output {\n  type filter hook output priority mangle; policy accept;\n"
        f'  oifname "{device}" jump local-p\n'
        "}\n"
        "chain local-p {\n  meta l4proto tcp tcp dport 5201 meta priority set fa:10 return\n}\n"
    )


def test_the_nftables_table_loads_whole_reads_back_and_goes(subject: Subject) -> None:
    kernel = subject.kernel
    body = nft_body(subject.device)

    kernel.apply(LoadNftTable(body, 1, replacing=False))
    loaded = kernel.read_nft_table()
    with pytest.raises(NftError):
        kernel.apply(LoadNftTable(body.replace("return", "refuse"), 1, replacing=True))

    assert loaded is not None
    assert kernel.read_nft_table() == loaded  # the refused load changed nothing
    subject.hands.change_nft_table()
    assert kernel.read_nft_table() != loaded
    kernel.apply(DeleteNftTable())
    assert kernel.read_nft_table() is None


def test_what_a_vanished_interface_had_is_removed_without_error(subject: Subject) -> None:
    kernel, device = subject.kernel, subject.other
    ifb = ifb_name(device)
    kernel.apply(EnsureRedirect(device, ifb))
    put(kernel, tree(ifb))
    put(kernel, tree(device))

    subject.hands.delete_interface(device)
    kernel.apply(RemoveTree(device))
    kernel.apply(RemoveTree(ifb))
    kernel.apply(RemoveRedirect(device))

    assert not kernel.interface_exists(device)
    assert not kernel.interface_exists(ifb)


def test_the_agents_objects_are_listed_wherever_they_are(subject: Subject) -> None:
    kernel, device, other = subject.kernel, subject.device, subject.other
    ifb = ifb_name(device)
    nothing = kernel.agent_objects()

    put(kernel, tree(other))
    kernel.apply(EnsureRedirect(device, ifb))
    put(kernel, tree(ifb))
    listed = kernel.agent_objects()
    kernel.apply(RemoveRedirect(device))
    kernel.apply(RemoveTree(other))

    assert nothing == AgentObjects()
    assert listed == AgentObjects(frozenset({other, ifb}), frozenset({device}), frozenset({ifb}))
    assert kernel.agent_objects() == AgentObjects()
