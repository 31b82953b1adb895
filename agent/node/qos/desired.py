"""From a policy to the HTB tree the agent wants on its interface.

Class minors are stable: a class keeps the minor it had (the caller passes the last
applied allocation), new classes take the lowest free minor from `FIRST_LEAF_MINOR`, so
adding or removing one class never renumbers the others and the planner changes only
that class. The root class `fa:1` carries the policy's whole bandwidth; every policy
class is a leaf under it.

Address, port, protocol and DSCP matches become u32 filters on the root qdisc, in policy
order (the first matching filter wins, as the first matching class should). Matches on
a cgroup or a firewall mark cannot be expressed in u32; they are classified by the
agent's nftables table (`meta priority set`), which HTB honours before its filters.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from agent.common.policy.model import EffectiveClass, Match, QosPolicy
from agent.common.policy.units import PortRange
from agent.node.qos.htb import AGENT_ROOT_MAJOR, HtbClass, HtbTree, U32Filter, U32Match

ROOT_MINOR = 1
FIRST_LEAF_MINOR = 0x10
# Filter prefs start here and go up in policy order, one per generated filter.
FIRST_FILTER_PREF = 100

_IP_PROTOCOLS = {"tcp": 6, "udp": 17}
_ICMP = {"ip": 1, "ipv6": 58}


@dataclass(frozen=True)
class DesiredTree:
    """The tree for one policy, and which minor each class got."""

    policy: str
    tree: HtbTree
    minors: Mapping[str, int]


def allocate_minors(names: Sequence[str], previous: Mapping[str, int]) -> dict[str, int]:
    """Keep each known class's minor; give new classes the lowest free ones."""
    kept = {name: previous[name] for name in names if name in previous}
    used = set(kept.values())
    free = (m for m in itertools.count(FIRST_LEAF_MINOR) if m not in used)
    return {name: kept[name] if name in kept else next(free) for name in names}


def build_tree(
    policy: QosPolicy,
    *,
    device: str | None = None,
    leaf_kind: str = "pfifo",
    previous_minors: Mapping[str, int] | None = None,
) -> DesiredTree:
    """The tree for `policy` on `device` (its interface unless given: ingress policies
    are shaped on an IFB device)."""
    spec = policy.spec
    classes = spec.effective_classes()
    minors = allocate_minors([c.name for c in classes], previous_minors or {})
    bandwidth = _whole_bytes(spec.bandwidth_bps)
    htb_classes = [
        HtbClass.with_rate(ROOT_MINOR, None, bandwidth, bandwidth, 0, name=policy.metadata.name)
    ]
    for cls in classes:
        htb_classes.append(
            HtbClass.with_rate(
                minors[cls.name],
                ROOT_MINOR,
                _whole_bytes(cls.rate_bps),
                _whole_bytes(cls.ceil_bps),
                cls.priority,
                name=cls.name,
            )
        )
    default = next(c for c in classes if c.is_default)
    tree = HtbTree(
        device=device or spec.interface,
        root_major=AGENT_ROOT_MAJOR,
        default_minor=minors[default.name],
        classes=tuple(htb_classes),
        filters=tuple(u32_filters(classes, minors)),
        leaf_kind=leaf_kind,
    )
    return DesiredTree(policy.metadata.name, tree, minors)


def u32_filters(classes: Sequence[EffectiveClass], minors: Mapping[str, int]) -> list[U32Filter]:
    """One filter per (class, match entry, address family, source port range, destination
    port range), in policy order; entries that need nftables produce none."""
    filters: list[U32Filter] = []
    prefs = itertools.count(FIRST_FILTER_PREF)
    for cls in classes:
        for entry in cls.match:
            for match in u32_matches(entry):
                filters.append(U32Filter(next(prefs), minors[cls.name], match))
    return filters


def u32_matches(entry: Match) -> list[U32Match]:
    """The u32 matches for one policy match entry (empty when it needs nftables)."""
    if entry.cgroup is not None or entry.fwmark is not None:
        return []
    families = [
        family
        for family, version in (("ip", 4), ("ipv6", 6))
        if all(cidr is None or cidr.version == version for cidr in (entry.src_cidr, entry.dst_cidr))
    ]
    sports: Sequence[PortRange | None] = list(entry.src_ports or ()) or [None]
    dports: Sequence[PortRange | None] = list(entry.dst_ports or ()) or [None]
    matches = []
    for family in families:
        ip_proto = _ICMP[family] if entry.protocol == "icmp" else None
        if entry.protocol in _IP_PROTOCOLS:
            ip_proto = _IP_PROTOCOLS[entry.protocol]
        for sport, dport in itertools.product(sports, dports):
            matches.append(
                U32Match(
                    protocol=family,
                    src=_cidr(entry.src_cidr),
                    dst=_cidr(entry.dst_cidr),
                    ip_proto=ip_proto,
                    sport=sport,
                    dport=dport,
                    dscp=entry.dscp,
                )
            )
    return matches


def _cidr(network: IPv4Network | IPv6Network | None) -> str | None:
    return None if network is None else str(network)


def _whole_bytes(rate_bps: int) -> int:
    """The kernel keeps HTB rates in bytes per second: round down to a multiple of 8 so
    what is read back equals what was asked for."""
    return max(8, rate_bps - rate_bps % 8)
