"""The netlink boundary: every link of a namespace with its counters, behind a Protocol.

Collectors depend on `LinkDumper` only, so their tests hand in a small fake; the real
implementation is exercised against real network namespaces.

Why not pyroute2 for the dumps (an exception to "netlink through pyroute2"): the NIC
collector reads every link every second, and the agent's whole budget is 5 ms of CPU per
second. pyroute2 0.9 builds an object for every attribute of every RTM_NEWLINK message
(nested IFLA_LINKINFO, IFLA_AF_SPEC, ...) while we need four; a message class naming only
those still builds one per other attribute, and the request machinery alone (asyncio
loop, a message object per link) is a fifth of the budget at 31 links. CPU per call,
median, veth links in a namespace, measured with bench/nic_dump.py:

    links  pyroute2    pyroute2,          pyroute2,       here,      here, after a
           get_links() 4-attribute class  no attributes   unchanged  link event
       31     6.6 ms       5.9 ms            1.2 ms        0.07 ms     0.27 ms
      201      64 ms        62 ms            5.5 ms        0.36 ms     1.4 ms

So this module speaks NETLINK_ROUTE over plain sockets and reads what it needs with
`struct` (see `NetlinkLinkDumper`). pyroute2 still opens the sockets inside a named
network namespace, in a child process, so no agent thread ever changes namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from pyroute2.netns import create_socket

_TIMEOUT_S = 5.0
_DUMP_ATTEMPTS = 3
# The kernel fills a dump datagram up to 32 KiB (or with one larger message).
_RECV_BYTES = 64 * 1024

# include/uapi/linux/netlink.h, rtnetlink.h, if_link.h
_NETLINK_ROUTE = 0
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP_INTR = 0x10
_NLM_F_DUMP = 0x300
_RTMGRP_LINK = 0x1
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_RTM_NEWSTATS = 92
_RTM_GETSTATS = 94
_IFLA_IFNAME = 3
_IFLA_MTU = 4
_IFLA_OPERSTATE = 16
_IFLA_EXT_MASK = 29
_RTEXT_FILTER_SKIP_STATS = 1 << 3
_IFLA_STATS_LINK_64 = 1
_IFLA_STATS_FILTER_LINK_64 = 1 << (_IFLA_STATS_LINK_64 - 1)
# The top two bits of nla_type are NLA_F_NESTED and NLA_F_NET_BYTEORDER.
_NLA_TYPE_MASK = 0x3FFF

# struct nlmsghdr (len, type, flags, seq, pid); the pid of an answer is not needed.
_NLMSGHDR = struct.Struct("=IHHI")
_NLMSG_HDRLEN = 16
# nlmsghdr, struct ifinfomsg (family, pad, type, index, flags, change), IFLA_EXT_MASK.
_LINK_REQUEST = struct.Struct("=IHHII BxHiII HHI")
# nlmsghdr, struct if_stats_msg (family, pad1, pad2, ifindex, filter_mask).
_STATS_REQUEST = struct.Struct("=IHHII BxHII")
# Both ifinfomsg and if_stats_msg hold the ifindex at offset 4.
_IFINDEX = struct.Struct("=i")
_IFINDEX_OFFSET = _NLMSG_HDRLEN + 4
_LINK_ATTRS_OFFSET = _NLMSG_HDRLEN + 16
_STATS_ATTRS_OFFSET = _NLMSG_HDRLEN + 12
_NLA = struct.Struct("=HH")
_INT = struct.Struct("=i")
_U32 = struct.Struct("=I")
# The first eight fields of struct rtnl_link_stats64.
_STATS64 = struct.Struct("=8Q")
# IF_OPER_* (include/uapi/linux/if.h), spelled as sysfs operstate spells them.
_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

_T = TypeVar("_T")


# A NamedTuple rather than a frozen dataclass: one is built for every link every second,
# straight from the unpacked struct, and a frozen dataclass's __init__ (object.__setattr__
# per field) costs five times as much.
class LinkStats(NamedTuple):
    """The kernel's 64-bit interface counters as `ip -s link` shows them, in the order of
    struct rtnl_link_stats64 (include/uapi/linux/if_link.h)."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_errors: int
    tx_errors: int
    rx_dropped: int
    tx_dropped: int


@dataclass(frozen=True, slots=True)
class Link:
    """One interface as a link dump reports it."""

    index: int
    name: str
    # RFC 2863 state, lower-case as sysfs spells it: up, down, unknown, dormant, ...
    operstate: str
    mtu: int
    stats: LinkStats


class LinkDumper(Protocol):
    """Dumps every interface of one network namespace. Raises OSError on failure."""

    def dump_links(self) -> Sequence[Link]: ...

    def close(self) -> None: ...


class _DumpInterrupted(Exception):
    """The kernel flagged a dump NLM_F_DUMP_INTR: the links changed while it ran, so it
    may miss or repeat some."""


class NetlinkLinkDumper:
    """`LinkDumper` over NETLINK_ROUTE sockets kept open for the dumper's life.

    Each call dumps the counters of every link (RTM_GETSTATS: small messages, cheap in
    the kernel and here). Names, operstates and MTUs come from a link dump (RTM_GETLINK:
    large messages, most of the cost) that is redone only when the kernel has announced a
    link change on a second socket subscribed to link events (RTMGRP_LINK), or when that
    socket overflowed and events may have been lost. A change shows on the next call, as
    it would with a link dump every call.

    Any thread may call it; calls are serialised.
    """

    def __init__(self, netns: str | None = None, *, timeout_s: float = _TIMEOUT_S) -> None:
        self._where = f"network namespace {netns}" if netns else "this host"
        self._sock = self._open(netns)
        try:
            self._sock.bind((0, 0))
            # The kernel always answers a dump; the timeout bounds a sampler stall if it
            # ever does not. A late answer carries an old sequence number and is skipped.
            self._sock.settimeout(timeout_s)
            self._events = self._open(netns)
            try:
                self._events.bind((0, _RTMGRP_LINK))
                self._events.setblocking(False)
            except BaseException:
                self._events.close()
                raise
        except BaseException:
            self._sock.close()
            raise
        self._lock = threading.Lock()
        self._closed = False
        self._seq = 0
        self._buffer = bytearray(_RECV_BYTES)
        self._peek = bytearray(_NLMSG_HDRLEN)
        # Index, name, operstate and MTU of every link as of the last link dump; None
        # when it must be redone.
        self._attributes: list[tuple[int, str, str, int]] | None = None

    def _open(self, netns: str | None) -> socket.socket:
        try:
            # flags=0: never create a missing namespace.
            sock: socket.socket = create_socket(
                netns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE, flags=0
            )
        except OSError as exc:
            raise OSError(exc.errno, f"netlink socket for {self._where}: {exc}") from exc
        return sock

    def dump_links(self) -> Sequence[Link]:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "netlink link dumper is closed")
            for _ in range(_DUMP_ATTEMPTS):
                try:
                    return self._links()
                except _DumpInterrupted:
                    # Pods come and go; the next dump is consistent again.
                    continue
            raise OSError(
                errno.EINTR,
                f"netlink link dump of {self._where}: interrupted by link changes "
                f"{_DUMP_ATTEMPTS} times in a row",
            )

    def _links(self) -> tuple[Link, ...]:
        # Events first: a change announced after this point is seen by the next call.
        if self._links_changed() or self._attributes is None:
            # Forgotten first: the events are drained, so a failed dump must be redone.
            self._attributes = None
            self._attributes = self._dump(self._link_request, _RTM_NEWLINK, _link_attributes)
        counters = dict(self._dump(self._stats_request, _RTM_NEWSTATS, _link_counters))
        # A link without counters was deleted after the link dump.
        return tuple(
            Link(index, name, operstate, mtu, counters[index])
            for index, name, operstate, mtu in self._attributes
            if index in counters
        )

    def _links_changed(self) -> bool:
        """Whether any link event has arrived since the last call; drains them."""
        changed = False
        while True:
            try:
                # Only the arrival matters: a short buffer truncates and discards the rest.
                self._events.recv_into(self._peek)
            except BlockingIOError:
                return changed
            except OSError as exc:
                # ENOBUFS: the socket overflowed and events were lost.
                if exc.errno != errno.ENOBUFS:
                    raise OSError(
                        exc.errno, f"netlink link events of {self._where}: {exc.strerror}"
                    ) from exc
            changed = True

    @staticmethod
    def _link_request(seq: int) -> bytes:
        return _LINK_REQUEST.pack(
            _LINK_REQUEST.size, _RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0,
            socket.AF_UNSPEC, 0, 0, 0, 0,
            8, _IFLA_EXT_MASK, _RTEXT_FILTER_SKIP_STATS,
        )  # fmt: skip

    @staticmethod
    def _stats_request(seq: int) -> bytes:
        return _STATS_REQUEST.pack(
            _STATS_REQUEST.size, _RTM_GETSTATS, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0,
            socket.AF_UNSPEC, 0, 0, _IFLA_STATS_FILTER_LINK_64,
        )  # fmt: skip

    def _dump(
        self,
        request: Callable[[int], bytes],
        kind_wanted: int,
        parse: Callable[[bytearray, int, int], _T],
    ) -> list[_T]:
        """Sends `request` and parses each answer of `kind_wanted` until NLMSG_DONE."""
        seq = self._send(request)
        results: list[_T] = []
        interrupted = False
        # A bad message is reported once the dump is read to its end: a dump abandoned
        # half-way keeps running in the kernel, which refuses the next one (EBUSY).
        bad_message: OSError | None = None
        refused = False
        while True:
            size = self._receive()
            data = self._buffer
            offset = 0
            while offset + _NLMSG_HDRLEN <= size:
                length, kind, flags, msg_seq = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSG_HDRLEN or offset + length > size:
                    raise OSError(
                        errno.EPROTO,
                        f"netlink dump of {self._where}: message length {length} "
                        f"at offset {offset} of a {size}-byte datagram",
                    )
                if msg_seq == seq:
                    if flags & _NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == kind_wanted:
                        try:
                            results.append(parse(data, offset, length))
                        except OSError as exc:
                            bad_message = bad_message or exc
                    elif kind in (_NLMSG_DONE, _NLMSG_ERROR):
                        # Both carry an int: 0, or a negative errno when the dump failed.
                        code = 0
                        if length >= _NLMSG_HDRLEN + _INT.size:
                            (code,) = _INT.unpack_from(data, offset + _NLMSG_HDRLEN)
                        if code == -errno.EBUSY and kind == _NLMSG_ERROR:
                            # An earlier dump, abandoned when it timed out, still runs.
                            refused = True
                        elif code < 0:
                            raise OSError(
                                -code, f"netlink dump of {self._where}: {os.strerror(-code)}"
                            )
                        elif kind == _NLMSG_DONE:
                            if interrupted:
                                raise _DumpInterrupted()
                            if bad_message is not None:
                                raise bad_message
                            return results
                elif refused and kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    # Reading it has run the earlier dump to its end: ask again.
                    seq = self._send(request)
                    refused = False
                # Other messages answer an earlier dump that timed out: skipped.
                offset += (length + 3) & ~3

    def _send(self, request: Callable[[int], bytes]) -> int:
        """Sends the request with a fresh sequence number; that number."""
        self._seq = seq = self._seq % 0xFFFFFFFF + 1
        self._sock.send(request(seq))
        return seq

    def _receive(self) -> int:
        """The next datagram into `self._buffer`; its length."""
        # Peek at the length first (MSG_TRUNC returns the whole datagram's length): one
        # message larger than the buffer would otherwise arrive cut short, and with it
        # possibly the NLMSG_DONE that ends the dump.
        size = self._sock.recv_into(self._peek, 0, socket.MSG_PEEK | socket.MSG_TRUNC)
        if size > len(self._buffer):
            self._buffer = bytearray(size)
        return self._sock.recv_into(self._buffer)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
            self._events.close()


def _link_attributes(data: bytearray, offset: int, length: int) -> tuple[int, str, str, int]:
    """Index, name, operstate and MTU from the RTM_NEWLINK message at `offset`.

    Stops walking the attributes once it has all three: the kernel puts them first, before
    the large nested ones (IFLA_LINKINFO, IFLA_AF_SPEC)."""
    (index,) = _IFINDEX.unpack_from(data, offset + _IFINDEX_OFFSET)
    name = f"#{index}"
    operstate = "unknown"
    mtu = 0
    found = 0
    position = offset + _LINK_ATTRS_OFFSET
    end = offset + length
    while position + 4 <= end and found < 3:
        nla_len, nla_type = _NLA.unpack_from(data, position)
        if nla_len < 4:
            break
        nla_type &= _NLA_TYPE_MASK
        if nla_type == _IFLA_IFNAME:
            raw = data[position + 4 : position + nla_len]
            name = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
            found += 1
        elif nla_type == _IFLA_OPERSTATE:
            state = data[position + 4]
            operstate = _OPERSTATES[state] if state < len(_OPERSTATES) else "unknown"
            found += 1
        elif nla_type == _IFLA_MTU:
            (mtu,) = _U32.unpack_from(data, position + 4)
            found += 1
        position += (nla_len + 3) & ~3
    return index, name, operstate, mtu


def _link_counters(data: bytearray, offset: int, length: int) -> tuple[int, LinkStats]:
    """Index and counters from the RTM_NEWSTATS message at `offset`."""
    (index,) = _IFINDEX.unpack_from(data, offset + _IFINDEX_OFFSET)
    position = offset + _STATS_ATTRS_OFFSET
    end = offset + length
    # IFLA_STATS_LINK_64 is the only attribute asked for; where 64-bit values need
    # aligning, a padding attribute may come first.
    while position + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(data, position)
        if nla_len < 4:
            break
        if nla_type & _NLA_TYPE_MASK == _IFLA_STATS_LINK_64 and nla_len >= 4 + _STATS64.size:
            return index, LinkStats._make(_STATS64.unpack_from(data, position + 4))
        position += (nla_len + 3) & ~3
    # Without it every counter of the interface would be a guess.
    raise OSError(errno.EPROTO, f"netlink stats dump: ifindex {index} has no IFLA_STATS_LINK_64")
