"""From the policies to enforce to the kernel objects the agent wants: pure functions
that every way in (the daemon's pass, `fabric-agent policy plan`, the API's dry runs)
goes through.

Per policy (`desired_state`): the HTB tree on its interface (ingress policies: on the
interface's IFB device, with the redirect to it); for the policies enforced together
(`nft_body`): the body of the agent's nftables table.

Class minors are stable: a class keeps the minor it had (the caller passes the last
applied allocation), new classes take the lowest free minor from `FIRST_LEAF_MINOR`, so
adding or removing one class never renumbers the others and the planner changes only
that class. The root class `fa:1` carries the policy's whole bandwidth; every policy
class is a leaf under it.

Address, port, protocol and DSCP matches become u32 filters on the root qdisc, in policy
order (the first matching filter wins, as the first matching class should), then a
catch-all filter per address family to the default class (`CATCH_ALL_PREFS`). Matches on
a cgroup or a firewall mark cannot be expressed in u32; they are classified by the
agent's nftables table (`meta priority set`), which HTB honours before its filters.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from agent.common.policy.limits import (
    MAX_U32_FILTERS_PER_CLASS,
    MAX_U32_FILTERS_PER_POLICY,
    U32Count,
    u32_families,
    u32_filters_of,
)
from agent.common.policy.model import (
    EffectiveClass,
    LoadedPolicy,
    Match,
    QosPolicy,
    cgroup_exists,
)
from agent.common.policy.units import PortRange
from agent.node.qos import nftrules
from agent.node.qos.htb import AGENT_ROOT_MAJOR, HtbClass, HtbTree, U32Filter, U32Match
from agent.node.qos.kernel import ifb_name

ROOT_MINOR = 1
FIRST_LEAF_MINOR = 0x10
# Filter prefs start here and go up in policy order, one per generated filter.
FIRST_FILTER_PREF = 100
# The catch-all filters to the default class, after every other (one per family: a pref
# holds one protocol). HTB cannot change a qdisc's `default`, so the qdisc keeps the one
# it was created with and these carry the policy's defaultClass: changing it is one
# filter change, with no moment unshaped. The qdisc's default is left for non-IP frames.
CATCH_ALL_PREFS = {"ip": 0xFFFE, "ipv6": 0xFFFF}

_IP_PROTOCOLS = {"tcp": 6, "udp": 17}
_ICMP = {"ip": 1, "ipv6": 58}


@dataclass(frozen=True)
class DesiredTree:
    """The tree for one policy, and which minor each class got."""

    policy: str
    tree: HtbTree
    minors: Mapping[str, int]


@dataclass(frozen=True)
class DesiredPolicy:
    """What one policy needs in the kernel, and what the agent records once it is there."""

    policy: QosPolicy
    # Where it came from: a file's path, or agent.node.qos.api_objects.API_SOURCE.
    file: str
    # The device its tree lives on: the interface, or its IFB device for ingress.
    device: str
    tree: HtbTree
    minors: Mapping[str, int]
    # The policy as enforced (assignments merged in) and as its source gave it, when
    # assignments changed it (None: the same).
    document: Mapping[str, Any]
    base: Mapping[str, Any] | None
    take_over: bool

    @property
    def name(self) -> str:
        return self.policy.metadata.name

    @property
    def interface(self) -> str:
        return self.policy.spec.interface

    @property
    def direction(self) -> str:
        return self.policy.spec.direction


@dataclass(frozen=True)
class DesiredState:
    """Every policy's kernel objects, and why a policy could not be built."""

    policies: tuple[DesiredPolicy, ...]
    errors: Mapping[str, str]
    # Policies with cgroup matches whose cgroup is not there: which ones they wait for
    # (their nftables rules are left out until the cgroup appears).
    waiting: Mapping[str, str] = field(default_factory=dict)

    def policy(self, name: str) -> DesiredPolicy | None:
        return next((p for p in self.policies if p.name == name), None)


@dataclass(frozen=True)
class KernelOptions:
    """How policies become kernel objects on this node."""

    # The leaf qdisc under every class (fq_codel where the kernel has it).
    leaf_kind: str = "pfifo"
    # The cgroup2 mount that policies' cgroup paths are relative to.
    cgroup_root: Path = nftrules.NFT_CGROUP_BASE
    # Where nft looks cgroup paths up (the cgroup2 mount or a directory above it).
    nft_cgroup_base: Path = nftrules.NFT_CGROUP_BASE
    # Replace root qdiscs the agent does not own, whatever the policies say.
    take_over: bool = False


def policy_device(policy: QosPolicy) -> str:
    """The device a policy's tree lives on: its interface, or for ingress its IFB. Two
    policies own the same device or none: the unit of ownership is the device."""
    spec = policy.spec
    return ifb_name(spec.interface) if spec.direction == "ingress" else spec.interface


def owner_text(owner: LoadedPolicy, source: str) -> str:
    """`owner`'s claim on its device, for the one refused: "eth0 egress is owned by
    policy 'node' from file /etc/...", naming the IFB where that is the device."""
    spec = owner.policy.spec
    claim = f"{spec.interface} {spec.direction}"
    if spec.direction == "ingress":
        claim = f"{policy_device(owner.policy)} (the IFB of {spec.interface} ingress)"
    return f"{claim} is owned by policy {owner.policy.metadata.name!r} from {source}"


def desired_state(
    policies: Sequence[LoadedPolicy],
    *,
    previous_minors: Mapping[str, Mapping[str, int]],
    bases: Mapping[str, Mapping[str, Any]],
    options: KernelOptions,
) -> DesiredState:
    """The kernel objects `policies` need. `previous_minors` keeps each class on the minor
    it had (by policy, then class name); `bases` are the documents of policies that
    assignments changed, as their source gave them. Pure: reads nothing.

    A policy that cannot be built is left out with its reason in `errors`; the others
    are not affected."""
    built: list[DesiredPolicy] = []
    errors: dict[str, str] = {}
    waiting: dict[str, str] = {}
    for loaded in policies:
        policy = loaded.policy
        name = policy.metadata.name
        spec = policy.spec
        device = policy_device(policy)
        missing = nftrules.missing_cgroups(policy, options.cgroup_root)
        if missing:
            waiting[name] = "waiting for cgroup " + ", ".join(
                f"{cgroup} (class {cls})" for cls, cgroup in missing
            )
        try:
            desired = build_tree(
                policy,
                device=device,
                leaf_kind=options.leaf_kind,
                previous_minors=previous_minors.get(name),
            )
        except ValueError as exc:
            errors[name] = f"cannot be built: {exc}"
            continue
        built.append(
            DesiredPolicy(
                policy=policy,
                file=loaded.file,
                device=device,
                tree=desired.tree,
                minors=desired.minors,
                document=policy.model_dump(mode="json", by_alias=True, exclude_none=True),
                base=bases.get(name),
                take_over=spec.take_over or options.take_over,
            )
        )
    return DesiredState(tuple(built), errors, waiting)


def nft_body(
    policies: Sequence[tuple[QosPolicy, Mapping[str, int]]], options: KernelOptions
) -> str:
    """The body of the agent's nftables table for the policies it enforces, with their
    class minors; raises NftRenderError for what nft cannot express. Reads only whether
    the cgroups it matches are there: those that are not are left out."""
    return nftrules.render_table(
        policies,
        cgroup_root=options.cgroup_root,
        nft_cgroup_base=options.nft_cgroup_base,
        cgroup_present=lambda cgroup: cgroup_exists(options.cgroup_root, cgroup),
    )


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
    filters = u32_filters(classes, minors)
    check_expansion(classes, filters)
    tree = HtbTree(
        device=device or spec.interface,
        root_major=AGENT_ROOT_MAJOR,
        default_minor=minors[default.name],
        classes=tuple(htb_classes),
        filters=(
            *filters,
            *(
                U32Filter(pref, minors[default.name], U32Match(protocol=family))
                for family, pref in CATCH_ALL_PREFS.items()
            ),
        ),
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


def check_expansion(classes: Sequence[EffectiveClass], filters: Sequence[U32Filter]) -> None:
    """ValueError when the classes' filters are past the limits validation holds a policy
    to (an assignment's entries, merged in after it, may take a class there), or are not
    what validation counted."""
    total = U32Count()
    for cls in classes:
        count = u32_filters_of(cls.match)
        if count.filters > MAX_U32_FILTERS_PER_CLASS:
            raise ValueError(
                f"class {cls.name!r} expands to {count.filters} u32 filters; "
                f"at most {MAX_U32_FILTERS_PER_CLASS}"
            )
        total += count
    if total.filters > MAX_U32_FILTERS_PER_POLICY:
        raise ValueError(
            f"the policy expands to {total.filters} u32 filters; "
            f"at most {MAX_U32_FILTERS_PER_POLICY}"
        )
    if total.prefs != len(filters):
        raise ValueError(f"{len(filters)} u32 filters built where validation counted {total.prefs}")


def u32_matches(entry: Match) -> list[U32Match]:
    """The u32 matches for one policy match entry (empty when it needs nftables)."""
    families = u32_families(entry)
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
