"""From the desired QoS state to the body of the agent's nftables table.

The table does two things the u32 filters of `desired.py` cannot:

- classify by cgroup v2 or firewall mark: `meta priority set fa:<minor>` (HTB takes the
  class whose handle equals skb->priority before it consults its filters);
- remark DSCP for classes with `dscp: N` (`ip dscp set N`, `ip6 dscp set N`).

Layout, per egress policy (ingress policies are shaped on an IFB device after the packet
arrived: nothing here applies to them, they are skipped):

    chain output  { type filter hook output priority mangle; oifname "eth0" jump local-P }
    chain forward { type filter hook forward priority mangle; oifname "eth0" jump routed-P }
    chain local-P  { <entry> meta priority set fa:10 ip dscp set 26 return ... }
    chain routed-P { the same without cgroup entries }

- `output` sees locally generated traffic; `socket cgroupv2` is only valid there (and
  in prerouting/input). `forward` sees traffic the host routes, e.g. pods in their own
  network namespace behind a veth: a cgroup never matches it (no local socket), marks,
  addresses and ports do, and it needs remarking as much as local traffic. Not
  `postrouting`: local packets pass it too, after `output`, and a later class's rule
  there would overwrite what `output` decided.
- First matching class wins, as with the u32 filter prefs: a policy's rules follow class
  order and each ends in `return`, which leaves the policy chain (the base chain then ends
  on its policy, accept) so no later rule can overwrite skb->priority or the DSCP.
  Because nft runs before u32 and skb->priority beats u32, a packet matching an
  address/port entry of an earlier class and a cgroup entry of a later one must be
  claimed in nft for the earlier class: every class up to the last one nft has to handle
  is rendered with all its entries (classes after it are left to u32 alone).
- A rule that touches an IPv4/IPv6 header field starts with `meta nfproto`: nft would
  otherwise insert that dependency right before `ip dscp set`, after the priority was
  already set, and an IPv6 packet would fall through to later rules.
- A default class with `dscp` also gets a catch-all at the end of its chains (its
  traffic is whatever no class matched).

cgroup paths: nft resolves `socket cgroupv2 level N "path"` under /sys/fs/cgroup when the
table is loaded, so a cgroup2 mount elsewhere below it (/sys/fs/cgroup/unified on hybrid
hosts) is reached through a path relative to /sys/fs/cgroup, while `level` counts the
components below the cgroup2 root. A cgroup missing at load time makes nft refuse the
whole table: entries whose cgroup is not there when the table is rendered are left out
(`missing_cgroups` names them; a service's cgroup goes whenever the service stops), and
come back in the table rendered once the cgroup is there again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from agent.common.errors import FabricError
from agent.common.policy.model import EffectiveClass, Match, QosPolicy, cgroup_exists
from agent.common.policy.units import PortRange
from agent.node.qos.htb import AGENT_ROOT_MAJOR

TABLE_FAMILY = "inet"
TABLE_NAME = "fabric_agent"
# nft looks cgroup v2 paths up below this directory (SYSFS_CGROUPSV2_PATH in nftables).
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")

_FAMILIES = {4: ("ipv4", "ip"), 6: ("ipv6", "ip6")}
_ICMP = {4: "icmp", 6: "ipv6-icmp"}


class NftRenderError(FabricError):
    """The desired state cannot be written as nft rules; the message says which field."""


def render_table(
    policies: Sequence[tuple[QosPolicy, Mapping[str, int]]],
    *,
    cgroup_root: Path,
    nft_cgroup_base: Path = NFT_CGROUP_BASE,
    root_major: int = AGENT_ROOT_MAJOR,
    cgroup_present: Callable[[str], bool] = lambda cgroup: True,
) -> str:
    """The body of `table inet fabric_agent` for these policies and their class minors
    (`DesiredTree.minors`), for `Nftables.replace_table(TABLE_FAMILY, TABLE_NAME, body)`.

    Deterministic (policies in name order); empty when nothing needs nftables, which
    loads as an empty table. Raises NftRenderError for what nft cannot express.
    Entries whose cgroup `cgroup_present` says is not there are left out.
    """
    hooks: dict[str, list[str]] = {"output": [], "forward": []}
    chains: list[str] = []
    for policy, minors in sorted(policies, key=lambda item: item[0].metadata.name):
        if policy.spec.direction != "egress":
            continue
        renderer = _PolicyRenderer(
            policy, minors, cgroup_root, nft_cgroup_base, root_major, cgroup_present
        )
        for hook, prefix, local in (("output", "local", True), ("forward", "routed", False)):
            rules = renderer.rules(local=local)
            if not rules:
                continue
            chain = f"{prefix}-{policy.metadata.name}"
            interface = _quote(
                policy.spec.interface, f"policy {policy.metadata.name!r}: spec.interface"
            )
            hooks[hook].append(f"oifname {interface} jump {chain}")
            chains.append(_chain(chain, None, rules))
    base = [
        _chain(hook, f"type filter hook {hook} priority mangle; policy accept;", jumps)
        for hook, jumps in hooks.items()
        if jumps
    ]
    return "\n".join(base + chains)


def missing_cgroups(policy: QosPolicy, cgroup_root: Path) -> list[tuple[str, str]]:
    """The (class, cgroup) of the policy's cgroup matches whose cgroup is not under
    `cgroup_root` now: the rules `render_table` leaves out."""
    if policy.spec.direction != "egress":
        return []
    return [
        (cls.name, str(entry.cgroup))
        for cls in policy.spec.classes
        for entry in cls.match
        if entry.cgroup is not None and not cgroup_exists(cgroup_root, entry.cgroup)
    ]


def _chain(name: str, header: str | None, rules: Sequence[str]) -> str:
    lines = [f"chain {name} {{"]
    if header is not None:
        lines.append(f"  {header}")
    lines.extend(f"  {rule}" for rule in rules)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(value: str, field: str) -> str:
    if '"' in value or "\n" in value:
        raise NftRenderError(f"{field}: {value!r} cannot be quoted for nft")
    return f'"{value}"'


class _PolicyRenderer:
    def __init__(
        self,
        policy: QosPolicy,
        minors: Mapping[str, int],
        cgroup_root: Path,
        nft_cgroup_base: Path,
        root_major: int,
        cgroup_present: Callable[[str], bool],
    ) -> None:
        # Entries whose cgroup is not there would make nft refuse the whole table.
        self._classes = tuple(
            replace(
                c,
                match=tuple(m for m in c.match if m.cgroup is None or cgroup_present(m.cgroup)),
            )
            for c in policy.effective_classes()
        )
        self._minors = minors
        self._cgroup_root = cgroup_root
        self._nft_cgroup_base = nft_cgroup_base
        self._root_major = root_major
        self._name = policy.metadata.name
        missing = [c.name for c in self._classes if c.name not in minors]
        if missing:
            raise NftRenderError(f"policy {self._name!r}: no minor for class {missing[0]!r}")

    def rules(self, *, local: bool) -> list[str]:
        """The rules of the policy chain for local (`output`) or routed (`forward`) traffic;
        empty when u32 classifies everything this chain would see."""
        default = next(c for c in self._classes if c.is_default)
        catch_all = default.dscp is not None
        needed = [i for i, c in enumerate(self._classes) if self._needs_nft(c, local=local)]
        if not needed and not catch_all:
            return []
        last = len(self._classes) - 1 if catch_all else needed[-1]
        rules: list[str] = []
        for i, cls in enumerate(self._classes[: last + 1]):
            for j, entry in enumerate(cls.match):
                if entry.cgroup is not None and not local:
                    continue  # forwarded packets have no local socket
                where = f"spec.classes[{i}].match[{j}]"
                rules.extend(self._entry_rules(cls, entry, where))
        if catch_all:
            rules.extend(self._family_rules(default, [], (4, 6)))
        return rules

    @staticmethod
    def _needs_nft(cls: EffectiveClass, *, local: bool) -> bool:
        if cls.dscp is not None and cls.match:
            return True
        return any(e.fwmark is not None or (local and e.cgroup is not None) for e in cls.match)

    def _entry_rules(self, cls: EffectiveClass, entry: Match, where: str) -> list[str]:
        common = []  # family-independent matches, placed after the family's own
        if entry.protocol in ("tcp", "udp") and entry.src_ports is None and entry.dst_ports is None:
            common.append(f"meta l4proto {entry.protocol}")
        header = entry.protocol if entry.protocol in ("tcp", "udp") else "th"
        for key, ports in (("sport", entry.src_ports), ("dport", entry.dst_ports)):
            if ports is not None:
                common.append(f"{header} {key} {_ports(ports)}")
        if entry.cgroup is not None:
            common.append(self._cgroup(entry.cgroup, f"{where}.cgroup"))
        if entry.fwmark is not None:
            mark = entry.fwmark
            if mark.mask == 0xFFFFFFFF:
                common.append(f"meta mark 0x{mark.value:08x}")
            else:
                common.append(f"meta mark & 0x{mark.mask:08x} == 0x{mark.value:08x}")
        versions = tuple(
            v
            for v in (4, 6)
            if all(c is None or c.version == v for c in (entry.src_cidr, entry.dst_cidr))
        )
        family_specific = (
            cls.dscp is not None
            or entry.dscp is not None
            or entry.protocol == "icmp"
            or entry.src_cidr is not None
            or entry.dst_cidr is not None
        )
        if not family_specific:
            return [self._rule([*common], cls, None)]
        return self._family_rules(cls, common, versions, entry)

    def _family_rules(
        self,
        cls: EffectiveClass,
        common: list[str],
        versions: Sequence[int],
        entry: Match | None = None,
    ) -> list[str]:
        rules = []
        for version in versions:
            nfproto, ip = _FAMILIES[version]
            own = [f"meta nfproto {nfproto}"]
            if entry is not None:
                for key, cidr in (("saddr", entry.src_cidr), ("daddr", entry.dst_cidr)):
                    if cidr is not None:
                        own.append(f"{ip} {key} {_network(cidr)}")
                if entry.protocol == "icmp":
                    own.append(f"meta l4proto {_ICMP[version]}")
                if entry.dscp is not None:
                    own.append(f"{ip} dscp {entry.dscp}")
            rules.append(self._rule([*own, *common], cls, ip))
        return rules

    def _rule(self, matches: list[str], cls: EffectiveClass, ip: str | None) -> str:
        """`matches`, then the class's statements; `ip` is the header the rule's family
        remarks (None: a rule for both families, only on classes without dscp)."""
        statements = [f"meta priority set {self._root_major:x}:{self._minors[cls.name]:x}"]
        if cls.dscp is not None and ip is not None:
            statements.append(f"{ip} dscp set {cls.dscp}")
        return " ".join([*matches, *statements, "return"])

    def _cgroup(self, cgroup: str, field: str) -> str:
        directory = self._cgroup_root / cgroup
        try:
            path = directory.relative_to(self._nft_cgroup_base)
        except ValueError:
            raise NftRenderError(
                f"policy {self._name!r}: {field}: the cgroup2 mount {self._cgroup_root} is "
                f"not below {self._nft_cgroup_base}, where nft looks cgroups up"
            ) from None
        level = len(Path(cgroup).parts)
        return (
            f"socket cgroupv2 level {level} {_quote(str(path), f'policy {self._name!r}: {field}')}"
        )


def _ports(ports: Sequence[PortRange]) -> str:
    rendered = [str(p) for p in ports]
    return rendered[0] if len(rendered) == 1 else "{ " + ", ".join(rendered) + " }"


def _network(network: IPv4Network | IPv6Network) -> str:
    return str(network)
