"""NIC counters, the `nic` section: a netlink dump of every link each tick
(agent.node.netlink), link speed from sysfs."""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.common import rates
from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    register,
)
from agent.node.config import interface_selected
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.netlink import Link, LinkDumper, NetlinkLinkDumper
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

log = logging.getLogger(__name__)

# What reading `speed` fails with when the kernel has no speed to give: the link is not
# running (EINVAL), the driver has no link settings (EOPNOTSUPP, e.g. tun), or the
# device is going away (ENODEV).
_NO_SPEED_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV})


@dataclass(frozen=True, slots=True)
class NicSample:
    """One interface at one tick. Counters are the kernel's 64-bit totals."""

    device: str
    ifindex: int
    operstate: str
    mtu_bytes: int
    speed_bps: int | None
    receive_bytes: int
    transmit_bytes: int
    receive_packets: int
    transmit_packets: int
    receive_errors: int
    transmit_errors: int
    receive_drops: int
    transmit_drops: int

    @property
    def up(self) -> bool:
        return self.operstate == "up"


class NicSummarizer:
    """Each interface's state in the fleet summary, its receive and transmit rates and
    its errors and drops since the previous summary."""

    def __init__(self) -> None:
        self._at_s: float | None = None
        # By name and ifindex: a re-created interface gets a new ifindex and counters
        # from zero, so it is a new device.
        # -> receive bytes, transmit bytes, errors, drops
        self._counters: dict[tuple[str, int], tuple[int, int, int, int]] = {}

    def summarize(
        self, samples: tuple[NicSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        elapsed_s = clock.elapsed_s(self._at_s)
        counters: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        for sample in samples:
            key = (sample.device, sample.ifindex)
            now = (
                sample.receive_bytes,
                sample.transmit_bytes,
                sample.receive_errors + sample.transmit_errors,
                sample.receive_drops + sample.transmit_drops,
            )
            counters[key] = now
            message = summary.nics.add(device=sample.device, operstate=sample.operstate)
            before = self._counters.get(key)
            if before is None:
                continue
            message.receive_bytes_per_second = rates.rate(now[0], before[0], elapsed_s) or 0.0
            message.transmit_bytes_per_second = rates.rate(now[1], before[1], elapsed_s) or 0.0
            message.errors = rates.increase(now[2], before[2])
            message.drops = rates.increase(now[3], before[3])
        self._at_s = clock.completed_wall_s
        self._counters = counters


NIC = Section(
    "nic",
    NicSample,
    snapshot_field=SnapshotField("nics", telemetry_pb2.NicSample),
    summarizer=NicSummarizer,
)


@dataclass(frozen=True, slots=True)
class NicOptions:
    """What the NIC collector takes from the configuration."""

    sysfs_root: Path
    # Glob patterns over interface names; '!' excludes (agent.node.config).
    interfaces: tuple[str, ...]


class NicCollector:
    name = "nic"
    sections = (NIC,)

    def __init__(self, options: NicOptions, links: LinkDumper) -> None:
        self._patterns = options.interfaces
        self._links = links
        self._net_root = options.sysfs_root / "class" / "net"
        self._includes = tuple(p for p in options.interfaces if not p.startswith("!"))
        # Selection depends on the set of names only, which changes rarely: recompute it
        # and the unmatched-pattern check when the names change, not every tick.
        self._names: tuple[str, ...] = ()
        self._selected: frozenset[str] = frozenset()
        self._unmatched: set[str] = set()

    def collect(self, tick: Tick) -> tuple[NicSample, ...]:
        try:
            links = self._links.dump_links()
        except OSError as exc:
            raise CollectorError(f"netlink link dump failed: {exc}") from exc
        names = tuple(link.name for link in links)
        if names != self._names:
            self._names = names
            self._selected = frozenset(n for n in names if interface_selected(self._patterns, n))
            self._check_patterns(names)
        # Keyed by name: a repeated series would make the whole scrape invalid, whatever
        # a dumper returns.
        selected = {link.name: link for link in links if link.name in self._selected}
        return tuple(self._sample(link, self._speed_bps(link.name)) for link in selected.values())

    def _check_patterns(self, names: Sequence[str]) -> None:
        """Warn once when an include pattern stops matching any interface, and say when it
        matches again, so a typo in `interfaces` is visible without flooding the log."""
        for pattern in self._includes:
            matched = any(fnmatch.fnmatchcase(name, pattern) for name in names)
            if not matched and pattern not in self._unmatched:
                self._unmatched.add(pattern)
                log.warning("interface pattern %r matches no interface on this host", pattern)
            elif matched and pattern in self._unmatched:
                self._unmatched.discard(pattern)
                log.info("interface pattern %r now matches an interface", pattern)

    def _speed_bps(self, device: str) -> int | None:
        path = f"{self._net_root}/{device}/speed"
        try:
            # os.read rather than pathlib: this runs for every interface every tick.
            fd = os.open(path, os.O_RDONLY)
            try:
                text = os.read(fd, 64).decode("ascii", errors="replace").strip()
            finally:
                os.close(fd)
        except FileNotFoundError:
            # The interface went away between the dump and this read.
            return None
        except OSError as exc:
            if exc.errno in _NO_SPEED_ERRNOS:
                return None
            raise CollectorError(f"{path}: cannot read link speed: {exc}") from exc
        try:
            mbps = int(text)
        except ValueError:
            raise CollectorError(f"{path}: link speed {text!r} is not a number") from None
        # SPEED_UNKNOWN is -1: a link without carrier on most drivers.
        return mbps * 1_000_000 if mbps >= 0 else None

    @staticmethod
    def _sample(link: Link, speed_bps: int | None) -> NicSample:
        stats = link.stats
        return NicSample(
            device=link.name,
            ifindex=link.index,
            operstate=link.operstate,
            mtu_bytes=link.mtu,
            speed_bps=speed_bps,
            receive_bytes=stats.rx_bytes,
            transmit_bytes=stats.tx_bytes,
            receive_packets=stats.rx_packets,
            transmit_packets=stats.tx_packets,
            receive_errors=stats.rx_errors,
            transmit_errors=stats.tx_errors,
            receive_drops=stats.rx_dropped,
            transmit_drops=stats.tx_dropped,
        )

    def metrics(self, samples: Sequence[NicSample]) -> Iterable[Family]:
        for attr, name, doc in _COUNTERS:
            counter = CounterFamily(name, doc, labels=["device"])
            for s in samples:
                counter.add_metric([s.device], getattr(s, attr))
            yield counter
        up = GaugeFamily(
            "fabric_nic_up", "1 when the interface's operstate is up.", labels=["device"]
        )
        info = GaugeFamily(
            "fabric_nic_info", "Interface state; always 1.", labels=["device", "operstate"]
        )
        mtu = GaugeFamily("fabric_nic_mtu_bytes", "Interface MTU.", labels=["device"])
        speed = GaugeFamily(
            "fabric_nic_speed_bytes_per_second",
            "Negotiated link speed in bytes (Prometheus base unit); absent while the link is "
            "down or the speed is unknown.",
            labels=["device"],
        )
        for s in samples:
            up.add_metric([s.device], 1.0 if s.up else 0.0)
            info.add_metric([s.device, s.operstate], 1.0)
            mtu.add_metric([s.device], s.mtu_bytes)
            if s.speed_bps is not None:
                speed.add_metric([s.device], s.speed_bps / 8)
        yield from (up, info, mtu, speed)

    def close(self) -> None:
        self._links.close()


_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("receive_bytes", "fabric_nic_receive_bytes_total", "Bytes received."),
    ("transmit_bytes", "fabric_nic_transmit_bytes_total", "Bytes transmitted."),
    ("receive_packets", "fabric_nic_receive_packets_total", "Packets received."),
    ("transmit_packets", "fabric_nic_transmit_packets_total", "Packets transmitted."),
    ("receive_errors", "fabric_nic_receive_errors_total", "Receive errors."),
    ("transmit_errors", "fabric_nic_transmit_errors_total", "Transmit errors."),
    ("receive_drops", "fabric_nic_receive_drops_total", "Received packets dropped."),
    ("transmit_drops", "fabric_nic_transmit_drops_total", "Packets dropped on transmit."),
)


@register(NicCollector, options=NicOptions)
def _create(context: CollectorContext[NicOptions]) -> NicCollector:
    try:
        links = NetlinkLinkDumper()
    except OSError as exc:
        raise CollectorError(f"cannot open a netlink socket: {exc}") from exc
    return NicCollector(context.options, links)
