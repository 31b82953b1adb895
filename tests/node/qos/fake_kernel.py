"""An in-memory `QosKernel` whose behaviour tests set: the QoS logic (reconciler, API
objects, leases, the QosService servicer) is tested against it without root. The kernel
contract suite (test_kernel_contract.py) holds it to what the netlink kernel does.

What a test can set or do behind the agent's back: interfaces that exist, a root qdisc
that is someone else's, classes, filters or a whole tree removed by hand, filters on an
interface's ingress hook, the nftables table changed or deleted, nftables missing, the
next kernel request failing, and traffic counted in a class.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.node.qos.htb import Action, Change, HtbClass, HtbTree, LeafQdisc, U32Filter
from agent.node.qos.kernel import (
    AgentObjects,
    ClassStats,
    DeleteNftTable,
    EnsureRedirect,
    IngressConflict,
    IngressRedirect,
    KernelStateConflict,
    KernelStep,
    LoadNftTable,
    NftError,
    NftListing,
    RemoveRedirect,
    RemoveTree,
    TcApplyError,
    TcCapabilities,
    TcError,
    TreeChanges,
    ifb_name,
)

T = TypeVar("T")

PFIFO_ONLY = TcCapabilities(True, True, False, True, True, True, True, True)


@dataclass
class _Tree:
    """One device's agent tree as the kernel keeps it (no class names)."""

    default_minor: int
    classes: dict[int, HtbClass] = field(default_factory=dict)
    leaves: dict[int, LeafQdisc] = field(default_factory=dict)
    filters: dict[int, U32Filter] = field(default_factory=dict)

    def read(self, device: str, root_major: int) -> HtbTree:
        kinds = [leaf.kind for leaf in self.leaves.values()]
        return HtbTree(
            device,
            root_major,
            self.default_minor,
            tuple(self.classes.values()),
            tuple(self.filters.values()),
            leaf_kind=max(set(kinds), key=kinds.count) if kinds else "pfifo",
            leaf_qdiscs=tuple(self.leaves.values()),
            strict=False,
        )


@dataclass
class _Ingress:
    qdisc: str | None = None
    redirect_to: str | None = None
    foreign_filters: int = 0


class _RequestFailed(Exception):
    def __init__(self, change: Change, code: int) -> None:
        super().__init__(os.strerror(code))
        self.change = change
        self.code = code


class FakeKernel:
    """A kernel of interfaces, agent trees, foreign root qdiscs, ingress hooks, IFB
    devices and one nftables table."""

    def __init__(
        self,
        interfaces: Iterable[str] = (),
        *,
        capabilities: TcCapabilities = PFIFO_ONLY,
    ) -> None:
        self.interfaces: set[str] = set(interfaces)
        self._capabilities = capabilities
        self._trees: dict[str, _Tree] = {}
        self._foreign: dict[str, tuple[str, int]] = {}
        self._ingress: dict[str, _Ingress] = {}
        self._ifbs: dict[str, bool] = {}  # name -> up
        self._nft_body: str | None = None
        self._nft_generation = 0
        self._counters: dict[tuple[str, int], ClassStats] = {}
        self._fail: Callable[[Change], int | None] | None = None
        self.nft_available = True
        # Every step applied, in order, and every read: what a test may assert on.
        self.steps: list[KernelStep] = []
        self.closed = False

    # --- QosKernel ---

    def capabilities(self) -> TcCapabilities:
        return self._capabilities

    def interface_exists(self, name: str) -> bool:
        return name in self.interfaces or name in self._ifbs

    def read_tree(self, device: str, *, take_over: bool = False) -> HtbTree | None:
        self._device(device)
        foreign = self._foreign.get(device)
        if foreign is not None:
            if take_over:
                return None
            raise KernelStateConflict(device, foreign[0], foreign[1])
        tree = self._trees.get(device)
        return None if tree is None else tree.read(device, 0xFA)

    def read_redirect(self, interface: str) -> IngressRedirect:
        self._device(interface)
        hook = self._ingress.get(interface, _Ingress())
        ifb = ifb_name(interface)
        return IngressRedirect(
            interface=interface,
            ifb=ifb,
            ifb_present=ifb in self._ifbs,
            ifb_up=self._ifbs.get(ifb, False),
            qdisc=hook.qdisc,
            redirect_to=hook.redirect_to,
            foreign_filters=hook.foreign_filters,
        )

    def read_nft_table(self) -> NftListing | None:
        self._nft_usable()
        if self._nft_body is None:
            return None
        return {"nftables": [{"table": {"handle": self._nft_generation}}, self._nft_body]}

    def class_stats(self, device: str) -> dict[int, ClassStats]:
        self._device(device)
        tree = self._trees.get(device)
        if tree is None:
            return {}
        zero = ClassStats(0, 0, 0, 0, 0, 0, None)
        return {
            minor: dataclasses.replace(self._counters.get((device, minor), zero), minor=minor)
            for minor in tree.classes
        }

    def apply(self, step: KernelStep) -> None:
        self.steps.append(step)
        if isinstance(step, TreeChanges):
            self._apply_tree(step)
        elif isinstance(step, EnsureRedirect):
            self._ensure_redirect(step.interface)
        elif isinstance(step, RemoveTree):
            # A device that is gone took its tree with it.
            if self.interface_exists(step.device) and self.read_tree(step.device) is not None:
                del self._trees[step.device]
        elif isinstance(step, RemoveRedirect):
            self._remove_redirect(step.interface)
        elif isinstance(step, LoadNftTable):
            self._nft_usable()
            if "refuse" in step.body:
                raise NftError("Error: syntax error, unexpected refuse")
            self._nft_body = step.body
            self._nft_generation += 1
        elif isinstance(step, DeleteNftTable):
            self._nft_usable()
            self._nft_body = None

    def agent_objects(self) -> AgentObjects:
        redirects = {i for i, hook in self._ingress.items() if hook.redirect_to is not None}
        return AgentObjects(frozenset(self._trees), frozenset(redirects), frozenset(self._ifbs))

    def close(self) -> None:
        self.closed = True

    # --- what a test does behind the agent's back ---

    def add_interface(self, name: str) -> None:
        self.interfaces.add(name)

    def delete_interface(self, name: str) -> None:
        """The interface goes, and with it its tree and its ingress hook (not its IFB)."""
        self.interfaces.discard(name)
        self._trees.pop(name, None)
        self._foreign.pop(name, None)
        self._ingress.pop(name, None)

    def add_foreign_root(self, device: str, kind: str = "tbf", major: int = 5) -> None:
        """Someone else's root qdisc on `device` (`<kind> <major>:`)."""
        self._device(device)
        self._trees.pop(device, None)
        self._foreign[device] = (kind, major << 16)

    def delete_class(self, device: str, minor: int) -> None:
        tree = self._trees[device]
        for pref in [p for p, f in tree.filters.items() if f.flow_minor == minor]:
            del tree.filters[pref]
        tree.leaves.pop(minor, None)
        del tree.classes[minor]

    def delete_filter(self, device: str, pref: int) -> None:
        del self._trees[device].filters[pref]

    def add_foreign_ingress_filter(self, interface: str) -> None:
        hook = self._ingress.setdefault(interface, _Ingress())
        hook.qdisc = hook.qdisc or "ingress"
        hook.foreign_filters += 1

    def change_nft_table(self) -> None:
        """Someone reloads the agent's table (same rules, new handles) or deletes it."""
        self._nft_generation += 1

    def delete_nft_table(self) -> None:
        self._nft_body = None

    def fail_requests(self, decide: Callable[[Change], int | None] | None) -> None:
        """From now on a tree change for which `decide` returns an errno fails with it
        (None: succeeds); `fail_requests(None)` stops."""
        self._fail = decide

    def count(self, device: str, minor: int, *, bytes_: int, packets: int, drops: int = 0) -> None:
        """Traffic through class `minor` on `device`, added to its counters."""
        old = self._counters.get((device, minor), ClassStats(minor, 0, 0, 0, 0, 0, None))
        self._counters[(device, minor)] = dataclasses.replace(
            old, bytes=old.bytes + bytes_, packets=old.packets + packets, drops=old.drops + drops
        )

    def foreign_root(self, device: str) -> tuple[str, int] | None:
        """(kind, handle) of someone else's root qdisc on `device`; None if none."""
        return self._foreign.get(device)

    def tree(self, device: str) -> HtbTree | None:
        """The agent's tree on `device`, whatever else is there."""
        tree = self._trees.get(device)
        return None if tree is None else tree.read(device, 0xFA)

    def dump(self) -> str:
        """Everything the agent could have changed, for before/after comparisons."""
        trees = {device: self.tree(device) for device in sorted(self._trees)}
        return repr((trees, self._foreign, self._ingress, self._ifbs, self._nft_body))

    # --- the kernel's rules ---

    def _device(self, device: str) -> None:
        if not self.interface_exists(device):
            raise TcError(f"{device}: no such device")

    def _nft_usable(self) -> None:
        if not self.nft_available:
            raise NftError("cannot load libnftables.so.1: No such file or directory")

    def _apply_tree(self, step: TreeChanges) -> None:
        device = step.device
        self._device(device)
        tree, foreign = self._trees.get(device), self._foreign.get(device)
        saved = (
            None
            if tree is None
            else _Tree(
                tree.default_minor, dict(tree.classes), dict(tree.leaves), dict(tree.filters)
            )
        )
        try:
            for change in sorted(step.changes, key=lambda c: c.phase):
                self._change(device, change)
        except _RequestFailed as failed:
            # As the netlink kernel does: back to the tree the changes were planned from.
            self._trees.pop(device, None)
            if saved is not None:
                self._trees[device] = saved
            if foreign is not None:
                self._foreign[device] = foreign
            raise TcApplyError(failed.change, failed.code, os.strerror(failed.code)) from None

    def _change(self, device: str, change: Change) -> None:
        code = self._fail(change) if self._fail is not None else None
        if code is not None:
            raise _RequestFailed(change, code)
        subject, action = change.subject, change.action
        if isinstance(subject, HtbTree):
            if action is Action.DELETE:
                self._trees.pop(device, None)
            elif action is Action.ADD:
                # `replace` also swaps out a foreign root the caller chose to take over.
                self._foreign.pop(device, None)
                self._trees[device] = _Tree(subject.default_minor)
            else:
                self._tree(device, change).default_minor = subject.default_minor
            return
        tree = self._tree(device, change)
        if isinstance(subject, HtbClass):
            self._put(tree.classes, subject.minor, dataclasses.replace(subject, name=""), change)
            if action is Action.DELETE:
                tree.leaves.pop(subject.minor, None)
        elif isinstance(subject, LeafQdisc):
            if action is not Action.DELETE and subject.class_minor not in tree.classes:
                raise _RequestFailed(change, errno.ENOENT)
            # Leaf qdiscs are grafted with `replace`: adding over one is no error.
            if action is Action.DELETE:
                self._put(tree.leaves, subject.class_minor, subject, change)
            else:
                tree.leaves[subject.class_minor] = subject
        elif isinstance(subject, U32Filter):
            if action is not Action.DELETE and subject.flow_minor not in tree.classes:
                raise _RequestFailed(change, errno.ENOENT)
            if action is Action.CHANGE:
                tree.filters[subject.pref] = subject
            else:
                self._put(tree.filters, subject.pref, subject, change)

    def _tree(self, device: str, change: Change) -> _Tree:
        tree = self._trees.get(device)
        if tree is None:
            raise _RequestFailed(change, errno.EINVAL)
        return tree

    @staticmethod
    def _put(table: dict[int, T], key: int, value: T, change: Change) -> None:
        """Add, change or delete one object as netlink would: adding what exists is
        EEXIST, changing or deleting what does not is ENOENT."""
        present = key in table
        if change.action is Action.ADD:
            if present:
                raise _RequestFailed(change, errno.EEXIST)
            table[key] = value
        elif change.action is Action.CHANGE:
            if not present:
                raise _RequestFailed(change, errno.ENOENT)
            table[key] = value
        else:
            if not present:
                raise _RequestFailed(change, errno.ENOENT)
            del table[key]

    def _ensure_redirect(self, interface: str) -> None:
        self._device(interface)
        hook = self._ingress.setdefault(interface, _Ingress())
        if hook.qdisc not in (None, "ingress", "clsact"):
            raise TcError(f"{interface}: qdisc {hook.qdisc} holds ffff:, not ingress or clsact")
        if hook.foreign_filters:
            raise IngressConflict(interface, str(hook.qdisc), hook.foreign_filters)
        ifb = ifb_name(interface)
        self._ifbs[ifb] = True
        hook.qdisc = hook.qdisc or "ingress"
        hook.redirect_to = ifb

    def _remove_redirect(self, interface: str) -> None:
        hook = self._ingress.get(interface)
        if hook is not None:
            hook.redirect_to = None
            if hook.qdisc == "ingress" and not hook.foreign_filters:
                del self._ingress[interface]
        ifb = ifb_name(interface)
        if self._ifbs.pop(ifb, None) is not None:
            self._trees.pop(ifb, None)
