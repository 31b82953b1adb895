"""What one policy document may be and expand to, and the counting behind it.

Every way a document comes in (a policy file, fabricctl, a request to the agent or the
aggregator) is held to these limits by the model's one parse, so that what validation
accepts the kernel can hold, and what it refuses costs little to refuse:

- the document: at most `MAX_DOCUMENT_BYTES`, nested at most `MAX_DEPTH` levels, at
  most `MAX_VALUES` values once YAML aliases are expanded; a file at most
  `MAX_DOCUMENTS` documents;
- a rate: at most `MAX_RATE_BPS`;
- an interface name, and the IFB device an ingress policy derives from it: at most
  `MAX_IFNAME_BYTES` bytes of UTF-8, as the kernel counts them;
- the u32 filters a policy's match entries expand to: `u32_filters_of` counts them from
  the model, and the node's expansion (agent.node.qos.desired, agent.node.qos.tc) is
  built from the same parts (`u32_families`, `port_blocks`), so the two agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.common.policy.model import Match

# A policy is a few kilobytes; a megabyte is far beyond any real one and small enough to
# read, parse and refuse in about a second.
MAX_DOCUMENT_BYTES = 1 << 20
# The deepest field of a policy (spec.classes[i].match[j].dstPorts[k]) is 8 levels down.
MAX_DEPTH = 32
# Values (mappings, lists, scalars and mapping keys) in a document, YAML aliases expanded: a
# 64-class policy with 1,024 ports and hundreds of cgroup matches holds a few thousand.
# Parsing is what a hostile file costs, about 40 us a value in PyYAML: 20,000 keeps its
# refusal near a second.
MAX_VALUES = 20_000
# Documents in one file (`---` separated): a file holds a few policies, one for each
# interface and direction it covers. A megabyte of empty documents is 140,000 of them,
# 8 s to refuse one by one with a violation each (a 6 MB reason in the log and in
# ListPolicies); past this the file is refused as soon as the count is passed.
MAX_DOCUMENTS = 256
# HTB keeps rates as 64-bit bytes per second (TCA_HTB_RATE64), which carries far more;
# 10 Tbit/s is beyond any NIC a node has, so a larger rate is a typo or an attack.
MAX_RATE_BPS = 10 * 10**12
# IFNAMSIZ is 16 bytes including the terminating NUL.
MAX_IFNAME_BYTES = 15
# The kernel walks a root's u32 filters one by one for every packet and each pass reads
# them back: 256 per class covers a class matching dozens of port ranges; 1,024 per
# policy are read back in about 0.4 s (10,240 took 2.6 s, more than a 1 s interval).
# A policy has at most as many prefs as filters: from
# agent.node.qos.desired.FIRST_FILTER_PREF (100) to 1,124, within the kernel's 16-bit
# priorities and below the 2,047 u32 hash tables it gives one qdisc (one a pref: the
# 2,048th pref is refused with EEXIST).
MAX_U32_FILTERS_PER_CLASS = 256
MAX_U32_FILTERS_PER_POLICY = 1024

IFB_PREFIX = "ifb-"
_IFB_HASH_CHARS = 6


def ifname_bytes(name: str) -> int:
    """The length of an interface name as the kernel counts it."""
    return len(name.encode("utf-8", errors="surrogatepass"))


def ifb_name(interface: str) -> str:
    """The IFB device for `interface`: "ifb-" + the name, or, where that exceeds the
    kernel's 15 bytes, "ifb-" + its first 5 bytes (whole characters only) + 6 hex digits
    of its hash (deterministic, so every agent run finds the same device)."""
    name = IFB_PREFIX + interface
    if ifname_bytes(name) <= MAX_IFNAME_BYTES:
        return name
    encoded = interface.encode("utf-8", errors="surrogatepass")
    digest = hashlib.blake2s(encoded, digest_size=_IFB_HASH_CHARS // 2).hexdigest()
    room = MAX_IFNAME_BYTES - len(IFB_PREFIX) - _IFB_HASH_CHARS
    head = encoded[:room].decode("utf-8", errors="ignore")
    return f"{IFB_PREFIX}{head}{digest}"


def format_bytes(size: int) -> str:
    """A size in the largest binary unit that keeps it exact: 1 MiB, 1536 KiB, 7 bytes."""
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


# --- u32 expansion ---------------------------------------------------------------------


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """Split [first, last] into maximal aligned power-of-two blocks, as (value, 16-bit mask):
    what u32 can match, one kernel filter per block.

    1000-1999 -> 1000/fff8, 1008/fff0, 1024/fe00, ..., 1984/fff0; every port in the range
    is in exactly one block and none outside it.
    """
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"port range {first}-{last} is not within 0-65535")
    blocks: list[tuple[int, int]] = []
    start = first
    while start <= last:
        # The largest block aligned at `start` (its low bits) that still fits in the range.
        size = start & -start if start else 0x10000
        while start + size - 1 > last:
            size //= 2
        blocks.append((start, 0xFFFF & ~(size - 1)))
        start += size
    return blocks


def u32_families(entry: Match) -> tuple[str, ...]:
    """The address families ("ip", "ipv6") a match entry's u32 filters cover: those its
    CIDRs allow; none when it needs nftables (a cgroup or a mark)."""
    if entry.cgroup is not None or entry.fwmark is not None:
        return ()
    return tuple(
        family
        for family, version in (("ip", 4), ("ipv6", 6))
        if all(cidr is None or cidr.version == version for cidr in (entry.src_cidr, entry.dst_cidr))
    )


@dataclass(frozen=True)
class U32Count:
    """What match entries expand to: filter prefs (one per family, source and destination
    port range) and kernel filters (one per pref and aligned port block)."""

    prefs: int = 0
    filters: int = 0

    def __add__(self, other: U32Count) -> U32Count:
        return U32Count(self.prefs + other.prefs, self.filters + other.filters)


def u32_filters_of(entries: Iterable[Match]) -> U32Count:
    """The u32 prefs and kernel filters `entries` expand to, counted without building them."""
    total = U32Count()
    for entry in entries:
        families = len(u32_families(entry))
        if not families:
            continue
        src = entry.src_ports or ()
        dst = entry.dst_ports or ()
        src_blocks = sum(len(port_blocks(p.first, p.last)) for p in src) if src else 1
        dst_blocks = sum(len(port_blocks(p.first, p.last)) for p in dst) if dst else 1
        prefs = families * max(len(src), 1) * max(len(dst), 1)
        total += U32Count(prefs, families * src_blocks * dst_blocks)
    return total
