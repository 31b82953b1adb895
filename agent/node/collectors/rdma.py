"""RDMA port counters from `<sysfs>/class/infiniband/<dev>/ports/<n>/`, the `rdma`
section, and each HCA's identity, the `rdma_devices` section.

Partial results: HCAs differ in what they expose (an mlx4 port without `symbol_error`, an
i40iw whose counters read "N/A (no PMA)", an irdma port without `counters/`), so a missing
file or an "N/A" value omits that value only. A file or directory that exists but cannot
be read (an I/O error, not a regular file, a value that is no counter) omits that value
and is counted in the device's `read_errors`; a port whose `state` cannot be read, or a
device whose `ports/` cannot be listed, omits only that port or device. The collector
fails only when the class directory itself cannot be listed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from agent.node.collectors.base import CollectorContext, Section, SnapshotField, Tick, register
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.proto.fabric.v1 import telemetry_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

# port_xmit_data and port_rcv_data (and counters_ext/*_data_64) count 32-bit words
# (IBTA PortCounters: octets divided by 4), not bytes.
_DATA_WORD_BYTES = 4
# "100 Gb/sec (4X EDR)"; an mlx5 port with an empty cage reads "0 GB/sec".
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*G[bB]/sec")
# sysfs attributes are at most a page; a longer file is not one.
_MAX_ATTRIBUTE_BYTES = 4096
# hw_counters/ files read per port: mlx5 has about 40, irdma about 80.
MAX_HW_COUNTERS = 256
# No sysfs directory the collector lists comes near this; a larger one is not sysfs.
_MAX_DIRECTORY_ENTRIES = 4096
# Largest value a uint64 counter (and the wire) can carry.
_MAX_COUNTER = 2**64 - 1
# hw_counters/lifespan is the driver's cache period in milliseconds, not a counter.
_NOT_HW_COUNTERS = frozenset({"lifespan"})
_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RdmaPortSample:
    """One HCA port at one tick. A counter is None where the port does not have it (the
    file is absent or reads "N/A") or where it could not be read."""

    device: str
    port: int
    # Logical port state without its number: ACTIVE, DOWN, INIT, ARMED.
    state: str
    # InfiniBand or Ethernet (RoCE, iWARP); "" when the file is absent.
    link_layer: str
    # The netdev on this port (RoCE's Ethernet interface, IPoIB's ib*); None when absent.
    netdev: str | None
    # 0 for a port without a link ("0 GB/sec", an empty cage); None when unknown.
    rate_bps: int | None
    # Physical port state without its number: LinkUp, Polling, Disabled, ...
    phys_state: str | None = None
    receive_bytes: int | None = None
    transmit_bytes: int | None = None
    receive_packets: int | None = None
    transmit_packets: int | None = None
    unicast_receive_packets: int | None = None
    unicast_transmit_packets: int | None = None
    multicast_receive_packets: int | None = None
    multicast_transmit_packets: int | None = None
    transmit_discards: int | None = None
    receive_discards: int | None = None
    # port_xmit_wait: ticks with data to send and no flow-control credit.
    transmit_wait: int | None = None
    receive_errors: int | None = None
    symbol_errors: int | None = None
    link_downed: int | None = None
    link_error_recovery: int | None = None
    local_link_integrity_errors: int | None = None
    excessive_buffer_overrun_errors: int | None = None
    receive_constraint_errors: int | None = None
    transmit_constraint_errors: int | None = None
    # RoCE congestion counters from hw_counters/; None where the HCA has none (IB ports).
    cnp_sent: int | None = None
    cnp_handled: int | None = None
    ecn_marked_packets: int | None = None
    out_of_buffer: int | None = None
    # Every readable integer of hw_counters/, by file name, as the driver counts it.
    hw_counters: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    @property
    def up(self) -> bool:
        return self.state == "ACTIVE"


@dataclass(frozen=True, slots=True)
class RdmaDeviceSample:
    """One HCA at one tick: its identity (None where the driver has no such file) and the
    reads of its files that have failed since the agent started."""

    device: str
    board_id: str | None
    fw_version: str | None
    hca_type: str | None
    node_guid: str | None
    read_errors: int


RDMA = Section(
    "rdma",
    RdmaPortSample,
    snapshot_field=SnapshotField("rdma_ports", telemetry_pb2.RdmaPortSample),
)
# On /metrics only: the gRPC snapshot has no field for it.
RDMA_DEVICES = Section("rdma_devices", RdmaDeviceSample, exported=False)


@dataclass(frozen=True, slots=True)
class RdmaOptions:
    """What the RDMA collector takes from the configuration."""

    sysfs_root: Path


class RdmaCollector:
    name = "rdma"
    sections = (RDMA, RDMA_DEVICES)

    def __init__(self, sysfs_root: Path) -> None:
        self._class_dir = sysfs_root / "class" / "infiniband"
        self._read_errors: dict[str, int] = {}
        # Devices whose last tick had a failed read: logged when they start and stop.
        self._failing: set[str] = set()

    def collect(self, tick: Tick) -> tuple[RdmaPortSample | RdmaDeviceSample, ...]:
        try:
            devices = sorted(os.listdir(self._class_dir))
        except FileNotFoundError:
            # No RDMA driver loaded: nothing to report, not a failure.
            return ()
        except OSError as exc:
            raise CollectorError(f"{self._class_dir}: cannot list RDMA devices: {exc}") from exc
        ports: list[RdmaPortSample] = []
        infos: list[RdmaDeviceSample] = []
        read_errors: dict[str, int] = {}
        for name in devices:
            reads = _Reads(f"{self._class_dir}/{name}")
            ports.extend(_read_device_ports(name, reads))
            board_id = reads.text("board_id")
            fw_version = reads.text("fw_ver")
            hca_type = reads.text("hca_type")
            node_guid = reads.text("node_guid")
            errors = self._read_errors.get(name, 0) + len(reads.failures)
            read_errors[name] = errors
            infos.append(RdmaDeviceSample(name, board_id, fw_version, hca_type, node_guid, errors))
            self._note_failures(name, reads.failures)
        # Only devices present now: a removed HCA's count goes with it.
        self._read_errors = read_errors
        self._failing &= read_errors.keys()
        return (*ports, *infos)

    def _note_failures(self, device: str, failures: list[str]) -> None:
        if failures and device not in self._failing:
            self._failing.add(device)
            log.warning(
                "RDMA device %s: %d read(s) failed, its other values are reported: %s",
                device,
                len(failures),
                "; ".join(failures[:3]),
            )
        elif not failures and device in self._failing:
            self._failing.discard(device)
            log.info("RDMA device %s: every read succeeds again", device)

    def metrics(self, samples: Sequence[RdmaPortSample | RdmaDeviceSample]) -> Iterable[Family]:
        ports = RDMA.select(samples)
        devices = RDMA_DEVICES.select(samples)
        labels = ["device", "port"]
        for attr, name, doc in _COUNTERS:
            counter = CounterFamily(name, doc, labels=labels)
            for s in ports:
                value = getattr(s, attr)
                if value is not None:
                    counter.add_metric([s.device, str(s.port)], value)
            yield counter
        hw = CounterFamily(
            "fabric_rdma_hw_stat_total",
            "Every integer file of the port's hw_counters/ directory (the kernel's hw "
            "stats), by file name, as the driver counts it.",
            labels=[*labels, "counter"],
        )
        up = GaugeFamily("fabric_rdma_port_up", "1 when the port state is ACTIVE.", labels=labels)
        info = GaugeFamily(
            "fabric_rdma_port_info",
            "Port state, physical state, link layer and netdev (empty when none); always 1.",
            labels=[*labels, "state", "phys_state", "link_layer", "netdev"],
        )
        rate = GaugeFamily(
            "fabric_rdma_port_rate_bytes_per_second",
            "Port signalling rate in bytes (Prometheus base unit); 0 without a link, absent "
            "when unknown.",
            labels=labels,
        )
        for s in ports:
            port = str(s.port)
            for counter_name, value in s.hw_counters.items():
                hw.add_metric([s.device, port, counter_name], value)
            up.add_metric([s.device, port], 1.0 if s.up else 0.0)
            info.add_metric(
                [s.device, port, s.state, s.phys_state or "", s.link_layer, s.netdev or ""], 1.0
            )
            if s.rate_bps is not None:
                rate.add_metric([s.device, port], s.rate_bps / 8)
        yield from (hw, up, info, rate)
        device_info = GaugeFamily(
            "fabric_rdma_device_info",
            "HCA board id, firmware version, type and node GUID (empty when the driver has "
            "none); always 1.",
            labels=["device", "board_id", "fw_version", "hca_type", "node_guid"],
        )
        read_errors = CounterFamily(
            "fabric_rdma_read_errors_total",
            "Reads of the HCA's sysfs files that failed (an I/O error, not a regular file, a "
            "value that is no counter); the values read are still reported.",
            labels=["device"],
        )
        for d in devices:
            device_info.add_metric(
                [
                    d.device,
                    d.board_id or "",
                    d.fw_version or "",
                    d.hca_type or "",
                    d.node_guid or "",
                ],
                1.0,
            )
            read_errors.add_metric([d.device], d.read_errors)
        yield from (device_info, read_errors)

    def close(self) -> None:
        pass


_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("receive_bytes", "fabric_rdma_port_receive_bytes_total", "Data bytes received."),
    ("transmit_bytes", "fabric_rdma_port_transmit_bytes_total", "Data bytes transmitted."),
    ("receive_packets", "fabric_rdma_port_receive_packets_total", "Packets received."),
    ("transmit_packets", "fabric_rdma_port_transmit_packets_total", "Packets transmitted."),
    (
        "unicast_receive_packets",
        "fabric_rdma_port_unicast_receive_packets_total",
        "Unicast packets received.",
    ),
    (
        "unicast_transmit_packets",
        "fabric_rdma_port_unicast_transmit_packets_total",
        "Unicast packets transmitted.",
    ),
    (
        "multicast_receive_packets",
        "fabric_rdma_port_multicast_receive_packets_total",
        "Multicast packets received.",
    ),
    (
        "multicast_transmit_packets",
        "fabric_rdma_port_multicast_transmit_packets_total",
        "Multicast packets transmitted.",
    ),
    (
        "transmit_discards",
        "fabric_rdma_port_transmit_discards_total",
        "Outbound packets discarded (port down or congested).",
    ),
    (
        "receive_discards",
        "fabric_rdma_port_receive_discards_total",
        "Inbound packets discarded (where the driver counts them).",
    ),
    (
        "transmit_wait",
        "fabric_rdma_port_transmit_wait_total",
        "Ticks during which the port had data to send but no flow-control credit "
        "(port_xmit_wait, the InfiniBand congestion signal).",
    ),
    ("receive_errors", "fabric_rdma_port_receive_errors_total", "Received packets with errors."),
    ("symbol_errors", "fabric_rdma_port_symbol_errors_total", "Minor link errors on the port."),
    (
        "link_downed",
        "fabric_rdma_port_link_downed_total",
        "Times the link error recovery process failed and the link went down.",
    ),
    (
        "link_error_recovery",
        "fabric_rdma_port_link_error_recovery_total",
        "Times the link error recovery process completed successfully.",
    ),
    (
        "local_link_integrity_errors",
        "fabric_rdma_port_local_link_integrity_errors_total",
        "Times the local physical errors exceeded their threshold.",
    ),
    (
        "excessive_buffer_overrun_errors",
        "fabric_rdma_port_excessive_buffer_overrun_errors_total",
        "Times consecutive flow-control update periods had a receive buffer overrun.",
    ),
    (
        "receive_constraint_errors",
        "fabric_rdma_port_receive_constraint_errors_total",
        "Received packets discarded for partition or raw-packet constraints.",
    ),
    (
        "transmit_constraint_errors",
        "fabric_rdma_port_transmit_constraint_errors_total",
        "Outbound packets not sent for partition or raw-packet constraints.",
    ),
    ("cnp_sent", "fabric_rdma_cnp_sent_total", "Congestion notification packets sent."),
    ("cnp_handled", "fabric_rdma_cnp_handled_total", "Congestion notification packets handled."),
    (
        "ecn_marked_packets",
        "fabric_rdma_ecn_marked_packets_total",
        "RoCE packets received with an ECN congestion mark.",
    ),
    (
        "out_of_buffer",
        "fabric_rdma_out_of_buffer_total",
        "Packets dropped for lack of receive buffers (WQEs).",
    ),
)

# Sample field, file under counters/; the data counters are in 4-byte words.
_PMA_COUNTERS: tuple[tuple[str, str], ...] = (
    ("receive_bytes", "port_rcv_data"),
    ("transmit_bytes", "port_xmit_data"),
    ("receive_packets", "port_rcv_packets"),
    ("transmit_packets", "port_xmit_packets"),
    ("unicast_receive_packets", "unicast_rcv_packets"),
    ("unicast_transmit_packets", "unicast_xmit_packets"),
    ("multicast_receive_packets", "multicast_rcv_packets"),
    ("multicast_transmit_packets", "multicast_xmit_packets"),
    ("transmit_discards", "port_xmit_discards"),
    ("receive_discards", "port_rcv_discards"),
    ("transmit_wait", "port_xmit_wait"),
    ("receive_errors", "port_rcv_errors"),
    ("symbol_errors", "symbol_error"),
    ("link_downed", "link_downed"),
    ("link_error_recovery", "link_error_recovery"),
    ("local_link_integrity_errors", "local_link_integrity_errors"),
    ("excessive_buffer_overrun_errors", "excessive_buffer_overrun_errors"),
    ("receive_constraint_errors", "port_rcv_constraint_errors"),
    ("transmit_constraint_errors", "port_xmit_constraint_errors"),
)
# Older kernels and drivers (mlx4 with OFED) put the 64-bit PortCountersExtended in
# counters_ext/ and leave 32-bit, saturating ones in counters/: these win where present.
_EXTENDED_COUNTERS: tuple[tuple[str, str], ...] = (
    ("receive_bytes", "port_rcv_data_64"),
    ("transmit_bytes", "port_xmit_data_64"),
    ("receive_packets", "port_rcv_packets_64"),
    ("transmit_packets", "port_xmit_packets_64"),
    ("unicast_receive_packets", "port_unicast_rcv_packets"),
    ("unicast_transmit_packets", "port_unicast_xmit_packets"),
    ("multicast_receive_packets", "port_multicast_rcv_packets"),
    ("multicast_transmit_packets", "port_multicast_xmit_packets"),
)
_WORD_COUNTERS = frozenset({"receive_bytes", "transmit_bytes"})
# Sample field, file under hw_counters/ (mlx5 RoCE).
_CONGESTION_COUNTERS: tuple[tuple[str, str], ...] = (
    ("cnp_sent", "np_cnp_sent"),
    ("cnp_handled", "rp_cnp_handled"),
    ("ecn_marked_packets", "np_ecn_marked_roce_packets"),
    ("out_of_buffer", "out_of_buffer"),
)


class _Reads:
    """Reads under one device directory on one tick, keeping its failures: a failure
    omits the value it concerns and is counted, it never ends the tick."""

    __slots__ = ("base", "failures")

    def __init__(self, base: str) -> None:
        self.base = base
        self.failures: list[str] = []

    def fail(self, path: str, reason: str) -> None:
        self.failures.append(f"{path}: {reason}")

    def required(self, read: Callable[[str], T | None], relative: str) -> T | None:
        """`read(relative)`, where absence is a failure too."""
        before = len(self.failures)
        value = read(relative)
        if value is None and len(self.failures) == before:
            self.fail(f"{self.base}/{relative}", "absent")
        return value

    def listing(self, relative: str) -> list[str] | None:
        """A directory's entries; None when it is absent, or cannot be listed or holds
        more than `_MAX_DIRECTORY_ENTRIES` (counted)."""
        path = f"{self.base}/{relative}"
        names: list[str] = []
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if len(names) == _MAX_DIRECTORY_ENTRIES:
                        self.fail(path, f"more than {_MAX_DIRECTORY_ENTRIES} entries")
                        return None
                    names.append(entry.name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.fail(path, f"cannot list: {exc.strerror or exc}")
            return None
        return names

    def text(self, relative: str) -> str | None:
        """An attribute's value, stripped; None when absent or unreadable (counted)."""
        path = f"{self.base}/{relative}"
        try:
            return _read_attribute(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.fail(path, f"cannot read: {exc.strerror or exc}")
            return None

    def counter(self, relative: str) -> int | None:
        """A counter's value; None when absent, "N/A", or not a counter (counted)."""
        text = self.text(relative)
        if text is None or text.startswith("N/A"):
            # "N/A (no PMA)": the kernel's answer for a device without a PMA (i40iw).
            return None
        if not text.isdigit() or len(text) > 20 or int(text) > _MAX_COUNTER:
            self.fail(f"{self.base}/{relative}", f"value {text[:40]!r} is not a counter")
            return None
        return int(text)


class _NotAnAttribute(OSError):
    """The path is there but holds no sysfs attribute (not a regular file, too large)."""


def _read_attribute(path: str) -> str:
    """A sysfs attribute's value, stripped. Raises OSError.

    Never blocks: opened non-blocking and read only when a regular file, so a FIFO or a
    device node where an attribute should be is a failed read, not a hung collector.
    """
    # Plain string paths and os.read: this runs for every counter every tick, and
    # pathlib plus text-mode files cost about three times as much per file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotAnAttribute(errno.EINVAL, "not a regular file", path)
        data = os.read(fd, _MAX_ATTRIBUTE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_ATTRIBUTE_BYTES:
        raise _NotAnAttribute(errno.EFBIG, f"larger than {_MAX_ATTRIBUTE_BYTES} bytes", path)
    return data.decode("ascii", errors="replace").strip()


def _read_device_ports(device: str, reads: _Reads) -> list[RdmaPortSample]:
    names = reads.required(reads.listing, "ports")
    if names is None:
        return []
    numbered: list[tuple[int, str]] = []
    for name in names:
        if name.isdigit():
            numbered.append((int(name), name))
        else:
            reads.fail(f"{reads.base}/ports/{name}", "port directory is not a number")
    samples = []
    for port, name in sorted(numbered):
        sample = _read_port(device, port, f"ports/{name}", reads)
        if sample is not None:
            samples.append(sample)
    return samples


def _read_port(device: str, port: int, relative: str, reads: _Reads) -> RdmaPortSample | None:
    # Every port has a state: without it this is no port we can describe.
    state_text = reads.required(reads.text, f"{relative}/state")
    if state_text is None:
        return None
    values: dict[str, Any] = {}
    counters = reads.listing(f"{relative}/counters")
    if counters is not None:
        present = set(counters)
        for attr, name in _PMA_COUNTERS:
            if name in present:
                values[attr] = reads.counter(f"{relative}/counters/{name}")
    extended = reads.listing(f"{relative}/counters_ext")
    if extended is not None:
        present = set(extended)
        for attr, name in _EXTENDED_COUNTERS:
            if name in present:
                value = reads.counter(f"{relative}/counters_ext/{name}")
                if value is not None:
                    values[attr] = value
    for attr in _WORD_COUNTERS:
        words = values.get(attr)
        if words is not None:
            values[attr] = words * _DATA_WORD_BYTES
    hw_counters = _read_hw_counters(f"{relative}/hw_counters", reads)
    for attr, name in _CONGESTION_COUNTERS:
        values[attr] = hw_counters.get(name)
    return RdmaPortSample(
        device=device,
        port=port,
        state=_after_number(state_text),
        link_layer=reads.text(f"{relative}/link_layer") or "",
        netdev=_port_netdev(port, reads),
        rate_bps=_read_rate(f"{relative}/rate", reads),
        phys_state=_optional_after_number(reads.text(f"{relative}/phys_state")),
        hw_counters=MappingProxyType(hw_counters) if hw_counters else _EMPTY,
        **values,
    )


def _read_hw_counters(relative: str, reads: _Reads) -> dict[str, int]:
    names = reads.listing(relative)
    if not names:
        return {}
    names = sorted(n for n in names if n not in _NOT_HW_COUNTERS)
    if len(names) > MAX_HW_COUNTERS:
        reads.fail(
            f"{reads.base}/{relative}",
            f"{len(names)} files, only the first {MAX_HW_COUNTERS} by name are read",
        )
        names = names[:MAX_HW_COUNTERS]
    values = {}
    for name in names:
        value = reads.counter(f"{relative}/{name}")
        if value is not None:
            values[name] = value
    return values


def _after_number(text: str) -> str:
    # "4: ACTIVE" -> "ACTIVE", "5: LinkUp" -> "LinkUp"
    _, colon, name = text.partition(":")
    return name.strip() if colon else text


def _optional_after_number(text: str | None) -> str | None:
    return None if text is None else _after_number(text)


def _read_rate(relative: str, reads: _Reads) -> int | None:
    path = f"{reads.base}/{relative}"
    try:
        text = _read_attribute(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Some drivers refuse the rate of a port without a link.
        if exc.errno == errno.EINVAL and not isinstance(exc, _NotAnAttribute):
            return None
        reads.fail(path, f"cannot read: {exc.strerror or exc}")
        return None
    match = _RATE.match(text)
    if match is None:
        reads.fail(path, f"rate {text[:40]!r} is not 'N Gb/sec (...)'")
        return None
    return round(float(match.group(1)) * 1e9)


def _port_netdev(port: int, reads: _Reads) -> str | None:
    """The netdev under the HCA's PCI device whose port index is this port's.

    `dev_port` is the port index since Linux 3.15; older drivers put it in `dev_id` (hex).
    """
    candidates = reads.listing("device/net")
    if candidates is None:
        return None
    for netdev in sorted(candidates):
        if _netdev_port_index(f"device/net/{netdev}", reads) == port - 1:
            return netdev
    return None


def _netdev_port_index(relative: str, reads: _Reads) -> int | None:
    for attr, base in (("dev_port", 10), ("dev_id", 16)):
        text = reads.text(f"{relative}/{attr}")
        if text is None:
            continue
        try:
            return int(text, base)
        except ValueError:
            reads.fail(f"{reads.base}/{relative}/{attr}", f"{attr} {text[:40]!r} is no number")
            return None
    return None


@register(RdmaCollector, options=RdmaOptions)
def _create(context: CollectorContext[RdmaOptions]) -> RdmaCollector:
    return RdmaCollector(context.options.sysfs_root)
