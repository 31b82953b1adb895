"""Kernel backend for HTB shaping: read the tree, apply a plan, roll back, read stats.

Netlink through pyroute2 only, never the `tc` binary. Every function takes `netns` (a
name under /run/netns) so callers and tests work inside a namespace; None is the
agent's own. The planner and the tree model are plain data in `agent.node.qos.htb`.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import ipaddress
import os
import re
import secrets
import select
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.iproute.linux import get_arguments_processor, get_dump_filter
from pyroute2.netlink import NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTCLASS,
    RTM_DELTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
    RTM_NEWTFILTER,
)
from pyroute2.netlink.rtnl.tcmsg import cls_u32, tcmsg

from agent.common.policy.units import PortRange
from agent.node.qos.htb import (
    AGENT_ROOT_MAJOR,
    ETH_P_IP,
    ETH_P_IPV6,
    PFIFO_LIMIT_PACKETS,
    Action,
    Change,
    HtbClass,
    HtbTree,
    LeafQdisc,
    U32Filter,
    U32Match,
    burst_for_rate,
    format_handle,
    merge_port_blocks,
    plan,
    port_blocks,
)
from agent.node.qos.kernel import (
    ClassStats,
    KernelStateConflict,
    TcApplyError,
    TcCapabilities,
    TcError,
)

TC_H_ROOT = 0xFFFFFFFF
# The named namespaces earlier agents probed in: fabcap-<pid>-<6 hex digits>.
PROBE_PREFIX = "fabcap-"
_PROBE_NAME = re.compile(rf"{PROBE_PREFIX}(\d+)-[0-9a-f]{{6}}")
RUN_NETNS = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
# Offsets from the network header (u32 matches there).
_IPV4 = {"dscp": 1, "ip_proto": 9, "src": 12, "dst": 16, "sport": 20, "dport": 22}
_IPV6 = {"dscp": 0, "ip_proto": 6, "src": 8, "dst": 24, "sport": 40, "dport": 42}

ByteMap = dict[int, tuple[int, int]]  # offset -> (value, mask), masks never 0


# --- u32 match encoding ---


def _put(bytemap: ByteMap, offset: int, value: bytes, mask: bytes) -> None:
    for i, (v, m) in enumerate(zip(value, mask, strict=True)):
        if m:
            bytemap[offset + i] = (v & m, m)


def _network_bytes(cidr: str) -> tuple[bytes, bytes]:
    network = ipaddress.ip_network(cidr, strict=False)
    return network.network_address.packed, network.netmask.packed


def match_entries(match: U32Match) -> list[ByteMap]:
    """The kernel filters a match needs: one byte map per (sport block, dport block)."""
    offsets = _IPV4 if match.protocol == "ip" else _IPV6
    base: ByteMap = {}
    if match.dscp is not None:
        if match.protocol == "ip":
            _put(base, offsets["dscp"], bytes([match.dscp << 2]), b"\xfc")
        else:
            tclass = match.dscp << 2  # traffic class straddles bytes 0 and 1
            _put(base, 0, bytes([tclass >> 4, (tclass & 0xF) << 4]), b"\x0f\xc0")
    if match.ip_proto is not None:
        _put(base, offsets["ip_proto"], bytes([match.ip_proto]), b"\xff")
    for name in ("src", "dst"):
        cidr = getattr(match, name)
        if cidr is not None:
            _put(base, offsets[name], *_network_bytes(cidr))
    port_choices: list[list[tuple[int, int] | None]] = []
    for name in ("sport", "dport"):
        ports: PortRange | None = getattr(match, name)
        blocks: list[tuple[int, int] | None] = [None]
        if ports is not None:
            blocks = list(port_blocks(ports.first, ports.last))
        port_choices.append(blocks)
    entries = []
    for sport in port_choices[0]:
        for dport in port_choices[1]:
            entry = dict(base)
            for name, block in (("sport", sport), ("dport", dport)):
                if block is not None:
                    _put(
                        entry,
                        offsets[name],
                        struct.pack(">H", block[0]),
                        struct.pack(">H", block[1]),
                    )
            entries.append(entry)
    return entries


def _u32_keys(entry: ByteMap) -> list[str]:
    # One key per byte: pyroute2 packs them into words itself, and its parser mishandles
    # masks with zero bytes inside a word.
    if not entry:
        return ["0x0/0x0+0"]
    return [f"0x{v:02x}/0x{m:02x}+{off}" for off, (v, m) in sorted(entry.items())]


def _decode_entry(protocol: str, entry: ByteMap) -> tuple[U32Match, Any, Any]:
    """A kernel filter's bytes as (match without ports, sport block, dport block)."""
    entry = dict(entry)
    offsets = _IPV4 if protocol == "ip" else _IPV6
    unknown: list[tuple[int, int, int]] = []
    fields: dict[str, Any] = {}

    def pop(offset: int, length: int) -> tuple[bytes, bytes] | None:
        masks = bytes(entry.get(offset + i, (0, 0))[1] for i in range(length))
        if not any(masks):
            return None
        value = bytes(entry.pop(offset + i, (0, 0))[0] for i in range(length))
        return value, masks

    dscp = pop(offsets["dscp"], 1) if protocol == "ip" else pop(0, 2)
    if dscp is not None:
        value, mask = dscp
        if protocol == "ip" and mask == b"\xfc":
            fields["dscp"] = value[0] >> 2
        elif protocol == "ipv6" and mask == b"\x0f\xc0":
            fields["dscp"] = ((value[0] & 0xF) << 4 | value[1] >> 4) >> 2
        else:
            unknown.extend(
                (offsets["dscp"] + i, v, m) for i, (v, m) in enumerate(zip(*dscp, strict=True))
            )
    proto = pop(offsets["ip_proto"], 1)
    if proto is not None:
        if proto[1] == b"\xff":
            fields["ip_proto"] = proto[0][0]
        else:
            unknown.append((offsets["ip_proto"], proto[0][0], proto[1][0]))
    width = 4 if protocol == "ip" else 16
    for name in ("src", "dst"):
        got = pop(offsets[name], width)
        if got is None:
            continue
        value, mask = got
        bits = int.from_bytes(mask, "big")
        prefix = bin(bits).count("1")
        if bits != ((1 << prefix) - 1) << (width * 8 - prefix):
            unknown.extend(
                (offsets[name] + i, v, m) for i, (v, m) in enumerate(zip(value, mask, strict=True))
            )
            continue
        address = ipaddress.ip_address(value)
        fields[name] = f"{address}/{prefix}"
    blocks: dict[str, tuple[int, int] | None] = {}
    for name in ("sport", "dport"):
        got = pop(offsets[name], 2)
        blocks[name] = (
            None if got is None else (int.from_bytes(got[0], "big"), int.from_bytes(got[1], "big"))
        )
    unknown.extend((off, v, m) for off, (v, m) in sorted(entry.items()))
    match = U32Match(protocol=protocol, unknown=tuple(unknown), **fields)
    return match, blocks["sport"], blocks["dport"]


def decode_filter(
    pref: int, flow_minor: int, protocol: str, entries: Sequence[ByteMap]
) -> U32Filter:
    """The U32Filter behind the kernel filters at one pref (the inverse of `match_entries`).
    Entries that no U32Filter would produce decode to one marked `unknown`."""
    decoded = [_decode_entry(protocol, e) for e in entries]
    base = decoded[0][0]
    sports = {d[1] for d in decoded}
    dports = {d[2] for d in decoded}
    consistent = all(d[0] == base for d in decoded)
    ranges: dict[str, PortRange | None] = {}
    for name, blocks in (("sport", sports), ("dport", dports)):
        if blocks == {None}:
            ranges[name] = None
        elif None in blocks:
            consistent = False
        else:
            merged = merge_port_blocks(b for b in blocks if b is not None)
            consistent = (
                consistent
                and merged is not None
                and set(port_blocks(merged.first, merged.last)) == blocks
            )
            ranges[name] = merged
    consistent = consistent and len(decoded) == len(sports) * len(dports)
    unknown = base.unknown if consistent else (*base.unknown, (-1, len(decoded), 0))
    match = U32Match(
        protocol=base.protocol,
        src=base.src,
        dst=base.dst,
        ip_proto=base.ip_proto,
        dscp=base.dscp,
        sport=ranges.get("sport"),
        dport=ranges.get("dport"),
        unknown=unknown,
    )
    return U32Filter(pref, flow_minor, match)


def _sel_bytes(sel: Any) -> ByteMap:
    # pyroute2 0.9 decodes u32 keys four bytes off (it skips the nla header twice), so
    # read the selector struct from the raw message.
    raw = bytes(sel.data[sel.offset + 4 : sel.offset + sel.length])
    nkeys = raw[2]
    entry: ByteMap = {}
    for i in range(nkeys):
        # struct tc_u32_key: mask and value in network order, offsets in host order.
        mask, value = struct.unpack_from(">II", raw, 16 + 16 * i)
        (off,) = struct.unpack_from("=i", raw, 16 + 16 * i + 8)
        _put(entry, off, struct.pack(">I", value), struct.pack(">I", mask))
    return entry


# --- kernel access ---


@contextmanager
def _iproute(netns: str | None) -> Iterator[Any]:
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        # IPRoute(netns=...) would create it silently.
        raise TcError(f"network namespace {netns!r} does not exist")
    ipr = IPRoute(netns=netns) if netns is not None else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, device: str) -> int:
    found = ipr.link_lookup(ifname=device)
    if not found:
        raise TcError(f"{device}: no such device")
    return int(found[0])


def device_exists(device: str, *, netns: str | None = None) -> bool:
    with _iproute(netns) as ipr:
        return bool(ipr.link_lookup(ifname=device))


def _class_rate_bytes(parms: Any, options: Any, key: str) -> int:
    wide = options.get_attr(f"TCA_HTB_{key.upper()}64")
    return int(wide) if wide else int(parms[key])


def read_tree(
    device: str,
    *,
    netns: str | None = None,
    root_major: int = AGENT_ROOT_MAJOR,
    take_over: bool = False,
) -> HtbTree | None:
    """The agent's tree on `device` as the kernel has it; None when the agent has none there.

    Raises KernelStateConflict when another root qdisc is installed (kernel defaults, with
    handle 0, do not count) unless `take_over`, which returns None so that the plan
    replaces it.
    """
    with _iproute(netns) as ipr:
        index = _index(ipr, device)
        qdiscs = list(ipr.get_qdiscs(index))
        root = next((q for q in qdiscs if q["parent"] == TC_H_ROOT), None)
        if root is None or root["handle"] == 0:
            return None
        kind = root.get_attr("TCA_KIND")
        if kind != "htb" or root["handle"] != root_major << 16:
            if take_over:
                return None
            raise KernelStateConflict(device, str(kind), int(root["handle"]))
        init = root.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_INIT")
        default_minor = int(init["defcls"])
        classes = []
        for msg in ipr.get_classes(index):
            if msg["handle"] >> 16 != root_major or msg.get_attr("TCA_KIND") != "htb":
                continue
            options = msg.get_attr("TCA_OPTIONS")
            parms = options.get_attr("TCA_HTB_PARMS")
            parent = msg["parent"]
            classes.append(
                HtbClass(
                    minor=msg["handle"] & 0xFFFF,
                    parent_minor=None
                    if parent in (TC_H_ROOT, root_major << 16)
                    else parent & 0xFFFF,
                    rate_bps=_class_rate_bytes(parms, options, "rate") * 8,
                    ceil_bps=_class_rate_bytes(parms, options, "ceil") * 8,
                    prio=int(parms["prio"]),
                    quantum_bytes=int(parms["quantum"]),
                )
            )
        class_minors = {c.minor for c in classes}
        leaves = []
        for q in qdiscs:
            parent = q["parent"]
            if parent >> 16 != root_major or parent & 0xFFFF not in class_minors:
                continue
            minor = parent & 0xFFFF
            leaf_kind = str(q.get_attr("TCA_KIND"))
            if q["handle"] != minor << 16:  # not one the agent made: mark it different
                leaf_kind = f"{leaf_kind} {format_handle(q['handle'] >> 16)}"
            leaves.append(LeafQdisc(minor, leaf_kind))
        grouped: dict[int, tuple[int, str, list[ByteMap]]] = {}
        for msg in ipr.get_filters(index, parent=root_major << 16):
            options = msg.get_attr("TCA_OPTIONS")
            if msg.get_attr("TCA_KIND") != "u32" or options is None:
                continue
            sel = options.get_attr("TCA_U32_SEL")
            classid = options.get_attr("TCA_U32_CLASSID")
            if sel is None or classid is None:
                continue  # the pref's hash table, not a rule
            pref = msg["info"] >> 16
            ethertype = socket.ntohs(msg["info"] & 0xFFFF)
            protocol = "ipv6" if ethertype == ETH_P_IPV6 else "ip"
            grouped.setdefault(pref, (classid & 0xFFFF, protocol, []))[2].append(_sel_bytes(sel))
    filters = tuple(
        decode_filter(pref, flow, proto, entries)
        for pref, (flow, proto, entries) in grouped.items()
    )
    kinds = [leaf.kind for leaf in leaves]
    leaf_kind = max(set(kinds), key=kinds.count) if kinds else "pfifo"
    return HtbTree(
        device,
        root_major,
        default_minor,
        tuple(classes),
        filters,
        leaf_kind=leaf_kind,
        leaf_qdiscs=tuple(leaves),
        strict=False,
    )


def _class_kwargs(cls: HtbClass, root_major: int) -> dict[str, Any]:
    parent = (
        root_major << 16 | cls.parent_minor if cls.parent_minor is not None else (root_major << 16)
    )
    return {
        "parent": parent,
        "rate": cls.rate_bps // 8,  # pyroute2 takes bytes per second for plain numbers
        "ceil": cls.ceil_bps // 8,
        "burst": burst_for_rate(cls.rate_bps),
        "cburst": burst_for_rate(cls.ceil_bps),
        "prio": cls.prio,
        "quantum": cls.quantum_bytes,
    }


def _leaf_kwargs(leaf: LeafQdisc, root_major: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"parent": root_major << 16 | leaf.class_minor}
    if leaf.kind == "pfifo":
        kwargs["limit"] = PFIFO_LIMIT_PACKETS
    return kwargs


# One tc request: (command as IPRoute.tc names it, kind, handle, keyword arguments).
_Request = tuple[str, str | None, int | None, dict[str, Any]]

# IPRoute.tc's command map, for the commands the agent sends.
_COMMANDS = {
    "replace": (RTM_NEWQDISC, "replace"),
    "del": (RTM_DELQDISC, "req"),
    "add-class": (RTM_NEWTCLASS, "create"),
    "change-class": (RTM_NEWTCLASS, "change"),
    "del-class": (RTM_DELTCLASS, "req"),
    "add-filter": (RTM_NEWTFILTER, "create"),
    "del-filter": (RTM_DELTFILTER, "req"),
}
# Offsets of nlmsghdr's sequence number and of tcmsg's ifindex (then handle, parent).
_NLMSG_SEQ = 8
_TCMSG_INDEX = 20
_ACK_BATCH_BYTES = 64 * 1024  # requests sent before their acks are read
_ACK_TIMEOUT_MS = 10_000


def _requests(change: Change) -> list[_Request]:
    """The tc requests that make `change`, in order, as `IPRoute.tc` arguments."""
    subject, major = change.subject, change.root_major
    root = major << 16
    if isinstance(subject, HtbTree):
        if change.action is Action.DELETE:
            return [("del", None, root, {"parent": TC_H_ROOT})]
        # replace: also swaps out a foreign root the caller chose to take over.
        return [("replace", "htb", root, {"parent": TC_H_ROOT, "default": subject.default_minor})]
    if isinstance(subject, HtbClass):
        handle = root | subject.minor
        if change.action is Action.DELETE:
            return [("del-class", None, handle, {})]
        command = "add-class" if change.action is Action.ADD else "change-class"
        return [(command, "htb", handle, _class_kwargs(subject, major))]
    if isinstance(subject, LeafQdisc):
        if change.action is Action.DELETE:
            return [("del", None, subject.major << 16, {"parent": root | subject.class_minor})]
        # replace: grafts over the default pfifo HTB gives every new class.
        return [("replace", subject.kind, subject.major << 16, _leaf_kwargs(subject, major))]
    requests: list[_Request] = []
    if change.action is not Action.ADD:
        old = change.before if isinstance(change.before, U32Filter) else subject
        requests.append(
            (
                "del-filter",
                "u32",
                None,
                {"parent": root, "prio": old.pref, "protocol": old.match.ethertype, "target": 0},
            )
        )
    if change.action is not Action.DELETE:
        for entry in match_entries(subject.match):
            requests.append(
                (
                    "add-filter",
                    "u32",
                    None,
                    {
                        "parent": root,
                        "prio": subject.pref,
                        "protocol": subject.match.ethertype,
                        "target": root | subject.flow_minor,
                        "keys": _u32_keys(entry),
                    },
                )
            )
    return requests


class _Encoder:
    """tc requests as netlink messages, encoded by pyroute2 as `IPRoute.tc` does (the
    same argument filters and plugins, the same `tcmsg` encoding).

    Requests that differ only in ifindex, handle and parent (the classes of a tree share
    their rates; every leaf qdisc is alike) are encoded once: later ones copy those bytes
    and set the three tcmsg fields, sparing pyroute2's HTB rate tables and argument
    processing per request."""

    def __init__(self) -> None:
        self._encoded: dict[str, bytes] = {}

    def encode(self, request: _Request, index: int, seq: int) -> bytes:
        command, kind, handle, kwargs = request
        if kind == "u32" and handle is None:  # every filter's keys differ: nothing to share
            data = bytearray(_encode_u32(command, index, kwargs))
            struct.pack_into("=I", data, _NLMSG_SEQ, seq)
            return bytes(data)
        parent = kwargs.get("parent")
        rest = {k: v for k, v in kwargs.items() if k != "parent"}
        key = repr((command, kind, handle is None, parent is None, sorted(rest.items())))
        template = self._encoded.get(key)
        if template is None:
            template = self._encode(request, index)
            self._encoded[key] = template
        data = bytearray(template)
        struct.pack_into("=I", data, _NLMSG_SEQ, seq)
        struct.pack_into("=i", data, _TCMSG_INDEX, index)
        # Absent ones keep what pyroute2 filled in (part of the key).
        if handle is not None:
            struct.pack_into("=I", data, _TCMSG_INDEX + 4, handle)
        if parent is not None:
            struct.pack_into("=I", data, _TCMSG_INDEX + 8, parent)
        return bytes(data)

    @staticmethod
    def _encode(request: _Request, index: int) -> bytes:
        command, kind, handle, kwargs = request
        query = dict(kwargs, index=index)
        if kind is not None:
            query["kind"] = kind
        if handle is not None:
            query["handle"] = handle
        _, query = get_dump_filter("tc", command, query)
        arguments = get_arguments_processor("tc", command, query)
        msg = _request_message(command)
        for field in msg.fields:
            msg[field[0]] = arguments.get_value(field[0], default=0, mode="field")
        for name, value in arguments.items():
            nla = tcmsg.name2nla(name)
            if msg.valid_nla(nla) and value is not None:
                msg["attrs"].append([nla, value])
        if "attrs" in arguments:
            msg["attrs"].extend(arguments["attrs"])
        msg.encode()
        return bytes(msg.data)


def _request_message(command: str) -> Any:
    """An empty `tcmsg` with the netlink header `IPRoute.tc` would give `command`."""
    msg = tcmsg()
    msg_type, mode = _COMMANDS[command]
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NetlinkRequest.calculate_request_flags(mode, False)
    msg["header"]["sequence_number"] = 0
    msg["header"]["pid"] = 0
    return msg


def _encode_u32(command: str, index: int, kwargs: dict[str, Any]) -> bytes:
    """A u32 filter request: what `IPRoute.tc` builds for it (the u32 plugin's options
    and request fix-up), without its generic argument processing."""
    msg = _request_message(command)
    msg["family"] = 0
    msg["pad1"] = 0
    msg["pad2"] = 0
    msg["index"] = index
    msg["handle"] = 0
    msg["parent"] = kwargs["parent"]
    request = dict(kwargs)
    cls_u32.fix_request(request)
    msg["info"] = request["info"]
    msg["attrs"] = [["TCA_KIND", "u32"], ["TCA_OPTIONS", cls_u32.get_parameters(kwargs)]]
    msg.encode()
    return bytes(msg.data)


def _send_batch(ipr: Any, batch: list[tuple[int, bytes]]) -> dict[int, int]:
    """Send the encoded requests without waiting between them, then read every ack;
    returns the nonzero errno per sequence number."""
    ipr.send(b"".join(data for _, data in batch))
    pending = {seq for seq, _ in batch}
    errors: dict[int, int] = {}
    poller = select.poll()
    poller.register(ipr.fileno(), select.POLLIN)
    while pending:
        if not poller.poll(_ACK_TIMEOUT_MS):
            raise TcError(f"no netlink ack for {len(pending)} tc requests")
        try:
            data = ipr.recv(1 << 20)
        except BlockingIOError:
            continue
        offset = 0
        while offset + 16 <= len(data):
            length, msg_type, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
            if msg_type == NLMSG_ERROR and seq in pending:
                pending.discard(seq)
                (code,) = struct.unpack_from("=i", data, offset + 16)
                if code:
                    errors[seq] = -code
            offset += (length + 3) & ~3 if length else len(data)
    return errors


def _execute(changes: Sequence[Change], netns: str | None) -> None:
    """Make the changes phase by phase. Within a phase the requests go out in batches
    without waiting for each ack (the kernel still handles them in order, and goes on
    past a failed one within its batch); the first failed request names the change, and
    no later batch or phase is sent. `apply` then rolls back from what the kernel has."""
    if not changes:
        return
    encoder = _Encoder()
    with _iproute(netns) as ipr:
        index = _index(ipr, changes[0].device)
        ordered = sorted(changes, key=lambda c: c.phase)
        seq = 0x40000000
        start = 0
        while start < len(ordered):
            phase = ordered[start].phase
            end = start
            while end < len(ordered) and ordered[end].phase == phase:
                end += 1
            owner: dict[int, Change] = {}
            batches: list[list[tuple[int, bytes]]] = [[]]
            size = 0
            for change in ordered[start:end]:
                for request in _requests(change):
                    seq += 1
                    data = encoder.encode(request, index, seq)
                    if size and size + len(data) > _ACK_BATCH_BYTES:
                        batches.append([])
                        size = 0
                    batches[-1].append((seq, data))
                    size += len(data)
                    owner[seq] = change
            for batch in batches:
                if not batch:
                    continue
                errors = _send_batch(ipr, batch)
                if errors:
                    first = min(errors)
                    code = errors[first]
                    raise _ChangeFailed(owner[first], NetlinkError(code, os.strerror(code)))
            start = end


class _ChangeFailed(Exception):
    def __init__(self, change: Change, error: NetlinkError) -> None:
        super().__init__(str(error))
        self.change = change
        self.code = int(error.code)
        self.reason = os.strerror(error.code) if error.code > 0 else str(error)


class Unread(enum.Enum):
    """`apply`'s default for `before`: read the tree from the kernel first."""

    TREE = 0


def apply(
    changes: Sequence[Change],
    *,
    netns: str | None = None,
    before: HtbTree | Unread | None = Unread.TREE,
) -> None:
    """Run a plan: removals (filters, leaf qdiscs, classes innermost first), then the root
    qdisc, classes parents first, leaf qdiscs and filters. If a change fails, re-plan from
    what the kernel then has back to the tree it held before, apply that, and raise
    TcApplyError naming the failed change.

    `before` is that tree when the caller has just read it (the plan's `actual`); reading
    a large tree costs more than changing one class, so callers that planned from a read
    pass it on."""
    if not changes:
        return
    devices = {(c.device, c.root_major) for c in changes}
    if len(devices) != 1:
        raise ValueError(f"one plan per device, got {sorted(devices)}")
    ((device, root_major),) = devices
    previous = (
        read_tree(device, netns=netns, root_major=root_major, take_over=True)
        if isinstance(before, Unread)
        else before
    )
    try:
        _execute(changes, netns)
    except _ChangeFailed as failed:
        rollback_error = None
        try:
            _restore(device, root_major, previous, netns)
        except (_ChangeFailed, TcError) as exc:
            rollback_error = str(exc)
        raise TcApplyError(failed.change, failed.code, failed.reason, rollback_error) from failed


def _restore(device: str, root_major: int, previous: HtbTree | None, netns: str | None) -> None:
    current = read_tree(device, netns=netns, root_major=root_major, take_over=True)
    if previous is None:
        if current is not None:
            _execute([Change(Action.DELETE, device, root_major, current)], netns)
        return
    _execute(plan(previous, current), netns)


def remove_tree(
    device: str, *, netns: str | None = None, root_major: int = AGENT_ROOT_MAJOR
) -> bool:
    """Delete the agent's root qdisc (and with it every class, leaf and filter); False if
    there was none, or no device either (it went, and its tree with it). Another root
    qdisc raises KernelStateConflict."""
    if not device_exists(device, netns=netns):
        return False
    current = read_tree(device, netns=netns, root_major=root_major)
    if current is None:
        return False
    try:
        _execute([Change(Action.DELETE, device, root_major, current)], netns)
    except _ChangeFailed as exc:
        raise TcError(f"{device}: removing the agent's tree failed: {exc.reason}") from exc
    return True


def agent_trees(*, netns: str | None = None, root_major: int = AGENT_ROOT_MAJOR) -> set[str]:
    """The devices whose root qdisc is an HTB of the agent's major."""
    with _iproute(netns) as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        return {
            names[int(msg["index"])]
            for msg in ipr.get_qdiscs()
            if msg["parent"] == TC_H_ROOT
            and msg["handle"] >> 16 == root_major
            and msg.get_attr("TCA_KIND") == "htb"
            and int(msg["index"]) in names
        }


# --- statistics ---


def class_stats(
    device: str, *, netns: str | None = None, root_major: int = AGENT_ROOT_MAJOR
) -> dict[int, ClassStats]:
    """Per class minor of the agent's tree on `device`: its counters from the class dump."""
    result: dict[int, ClassStats] = {}
    with _iproute(netns) as ipr:
        index = _index(ipr, device)
        for msg in ipr.get_classes(index):
            if msg["handle"] >> 16 != root_major:
                continue
            minor = msg["handle"] & 0xFFFF
            stats2 = msg.get_attr("TCA_STATS2")
            legacy = msg.get_attr("TCA_STATS")
            basic = stats2.get_attr("TCA_STATS_BASIC") if stats2 is not None else None
            queue = stats2.get_attr("TCA_STATS_QUEUE") if stats2 is not None else None
            rate_est = stats2.get_attr("TCA_STATS_RATE_EST") if stats2 is not None else None
            if basic is None or queue is None:
                if legacy is None:
                    continue
                result[minor] = ClassStats(
                    minor,
                    legacy["bytes"],
                    legacy["packets"],
                    legacy["drop"],
                    legacy["overlimits"],
                    legacy["backlog"],
                    legacy["bps"] * 8 or None,
                )
                continue
            rate = rate_est["bps"] * 8 if rate_est is not None else None
            result[minor] = ClassStats(
                minor,
                int(basic["bytes"]),
                int(basic["packets"]),
                int(queue["drops"]),
                int(queue["overlimits"]),
                int(queue["backlog"]),
                rate,
            )
    return result


# --- capabilities ---


def _probe(action: Any) -> bool:
    try:
        action()
    except NetlinkError:
        return False
    return True


@functools.cache
def detect_capabilities() -> TcCapabilities:
    """Try each qdisc, classifier and action on loopback (and an IFB) of a throwaway
    network namespace; no host interface is touched. Cached for the process.

    The namespace is the probing thread's own (unshare(CLONE_NEWNET) in a thread made for
    it): it has no name under /run/netns and no process is forked, so nothing outlives
    the agent however it ends (a SIGKILL mid-probe included), and a child never inherits
    the agent's threads or signal handlers. The kernel frees it when the thread ends.

    Creating a namespace needs CAP_SYS_ADMIN, which the systemd unit does not grant: then
    the probes run on a temporary IFB device the agent creates here and deletes again
    (CAP_NET_ADMIN is enough, and no existing interface is touched either)."""
    # Named namespaces of agents before this one, killed while probing.
    remove_stale_probes()
    found: list[TcCapabilities] = []
    failed: list[BaseException] = []

    def probe() -> None:
        try:
            if _LIBC.unshare(CLONE_NEWNET) != 0:
                return  # no CAP_SYS_ADMIN: probed on an IFB of the host below
            with IPRoute() as ipr:
                lo = _index(ipr, "lo")
                ipr.link("set", index=lo, state="up")
                found.append(_probe_all(ipr, lo))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=probe, name="tc-probe")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return found[0] if found else _probe_on_own_device()


def remove_stale_probes() -> list[str]:
    """Delete the probe namespaces of agents that died while probing (a SIGKILL skips
    the cleanup); the names carry the prober's pid, and a live one's are left alone."""
    try:
        names = [entry.name for entry in RUN_NETNS.iterdir()]
    except OSError:
        return []
    removed = []
    for name in names:
        match = _PROBE_NAME.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            pyroute2_netns.remove(name)
        except OSError:
            continue  # another agent's cleanup got there first, or no permission
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe_on_own_device() -> TcCapabilities:
    device = f"fabcap{secrets.token_hex(3)}"
    with IPRoute() as ipr:
        if not _probe(lambda: ipr.link("add", ifname=device, kind="ifb")):
            # No IFB either: nothing to probe on without touching someone's interface.
            return TcCapabilities(False, False, False, False, False, False, False, False)
        try:
            index = _index(ipr, device)
            ipr.link("set", index=index, state="up")
            return _probe_all(ipr, index, ifb_known=True)
        finally:
            _probe(lambda: ipr.link("del", ifname=device))


def _probe_all(ipr: Any, lo: int, *, ifb_known: bool = False) -> TcCapabilities:
    """Probe on device `lo` (loopback of a private namespace, or the agent's own IFB)."""
    ifb = ifb_known or _probe(lambda: ipr.link("add", ifname="fabcapifb", kind="ifb"))
    htb = _probe(lambda: ipr.tc("add", "htb", lo, 0x10000, parent=TC_H_ROOT, default=0x10))
    has_class = htb and _probe(
        lambda: ipr.tc("add-class", "htb", lo, 0x10010, parent=0x10000, rate=125_000, ceil=125_000)
    )
    parent = 0x10010 if has_class else TC_H_ROOT

    def leaf(kind: str, **kwargs: Any) -> bool:
        ok = _probe(lambda: ipr.tc("replace", kind, lo, 0x100000, parent=parent, **kwargs))
        if ok:
            _probe(lambda: ipr.tc("del", index=lo, handle=0x100000, parent=parent))
        return ok

    pfifo = leaf("pfifo", limit=10)
    fq_codel = leaf("fq_codel")
    u32 = (
        htb
        and has_class
        and _probe(
            lambda: ipr.tc(
                "add-filter",
                "u32",
                lo,
                parent=0x10000,
                prio=1,
                protocol=ETH_P_IP,
                target=0x10010,
                keys=["0x0/0x0+0"],
            )
        )
    )
    ingress = _probe(lambda: ipr.tc("add", "ingress", lo, 0xFFFF0000))
    mirred = False
    if ingress and u32:
        target = _index(ipr, "fabcapifb") if ifb and not ifb_known else lo
        mirred = _probe(
            lambda: ipr.tc(
                "add-filter",
                "u32",
                lo,
                parent=0xFFFF0000,
                prio=1,
                protocol=ETH_P_IP,
                target=0x10001,
                keys=["0x0/0x0+0"],
                action=[
                    {
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": target,
                    }
                ],
            )
        )
    if ingress:
        _probe(lambda: ipr.tc("del", index=lo, handle=0xFFFF0000, parent=0xFFFFFFF1))
    clsact = _probe(lambda: ipr.tc("add", "clsact", lo, 0xFFFF0000))
    return TcCapabilities(
        htb=htb,
        pfifo=pfifo,
        fq_codel=fq_codel,
        u32=u32,
        ingress=ingress,
        clsact=clsact,
        mirred=mirred,
        ifb=ifb,
    )
