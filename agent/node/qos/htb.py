"""The HTB shaping tree as plain data, and the planner that diffs two trees.

No kernel here: `agent.node.qos.tc` reads a tree from the kernel and applies a plan. The tree
the agent owns is one root HTB qdisc `fa:`, a class per bandwidth share (by convention
`fa:1` carries the link and `fa:10`, `fa:11`, ... are the leaves), a leaf qdisc under each
leaf class whose handle major is the class minor (`fa:10` -> `10:`), and u32 filters on
the root that steer packets into leaves.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

# port_blocks: how validation counts the kernel filters a port range takes, too.
from agent.common.policy.limits import port_blocks as port_blocks
from agent.common.policy.units import PortRange, format_bps

AGENT_ROOT_MAJOR = 0xFA
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
# Packets; the leaf pfifo's queue. txqueuelen's usual default.
PFIFO_LIMIT_PACKETS = 1000
MTU_FRAME_BYTES = 1514
# The kernel warns ("quantum is big") above 200000 bytes and below one frame a class
# cannot send a full packet per round.
MAX_QUANTUM_BYTES = 200_000
# rate / r2q, r2q = 10 as tc's default.
_R2Q = 10
LEAF_KINDS = ("pfifo", "fq_codel")


def quantum_for_rate(rate_bps: int) -> int:
    """The DRR quantum for a class of this rate: rate/r2q in bytes, clamped to [MTU, 200000]."""
    return max(MTU_FRAME_BYTES, min(MAX_QUANTUM_BYTES, rate_bps // 8 // _R2Q))


def burst_for_rate(rate_bps: int) -> int:
    """Bytes a class may send at line speed: 1 ms worth of its rate, at least two frames.

    tc's default (rate/HZ + MTU, HZ from /proc/net/psched, 1e9 on modern kernels) comes to
    about one frame, which starves classes above a few Gbit/s."""
    return max(2 * MTU_FRAME_BYTES, rate_bps // 8 // 1000)


def format_handle(major: int, minor: int | None = None) -> str:
    return f"{major:x}:" if minor is None else f"{major:x}:{minor:x}"


def merge_port_blocks(blocks: Iterable[tuple[int, int]]) -> PortRange | None:
    """The inverse of `port_blocks`: the range the blocks cover, or None if not contiguous."""
    spans = sorted((value, value + (~mask & 0xFFFF)) for value, mask in blocks)
    if not spans:
        return None
    first, last = spans[0]
    for start, end in spans[1:]:
        if start != last + 1:
            return None
        last = end
    return PortRange(first, last)


@dataclass(frozen=True)
class U32Match:
    """What a filter matches; fields left None match anything. Ports assume no IPv4
    options or IPv6 extension headers (as tc's `match ip dport` does)."""

    protocol: str = "ip"  # "ip" or "ipv6"
    src: str | None = None  # CIDR
    dst: str | None = None
    ip_proto: int | None = None  # 6 = TCP, 17 = UDP
    sport: PortRange | None = None
    dport: PortRange | None = None
    dscp: int | None = None
    # Key bytes the reader could not attribute to a field, as (offset, value, mask); a
    # filter carrying them never equals a desired one, so the planner replaces it.
    unknown: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in ("ip", "ipv6"):
            raise ValueError(f"protocol {self.protocol!r} is not 'ip' or 'ipv6'")
        version = 4 if self.protocol == "ip" else 6
        for name in ("src", "dst"):
            value = getattr(self, name)
            if value is None:
                continue
            network = ipaddress.ip_network(value, strict=False)
            if network.version != version:
                raise ValueError(f"{name} {value} is not an IPv{version} network")
            object.__setattr__(self, name, str(network))
        if self.ip_proto is not None and not 0 <= self.ip_proto <= 255:
            raise ValueError(f"ip_proto {self.ip_proto} is not within 0-255")
        if self.dscp is not None and not 0 <= self.dscp <= 63:
            raise ValueError(f"dscp {self.dscp} is not within 0-63")

    @property
    def ethertype(self) -> int:
        return ETH_P_IP if self.protocol == "ip" else ETH_P_IPV6

    def __str__(self) -> str:
        parts = [self.protocol]
        for name in ("src", "dst", "ip_proto", "sport", "dport", "dscp"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} {value}")
        if self.unknown:
            parts.append(f"+{len(self.unknown)} unknown key bytes")
        return " ".join(parts)


@dataclass(frozen=True)
class U32Filter:
    """A u32 filter on the root qdisc at priority `pref`, steering matches to `fa:<flow_minor>`.

    Port ranges become several kernel filters (one per aligned block) under the same pref.
    """

    pref: int
    flow_minor: int
    match: U32Match

    def __post_init__(self) -> None:
        if not 1 <= self.pref <= 0xFFFF:
            raise ValueError(f"filter pref {self.pref} is not within 1-65535")

    def __str__(self) -> str:
        return f"filter pref {self.pref} {self.match} -> :{self.flow_minor:x}"


@dataclass(frozen=True)
class HtbClass:
    """One HTB class `<root>:<minor>`; `name` is ours only (the kernel keeps no label, so
    it takes no part in comparisons)."""

    minor: int
    parent_minor: int | None
    rate_bps: int
    ceil_bps: int
    prio: int
    quantum_bytes: int
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.minor <= 0xFFFE:
            raise ValueError(f"class minor {self.minor:#x} is not within 1-0xfffe")
        for label, rate in (("rate", self.rate_bps), ("ceil", self.ceil_bps)):
            # The kernel keeps bytes per second: bit rates that are not whole bytes
            # would read back different and never converge.
            if rate <= 0 or rate % 8:
                raise ValueError(
                    f"class {self.minor:x}: {label} {rate} bit/s must be a positive multiple of 8"
                )
        if self.ceil_bps < self.rate_bps:
            raise ValueError(f"class {self.minor:x}: ceil below rate")
        if not 0 <= self.prio <= 7:
            raise ValueError(f"class {self.minor:x}: prio {self.prio} is not within 0-7")
        if self.quantum_bytes <= 0:
            raise ValueError(f"class {self.minor:x}: quantum must be positive")

    @classmethod
    def with_rate(
        cls,
        minor: int,
        parent_minor: int | None,
        rate_bps: int,
        ceil_bps: int | None = None,
        prio: int = 0,
        name: str = "",
    ) -> HtbClass:
        """A class with the quantum derived from its rate (`quantum_for_rate`)."""
        return cls(
            minor,
            parent_minor,
            rate_bps,
            ceil_bps or rate_bps,
            prio,
            quantum_for_rate(rate_bps),
            name,
        )

    def label(self, root_major: int) -> str:
        handle = format_handle(root_major, self.minor)
        return f'{handle} "{self.name}"' if self.name else handle

    def describe(self) -> str:
        parent = "root" if self.parent_minor is None else f"parent :{self.parent_minor:x}"
        return (
            f"{parent} rate {format_bps(self.rate_bps)} ceil {format_bps(self.ceil_bps)} "
            f"prio {self.prio} quantum {self.quantum_bytes}"
        )


@dataclass(frozen=True, order=True)
class LeafQdisc:
    """The qdisc under leaf class `fa:<class_minor>`; its handle is `<class_minor>:`."""

    class_minor: int
    kind: str

    @property
    def major(self) -> int:
        return self.class_minor


@dataclass(frozen=True)
class HtbTree:
    """The whole tree on one device. `leaf_qdiscs` defaults to one `leaf_kind` qdisc per leaf
    class; trees read from the kernel set it to what is there."""

    device: str
    root_major: int
    default_minor: int
    classes: tuple[HtbClass, ...]
    filters: tuple[U32Filter, ...] = ()
    leaf_kind: str = "pfifo"
    leaf_qdiscs: tuple[LeafQdisc, ...] | None = None
    # False for trees read from the kernel: whatever is there must be representable, even
    # a default class someone deleted by hand.
    strict: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Order is not state: sort so that trees read back compare equal.
        object.__setattr__(self, "classes", tuple(sorted(self.classes, key=lambda c: c.minor)))
        object.__setattr__(self, "filters", tuple(sorted(self.filters, key=lambda f: f.pref)))
        leaves = {c.minor for c in self.classes} - {c.parent_minor for c in self.classes}
        if self.leaf_qdiscs is None:
            if self.leaf_kind not in LEAF_KINDS:
                raise ValueError(f"{self.device}: leaf kind {self.leaf_kind!r} not supported")
            derived = tuple(LeafQdisc(minor, self.leaf_kind) for minor in sorted(leaves))
            object.__setattr__(self, "leaf_qdiscs", derived)
        else:
            object.__setattr__(self, "leaf_qdiscs", tuple(sorted(self.leaf_qdiscs)))
        if self.strict:
            self._validate(leaves)

    def _validate(self, leaves: set[int]) -> None:
        if not 1 <= self.root_major <= 0xFFFE:
            raise ValueError(f"{self.device}: root major {self.root_major:#x} is not valid")
        minors = [c.minor for c in self.classes]
        if len(set(minors)) != len(minors):
            raise ValueError(f"{self.device}: duplicate class minors")
        prefs = [f.pref for f in self.filters]
        if len(set(prefs)) != len(prefs):
            raise ValueError(f"{self.device}: duplicate filter prefs")
        known = set(minors)
        for cls in self.classes:
            if cls.parent_minor is not None and cls.parent_minor not in known:
                raise ValueError(
                    f"{self.device}: class {cls.minor:x} has no parent {cls.parent_minor:x}"
                )
        for cls in self.classes:
            if cls.minor in leaves and cls.minor == self.root_major:
                raise ValueError(
                    f"{self.device}: leaf {cls.minor:x} would take the root's handle for its qdisc"
                )
        if self.classes and self.default_minor not in leaves:
            raise ValueError(
                f"{self.device}: default class {self.default_minor:x} is not a leaf class"
            )
        for flt in self.filters:
            if flt.flow_minor not in leaves:
                raise ValueError(
                    f"{self.device}: filter pref {flt.pref} targets "
                    f"{flt.flow_minor:x}, which is not a leaf class"
                )

    @property
    def leaves(self) -> tuple[LeafQdisc, ...]:
        assert self.leaf_qdiscs is not None  # set by __post_init__
        return self.leaf_qdiscs

    def depth(self, minor: int) -> int:
        parents = {c.minor: c.parent_minor for c in self.classes}
        depth = 0
        parent = parents.get(minor)
        while parent is not None:
            depth += 1
            parent = parents.get(parent)
        return depth


class Action(enum.Enum):
    ADD = "+"
    CHANGE = "~"
    DELETE = "-"


class Phase(enum.IntEnum):
    """Where a change runs in `apply`: removals first (leaves inwards), then additions
    (root outwards)."""

    DELETE_FILTER = 0
    DELETE_LEAF = 1
    DELETE_CLASS = 2
    ROOT = 3
    CLASS = 4
    LEAF = 5
    FILTER = 6


Subject = HtbTree | HtbClass | LeafQdisc | U32Filter


@dataclass(frozen=True)
class Change:
    """One step of a plan. `subject` is the new object (the old one for deletions);
    `before` the old one for changes. For the root qdisc the subject is the tree itself
    (its device, root major and default class)."""

    action: Action
    device: str
    root_major: int
    subject: Subject
    before: Subject | None = None
    # Why a change is a delete-and-add (class parent moved), for __str__ only.
    note: str = field(default="", compare=False)
    # A filter change made with the removals: it moves traffic off a class about to be
    # deleted onto one that stays, before the deletion (no moment without its filter).
    early: bool = field(default=False, compare=False)

    @property
    def phase(self) -> Phase:
        deleting = self.action is Action.DELETE
        if isinstance(self.subject, U32Filter):
            return Phase.DELETE_FILTER if deleting or self.early else Phase.FILTER
        if isinstance(self.subject, LeafQdisc):
            return Phase.DELETE_LEAF if deleting else Phase.LEAF
        if isinstance(self.subject, HtbClass):
            return Phase.DELETE_CLASS if deleting else Phase.CLASS
        return Phase.ROOT

    def __str__(self) -> str:
        sign = self.action.value
        subject, before = self.subject, self.before
        root = format_handle(self.root_major)
        if isinstance(subject, HtbTree):
            text = f"{sign} qdisc {root} htb default {subject.default_minor:x}"
            if isinstance(before, HtbTree):
                text = (
                    f"{sign} qdisc {root} htb default {before.default_minor:x} -> "
                    f"{subject.default_minor:x}"
                )
        elif isinstance(subject, HtbClass):
            label = subject.label(self.root_major)
            if isinstance(before, HtbClass):
                diffs = _class_diffs(before, subject)
                text = f"{sign} class {label} {', '.join(diffs)}"
            else:
                text = f"{sign} class {label} {subject.describe()}"
        elif isinstance(subject, LeafQdisc):
            parent = format_handle(self.root_major, subject.class_minor)
            text = f"{sign} qdisc {format_handle(subject.major)} {subject.kind} parent {parent}"
            if isinstance(before, LeafQdisc):
                text = (
                    f"{sign} qdisc {format_handle(subject.major)} {before.kind} -> "
                    f"{subject.kind} parent {parent}"
                )
        else:
            text = f"{sign} {subject}"
            if isinstance(before, U32Filter):
                text = f"{sign} {before} => {subject.match} -> :{subject.flow_minor:x}"
        return f"{text} ({self.note})" if self.note else text


def _class_diffs(old: HtbClass, new: HtbClass) -> list[str]:
    diffs = []
    for name, fmt in (("rate_bps", format_bps), ("ceil_bps", format_bps)):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            diffs.append(f"{name.removesuffix('_bps')} {fmt(a)} -> {fmt(b)}")
    for name in ("prio", "quantum_bytes"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            diffs.append(f"{name.removesuffix('_bytes')} {a} -> {b}")
    return diffs


def plan(desired: HtbTree, actual: HtbTree | None) -> list[Change]:
    """The changes that turn `actual` (None: the agent has no tree there) into `desired`,
    in the order `apply` runs them. Equal trees give no changes; one class's rate gives one
    class change, never a rebuild. The root qdisc keeps the default class it was created
    with (see the comment below)."""
    if actual is not None and (actual.device, actual.root_major) != (
        desired.device,
        desired.root_major,
    ):
        raise ValueError(
            f"cannot plan {desired.device} {format_handle(desired.root_major)} "
            f"from {actual.device} {format_handle(actual.root_major)}"
        )
    dev, major = desired.device, desired.root_major

    def change(
        action: Action,
        subject: Subject,
        before: Subject | None = None,
        note: str = "",
        early: bool = False,
    ) -> Change:
        return Change(action, dev, major, subject, before, note, early)

    changes: list[Change] = []
    old_classes = {c.minor: c for c in actual.classes} if actual else {}
    new_classes = {c.minor: c for c in desired.classes}
    old_leaves = {q.class_minor: q for q in actual.leaves} if actual else {}
    new_leaves = {q.class_minor: q for q in desired.leaves}
    old_filters = {f.pref: f for f in actual.filters} if actual else {}
    new_filters = {f.pref: f for f in desired.filters}

    # Classes whose parent moved are deleted and added again (HTB cannot re-parent).
    moved = {
        m
        for m, c in new_classes.items()
        if m in old_classes and old_classes[m].parent_minor != c.parent_minor
    }
    gone = (set(old_classes) - set(new_classes)) | moved
    # A filter that stays but leaves a deleted class for one that is there already (the
    # catch-all to a default class that changed) moves first, so its traffic is never
    # left to the qdisc's default, which may be the class deleted.
    retargeted = {
        pref
        for pref, old_filter in old_filters.items()
        if pref in new_filters
        and old_filter.flow_minor in gone
        and new_filters[pref].flow_minor in old_classes
        and new_filters[pref].flow_minor not in gone
    }
    for pref in sorted(retargeted):
        changes.append(change(Action.CHANGE, new_filters[pref], old_filters[pref], early=True))
    # Deleting a class takes its leaf qdisc and needs its filters gone first.
    for pref, stale_filter in sorted(old_filters.items()):
        if pref in retargeted:
            continue
        if pref not in new_filters or stale_filter.flow_minor in gone:
            changes.append(change(Action.DELETE, stale_filter))
    for minor, stale_leaf in sorted(old_leaves.items()):
        if minor not in new_leaves and minor not in gone:
            changes.append(change(Action.DELETE, stale_leaf))
    for minor in sorted(gone, key=lambda m: -(actual.depth(m) if actual else 0)):
        note = "parent changed" if minor in moved else ""
        changes.append(change(Action.DELETE, old_classes[minor], note=note))

    if actual is None:
        changes.append(change(Action.ADD, desired))
    # A different default class is no change: HTB refuses to change a qdisc (EINVAL,
    # "Change operation not supported"), and replacing it would unshape the device for
    # as long as the rebuild takes. The desired tree's catch-all filters (a filter
    # change like any other) carry the default class instead.

    for cls in sorted(desired.classes, key=lambda c: (desired.depth(c.minor), c.minor)):
        old = old_classes.get(cls.minor)
        if old is None or cls.minor in moved:
            changes.append(change(Action.ADD, cls))
        elif old != cls:
            changes.append(change(Action.CHANGE, cls, old))
    for minor, leaf in sorted(new_leaves.items()):
        old_leaf = None if minor in gone else old_leaves.get(minor)
        if old_leaf is None:
            changes.append(change(Action.ADD, leaf))
        elif old_leaf != leaf:
            changes.append(change(Action.CHANGE, leaf, old_leaf))
    for pref, new_filter in sorted(new_filters.items()):
        old_filter = old_filters.get(pref)
        if pref in retargeted:
            continue
        if old_filter is None or old_filter.flow_minor in gone:
            changes.append(change(Action.ADD, new_filter))
        elif old_filter != new_filter:
            changes.append(change(Action.CHANGE, new_filter, old_filter))
    return changes
