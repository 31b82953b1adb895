"""NIC collector: a fake link dumper for the edge cases, real namespaces for kernel claims."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.node.collectors.base import (
    SharedResources,
    Tick,
    options_from_config,
    registrations,
)
from agent.node.collectors.nic import NicCollector, NicOptions, NicSample
from agent.node.config import DEFAULT_INTERFACE_PATTERNS, AgentConfig
from agent.node.errors import CollectorError
from agent.node.netlink import Link, LinkStats, NetlinkLinkDumper
from tests import FIXTURES
from tests.conftest import VethPair, VethTraffic
from tests.exposition import exposed

# include/uapi/linux/netlink.h and rtnetlink.h
NLMSG_DONE = 3
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWSTATS = 92
RTM_GETSTATS = 94

FIXTURE_SYSFS = FIXTURES / "sysfs"
LOGGER = "agent.node.collectors.nic"


def options(**config: Any) -> NicOptions:
    """The collector's options as the agent takes them from its configuration."""
    return options_from_config(NicOptions, AgentConfig(**config))


def getlink_dump_request(seq: int) -> bytes:
    """RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, with an empty ifinfomsg."""
    return struct.pack("=IHHIIBxHiII", 32, 18, 0x301, seq, 0, 0, 0, 0, 0, 0)


def tick(seq: int = 1) -> Tick:
    return Tick(seq=seq, monotonic_s=time.monotonic(), wall_s=time.time())


def link(name: str, index: int, *, operstate: str = "up", mtu: int = 1500, base: int = 0) -> Link:
    """A link whose counters are distinct per field, so a swapped field shows."""
    return Link(
        index=index,
        name=name,
        operstate=operstate,
        mtu=mtu,
        stats=LinkStats(
            rx_bytes=base + 1,
            tx_bytes=base + 2,
            rx_packets=base + 3,
            tx_packets=base + 4,
            rx_errors=base + 5,
            tx_errors=base + 6,
            rx_dropped=base + 7,
            tx_dropped=base + 8,
        ),
    )


class FakeLinkDumper:
    """Dumps whatever `links` holds, or raises `error` when it is set."""

    def __init__(self, links: Iterable[Link] = ()) -> None:
        self.links = list(links)
        self.error: OSError | None = None
        self.dumps = 0
        self.closed = False

    def dump_links(self) -> Sequence[Link]:
        self.dumps += 1
        if self.error is not None:
            raise self.error
        return tuple(self.links)

    def close(self) -> None:
        self.closed = True


def by_device(samples: Sequence[NicSample]) -> dict[str, NicSample]:
    return {s.device: s for s in samples}


def sysfs_counters(sysfs_root: Path, device: str) -> dict[str, int]:
    statistics = sysfs_root / "class" / "net" / device / "statistics"
    names = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
    return {name: int((statistics / name).read_text()) for name in names}


# --- with a fake link dumper ---


def test_selected_interfaces_carry_the_dump_counters_and_sysfs_speed() -> None:
    dumper = FakeLinkDumper(
        [
            link("lo", 1, operstate="unknown", mtu=65536),
            link("eth2", 4, mtu=9000, base=1000),
            link("eth3", 5, operstate="down", base=2000),
            link("veth3f2a1b", 9, base=3000),
        ]
    )
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS), dumper)

    samples = collector.collect(tick())

    assert [s.device for s in samples] == ["eth2", "eth3"]
    assert samples[0] == NicSample(
        device="eth2",
        ifindex=4,
        operstate="up",
        mtu_bytes=9000,
        speed_bps=400_000_000_000,
        receive_bytes=1001,
        transmit_bytes=1002,
        receive_packets=1003,
        transmit_packets=1004,
        receive_errors=1005,
        transmit_errors=1006,
        receive_drops=1007,
        transmit_drops=1008,
    )
    # The fixture's eth3 reports SPEED_UNKNOWN (-1), as a link without carrier does.
    assert samples[1].speed_bps is None
    assert not samples[1].up


def test_speed_of_an_interface_without_a_sysfs_entry_is_none() -> None:
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS), FakeLinkDumper([link("eth9", 7)]))

    (sample,) = collector.collect(tick())

    assert sample.speed_bps is None


def test_speed_that_is_not_a_number_raises_naming_the_file(tmp_path: Path) -> None:
    speed = tmp_path / "class" / "net" / "eth2" / "speed"
    speed.parent.mkdir(parents=True)
    speed.write_text("fast\n")
    collector = NicCollector(options(sysfs_root=tmp_path), FakeLinkDumper([link("eth2", 4)]))

    with pytest.raises(CollectorError, match=r"eth2/speed.*'fast'"):
        collector.collect(tick())


def test_dump_failure_raises_with_the_kernel_error() -> None:
    dumper = FakeLinkDumper()
    dumper.error = OSError(errno.ENOBUFS, "No buffer space available")
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS), dumper)

    with pytest.raises(CollectorError, match=r"netlink link dump failed.*No buffer space"):
        collector.collect(tick())


def test_unmatched_include_pattern_warns_once_and_again_only_after_recovering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dumper = FakeLinkDumper([link("eth2", 4)])
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS, interfaces=("eth*", "ib*")), dumper)
    caplog.set_level(logging.INFO, logger=LOGGER)

    for seq in range(1, 4):
        collector.collect(tick(seq))
    first = [r for r in caplog.records if r.levelno == logging.WARNING]
    dumper.links.append(link("ib0", 6))
    collector.collect(tick(4))
    dumper.links.pop()
    collector.collect(tick(5))

    assert len(first) == 1
    assert "'ib*'" in first[0].getMessage()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO, logging.WARNING]


def test_metrics_use_the_contract_names_and_omit_unknown_speeds() -> None:
    dumper = FakeLinkDumper([link("eth2", 4, base=1000), link("eth3", 5, operstate="down")])
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS), dumper)
    samples = collector.collect(tick())

    scraped = exposed(collector.metrics(samples))

    expected = {
        'fabric_nic_receive_bytes_total{device="eth2"}': 1001,
        'fabric_nic_transmit_bytes_total{device="eth2"}': 1002,
        'fabric_nic_receive_packets_total{device="eth2"}': 1003,
        'fabric_nic_transmit_packets_total{device="eth2"}': 1004,
        'fabric_nic_receive_errors_total{device="eth2"}': 1005,
        'fabric_nic_transmit_errors_total{device="eth2"}': 1006,
        'fabric_nic_receive_drops_total{device="eth2"}': 1007,
        'fabric_nic_transmit_drops_total{device="eth2"}': 1008,
        'fabric_nic_up{device="eth2"}': 1,
        'fabric_nic_up{device="eth3"}': 0,
        'fabric_nic_info{device="eth3",operstate="down"}': 1,
        'fabric_nic_mtu_bytes{device="eth2"}': 1500,
        'fabric_nic_speed_bytes_per_second{device="eth2"}': 50e9,
    }
    assert {key: scraped.get(key) for key in expected} == expected
    assert 'fabric_nic_speed_bytes_per_second{device="eth3"}' not in scraped


def test_close_closes_the_link_dumper() -> None:
    dumper = FakeLinkDumper()
    collector = NicCollector(options(sysfs_root=FIXTURE_SYSFS), dumper)

    collector.close()

    assert dumper.closed


def test_registered_factory_builds_a_working_collector() -> None:
    collector = registrations()["nic"].create(AgentConfig(), SharedResources())
    try:
        samples = collector.collect(tick())
    finally:
        collector.close()

    assert collector.name == "nic"
    assert all(isinstance(s, NicSample) for s in samples)


# --- against real network namespaces ---


def test_dumper_reports_the_links_of_its_namespace(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    try:
        links = {link.name: link for link in dumper.dump_links()}
    finally:
        dumper.close()

    assert set(links) == {"lo", veth_pair.device}
    assert (links[veth_pair.device].operstate, links[veth_pair.device].mtu) == ("up", 1500)
    assert (links["lo"].operstate, links["lo"].mtu) == ("unknown", 65536)


def test_byte_and_packet_counters_match_the_kernel_under_traffic(
    veth_pair: VethPair, netns_sysfs: Path, veth_traffic: VethTraffic
) -> None:
    config = options(sysfs_root=netns_sysfs, interfaces=("*",))
    collector = NicCollector(config, NetlinkLinkDumper(netns=veth_pair.netns))
    try:
        veth_traffic.send(count=500, payload_bytes=1200)
        veth_traffic.start()
        try:
            before = sysfs_counters(netns_sysfs, veth_pair.device)
            samples = by_device(collector.collect(tick()))
            after = sysfs_counters(netns_sysfs, veth_pair.device)
        finally:
            veth_traffic.stop()
    finally:
        collector.close()

    sample = samples[veth_pair.device]
    assert before["rx_bytes"] <= sample.receive_bytes <= after["rx_bytes"]
    assert before["tx_bytes"] <= sample.transmit_bytes <= after["tx_bytes"]
    assert before["rx_packets"] <= sample.receive_packets <= after["rx_packets"]
    assert before["tx_packets"] <= sample.transmit_packets <= after["tx_packets"]
    # The burst alone: 500 datagrams of 1200 bytes plus UDP, IP and Ethernet headers.
    assert sample.transmit_bytes >= 500 * (1200 + 8 + 20 + 14)
    assert sample.receive_bytes >= 500 * (1200 + 8 + 20 + 14)
    # veth reports 10 Gbit/s while running; loopback has no speed (EINVAL).
    assert sample.speed_bps == 10_000_000_000
    assert samples["lo"].speed_bps is None


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (DEFAULT_INTERFACE_PATTERNS, {"device"}),
        (("fab*",), {"device"}),
        (("*", "!fab*"), {"lo"}),
        (("*",), {"lo", "device"}),
    ],
)
def test_interface_patterns_select_real_links(
    veth_pair: VethPair, patterns: tuple[str, ...], expected: set[str]
) -> None:
    config = options(sysfs_root=FIXTURE_SYSFS, interfaces=patterns)
    collector = NicCollector(config, NetlinkLinkDumper(netns=veth_pair.netns))
    try:
        devices = {s.device for s in collector.collect(tick())}
    finally:
        collector.close()

    assert devices == {veth_pair.device if name == "device" else name for name in expected}


def test_pattern_matching_no_real_interface_warns_once(
    veth_pair: VethPair, caplog: pytest.LogCaptureFixture
) -> None:
    config = options(sysfs_root=FIXTURE_SYSFS, interfaces=("fab*", "eth*"))
    collector = NicCollector(config, NetlinkLinkDumper(netns=veth_pair.netns))
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        for seq in range(1, 4):
            samples = collector.collect(tick(seq))
    finally:
        collector.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["interface pattern 'eth*' matches no interface on this host"]
    assert [s.device for s in samples] == [veth_pair.device]


def test_dumper_keeps_one_socket_whichever_thread_calls(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    try:
        dumper.dump_links()
        open_fds = len(os.listdir("/proc/self/fd"))
        results: list[int] = []
        for _ in range(3):
            worker = threading.Thread(target=lambda: results.append(len(dumper.dump_links())))
            worker.start()
            worker.join()
        fds_after = len(os.listdir("/proc/self/fd"))
    finally:
        dumper.close()

    assert results == [2, 2, 2]
    assert fds_after == open_fds


def test_dumper_refuses_after_close_and_closes_once(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)

    dumper.close()
    dumper.close()

    with pytest.raises(OSError, match="closed"):
        dumper.dump_links()


def test_dumper_for_a_missing_namespace_fails_without_creating_it() -> None:
    name = "fabmissing-ns"

    with pytest.raises(OSError):
        NetlinkLinkDumper(netns=name)

    assert not Path("/run/netns", name).exists()


def test_dump_agrees_with_pyroute2_full_decode(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    iproute = IPRoute(groups=0, netns=veth_pair.netns, flags=0)
    try:
        before = {link.name: link for link in dumper.dump_links()}
        decoded = {msg.get("IFLA_IFNAME"): msg for msg in iproute.get_links()}
        after = {link.name: link for link in dumper.dump_links()}
    finally:
        iproute.close()
        dumper.close()

    assert set(before) == set(decoded) == set(after) == {"lo", veth_pair.device}
    for name, msg in decoded.items():
        assert (before[name].index, before[name].mtu, before[name].operstate) == (
            msg["index"],
            msg.get("IFLA_MTU"),
            msg.get("IFLA_OPERSTATE").lower(),
        )
        stats = msg.get("IFLA_STATS64")
        # Counters may move between the dumps (IPv6 neighbour discovery on the veth).
        for field in LinkStats._fields:
            assert getattr(before[name].stats, field) <= stats[field], (name, field)
            assert stats[field] <= getattr(after[name].stats, field), (name, field)


def test_datagram_larger_than_the_buffer_is_read_whole(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    dumper._buffer = bytearray(64)
    try:
        links = dumper.dump_links()
    finally:
        dumper.close()

    assert {link.name for link in links} == {"lo", veth_pair.device}


def test_answers_to_an_earlier_dump_are_skipped(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    try:
        # As if an earlier dump had timed out: its answer still waits in the socket.
        dumper._sock.send(getlink_dump_request(seq=0xABCDEF))
        links = dumper.dump_links()
        again = dumper.dump_links()
    finally:
        dumper.close()

    assert sorted(link.name for link in links) == sorted(["lo", veth_pair.device])
    assert [link.name for link in again] == [link.name for link in links]


class FakeLinkEvents:
    """Stands in for the dumper's link-event socket: `pending` events to drain, or an
    overflow (ENOBUFS) when `overflowed` is set."""

    def __init__(self) -> None:
        self.pending = 0
        self.overflowed = False

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if self.overflowed:
            self.overflowed = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.pending -= 1
        return len(buffer)

    def close(self) -> None:
        pass


def fake_events(dumper: NetlinkLinkDumper) -> FakeLinkEvents:
    """Replaces the dumper's link-event socket with a fake, so that only the test decides
    when links have changed."""
    dumper._events.close()
    events = FakeLinkEvents()
    dumper._events = events  # type: ignore[assignment]
    return events


class InterruptingSocket:
    """Wraps the dumper's socket: the kernel's answers to the first `failures` requests of
    type `kind` come back flagged NLM_F_DUMP_INTR, as when links change during a dump."""

    def __init__(self, sock: socket.socket, kind: int, failures: int) -> None:
        self.sock = sock
        self.kind = kind
        self.failures = failures
        self.requests: list[int] = []
        self._flag_next = False

    def send(self, data: bytes) -> int:
        (kind,) = struct.unpack_from("=H", data, 4)
        self.requests.append(kind)
        self._flag_next = kind == self.kind and self.failures > 0
        self.failures -= self._flag_next
        return self.sock.send(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        size = self.sock.recv_into(buffer, nbytes, flags)
        if self._flag_next and not flags & socket.MSG_PEEK:
            (msg_flags,) = struct.unpack_from("=H", buffer, 6)
            struct.pack_into("=H", buffer, 6, msg_flags | NLM_F_DUMP_INTR)
            self._flag_next = False
        return size

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("kind", "requests"),
    [
        (RTM_GETLINK, [RTM_GETLINK, RTM_GETLINK, RTM_GETLINK, RTM_GETSTATS]),
        (RTM_GETSTATS, [RTM_GETLINK, RTM_GETSTATS, RTM_GETSTATS, RTM_GETSTATS]),
    ],
)
def test_interrupted_dump_is_retried(veth_pair: VethPair, kind: int, requests: list[int]) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    fake_events(dumper)
    sock = InterruptingSocket(dumper._sock, kind, failures=2)
    dumper._sock = sock  # type: ignore[assignment]
    try:
        links = dumper.dump_links()
    finally:
        dumper.close()

    assert {link.name for link in links} == {"lo", veth_pair.device}
    assert sock.requests == requests


def test_dump_interrupted_three_times_fails_with_eintr(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    dumper._sock = InterruptingSocket(dumper._sock, RTM_GETLINK, failures=3)  # type: ignore[assignment]
    try:
        with pytest.raises(OSError, match="interrupted") as raised:
            dumper.dump_links()
        links = dumper.dump_links()
    finally:
        dumper.close()

    assert raised.value.errno == errno.EINTR
    # Each interrupted dump was read to its end: the next one starts clean.
    assert {link.name for link in links} == {"lo", veth_pair.device}


def test_link_dump_is_redone_only_after_a_link_event(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    events = fake_events(dumper)
    sock = InterruptingSocket(dumper._sock, RTM_GETLINK, failures=0)
    dumper._sock = sock  # type: ignore[assignment]
    try:
        dumps = [dumper.dump_links(), dumper.dump_links()]
        events.pending = 2
        dumps.append(dumper.dump_links())
        events.overflowed = True
        dumps.append(dumper.dump_links())
    finally:
        dumper.close()

    assert sock.requests == [
        RTM_GETLINK, RTM_GETSTATS,
        RTM_GETSTATS,
        RTM_GETLINK, RTM_GETSTATS,
        RTM_GETLINK, RTM_GETSTATS,
    ]  # fmt: skip
    assert all({link.name for link in links} == {"lo", veth_pair.device} for links in dumps)


def test_link_changes_show_on_the_next_dump(veth_pair: VethPair) -> None:
    dumper = NetlinkLinkDumper(netns=veth_pair.netns)
    iproute = IPRoute(groups=0, netns=veth_pair.netns, flags=0)
    try:
        before = {link.name: link for link in dumper.dump_links()}
        iproute.link("set", index=before[veth_pair.device].index, mtu=1400)
        iproute.link("add", ifname="fabnewa", kind="veth", peer="fabnewb")
        after = {link.name: link for link in dumper.dump_links()}
    finally:
        iproute.close()
        dumper.close()

    assert before[veth_pair.device].mtu == 1500
    assert after[veth_pair.device].mtu == 1400
    assert set(after) == {"lo", veth_pair.device, "fabnewa", "fabnewb"}


class ScriptedSocket:
    """Stands in for the kernel: answers each dump request with the datagrams
    `answer(request type, sequence number)` builds."""

    def __init__(self, answer: Callable[[int, int], list[bytes]]) -> None:
        self.answer = answer
        self.datagrams: list[bytes] = []

    def send(self, data: bytes) -> int:
        (kind,) = struct.unpack_from("=H", data, 4)
        (seq,) = struct.unpack_from("=I", data, 8)
        self.datagrams.extend(self.answer(kind, seq))
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        datagram = self.datagrams[0] if flags & socket.MSG_PEEK else self.datagrams.pop(0)
        size = min(len(buffer), len(datagram))
        buffer[:size] = datagram[:size]
        return len(datagram) if flags & socket.MSG_TRUNC else size

    def close(self) -> None:
        pass


def netlink_message(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    message = struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload
    return message + b"\0" * (-len(message) % 4)


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def newlink(seq: int, index: int, name: str, *, operstate: int = 6, mtu: int = 1500) -> bytes:
    """RTM_NEWLINK as the kernel sends it: name, txqlen, operstate, linkmode, mtu, ..."""
    attrs = (
        attribute(3, name.encode() + b"\0")
        + attribute(13, struct.pack("=I", 1000))
        + attribute(16, bytes([operstate]))
        + attribute(17, bytes([0]))
        + attribute(4, struct.pack("=I", mtu))
        + attribute(18, attribute(1, b"veth\0"))  # IFLA_LINKINFO: not read
    )
    ifinfomsg = struct.pack("=BxHiII", 0, 1, index, 0, 0)
    return netlink_message(RTM_NEWLINK, seq, ifinfomsg + attrs, flags=NLM_F_MULTI)


def newstats(seq: int, index: int, base: int | None, *, pad: bool = False) -> bytes:
    """RTM_NEWSTATS with IFLA_STATS_LINK_64 counting base+1, base+2, ... in the kernel's
    field order (rx_packets, tx_packets, rx_bytes, tx_bytes, rx_errors, ...); none when
    `base` is None."""
    attrs = attribute(0, b"") if pad else b""  # IFLA_STATS_UNSPEC, as 64-bit alignment pads
    if base is not None:
        attrs += attribute(1, struct.pack("=24Q", *range(base + 1, base + 25)))
    if_stats_msg = struct.pack("=BxHII", 0, 0, index, 1)
    return netlink_message(RTM_NEWSTATS, seq, if_stats_msg + attrs, flags=NLM_F_MULTI)


def done(seq: int, code: int = 0) -> bytes:
    return netlink_message(NLMSG_DONE, seq, struct.pack("=i", code), flags=NLM_F_MULTI)


def scripted_dumper(answer: Callable[[int, int], list[bytes]]) -> NetlinkLinkDumper:
    dumper = NetlinkLinkDumper()
    dumper._sock.close()
    dumper._sock = ScriptedSocket(answer)  # type: ignore[assignment]
    fake_events(dumper)
    return dumper


def test_links_join_attributes_and_counters_by_index() -> None:
    def answer(kind: int, seq: int) -> list[bytes]:
        if kind == RTM_GETLINK:
            return [
                newlink(seq, 1, "lo", operstate=0, mtu=65536) + newlink(seq, 4, "eth2"),
                done(seq),
            ]
        return [newstats(seq, 4, 1000, pad=True), newstats(seq, 1, 0) + done(seq)]

    links = scripted_dumper(answer).dump_links()

    assert [(link.name, link.operstate, link.mtu) for link in links] == [
        ("lo", "unknown", 65536),
        ("eth2", "up", 1500),
    ]
    assert links[1].index == 4
    assert links[1].stats == LinkStats(
        rx_packets=1001,
        tx_packets=1002,
        rx_bytes=1003,
        tx_bytes=1004,
        rx_errors=1005,
        tx_errors=1006,
        rx_dropped=1007,
        tx_dropped=1008,
    )


def test_link_deleted_between_the_two_dumps_is_left_out() -> None:
    def answer(kind: int, seq: int) -> list[bytes]:
        if kind == RTM_GETLINK:
            return [newlink(seq, 4, "eth2") + newlink(seq, 9, "vethgone") + done(seq)]
        return [newstats(seq, 4, 0) + done(seq)]

    links = scripted_dumper(answer).dump_links()

    assert [link.name for link in links] == ["eth2"]


def test_dump_the_kernel_fails_raises_with_its_errno() -> None:
    dumper = scripted_dumper(lambda kind, seq: [newlink(seq, 1, "lo"), done(seq, -errno.ENOBUFS)])

    with pytest.raises(OSError, match="No buffer space") as raised:
        dumper.dump_links()

    assert raised.value.errno == errno.ENOBUFS


def test_counters_missing_fail_the_dump_after_reading_it_to_the_end() -> None:
    stats_answers = [
        lambda seq: [newstats(seq, 1, None), newstats(seq, 4, 0), done(seq)],
        lambda seq: [newstats(seq, 1, 0), newstats(seq, 4, 0), done(seq)],
    ]

    def answer(kind: int, seq: int) -> list[bytes]:
        if kind == RTM_GETLINK:
            return [newlink(seq, 1, "lo") + newlink(seq, 4, "eth2") + done(seq)]
        return stats_answers.pop(0)(seq)

    dumper = scripted_dumper(answer)

    with pytest.raises(OSError, match="ifindex 1 has no IFLA_STATS_LINK_64") as raised:
        dumper.dump_links()
    links = dumper.dump_links()

    assert raised.value.errno == errno.EPROTO
    assert [link.name for link in links] == ["lo", "eth2"]
