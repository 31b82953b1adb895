"""RDMA port counters from `<sysfs>/class/infiniband/<dev>/ports/<n>/`, the `rdma`
section."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.node.collectors.base import CollectorContext, Section, SnapshotField, Tick, register
from agent.node.errors import CollectorError
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.proto.fabric.v1 import telemetry_pb2

# port_xmit_data and port_rcv_data count 32-bit words (IBTA PortCounters), not bytes.
_DATA_WORD_BYTES = 4
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec")


@dataclass(frozen=True, slots=True)
class RdmaPortSample:
    """One HCA port at one tick."""

    device: str
    port: int
    # Logical port state without its number: ACTIVE, DOWN, INIT, ARMED.
    state: str
    link_layer: str
    # The netdev on this port (RoCE's Ethernet interface, IPoIB's ib*); None when absent.
    netdev: str | None
    rate_bps: int | None
    receive_bytes: int
    transmit_bytes: int
    receive_packets: int
    transmit_packets: int
    transmit_discards: int
    receive_errors: int
    symbol_errors: int
    link_downed: int
    # RoCE congestion counters from hw_counters/; None where the HCA has none (IB ports).
    cnp_sent: int | None
    cnp_handled: int | None
    ecn_marked_packets: int | None
    out_of_buffer: int | None

    @property
    def up(self) -> bool:
        return self.state == "ACTIVE"


RDMA = Section(
    "rdma",
    RdmaPortSample,
    snapshot_field=SnapshotField("rdma_ports", telemetry_pb2.RdmaPortSample),
)


@dataclass(frozen=True, slots=True)
class RdmaOptions:
    """What the RDMA collector takes from the configuration."""

    sysfs_root: Path


class RdmaCollector:
    name = "rdma"
    sections = (RDMA,)

    def __init__(self, sysfs_root: Path) -> None:
        self._class_dir = sysfs_root / "class" / "infiniband"

    def collect(self, tick: Tick) -> tuple[RdmaPortSample, ...]:
        try:
            devices = sorted(self._class_dir.iterdir())
        except FileNotFoundError:
            # No RDMA driver loaded: nothing to report, not a failure.
            return ()
        except OSError as exc:
            raise CollectorError(f"{self._class_dir}: cannot list RDMA devices: {exc}") from exc
        samples: list[RdmaPortSample] = []
        for device in devices:
            ports_dir = device / "ports"
            try:
                ports = sorted(ports_dir.iterdir(), key=_port_number)
            except OSError as exc:
                raise CollectorError(f"{ports_dir}: cannot list ports: {exc}") from exc
            for port_dir in ports:
                samples.append(_read_port(device, port_dir))
        return tuple(samples)

    def metrics(self, samples: Sequence[RdmaPortSample]) -> Iterable[Family]:
        labels = ["device", "port"]
        for attr, name, doc in _COUNTERS:
            counter = CounterFamily(name, doc, labels=labels)
            for s in samples:
                value = getattr(s, attr)
                if value is not None:
                    counter.add_metric([s.device, str(s.port)], value)
            yield counter
        up = GaugeFamily("fabric_rdma_port_up", "1 when the port state is ACTIVE.", labels=labels)
        info = GaugeFamily(
            "fabric_rdma_port_info",
            "Port state, link layer and netdev (empty when none); always 1.",
            labels=[*labels, "state", "link_layer", "netdev"],
        )
        rate = GaugeFamily(
            "fabric_rdma_port_rate_bytes_per_second",
            "Port signalling rate in bytes (Prometheus base unit); absent when unknown.",
            labels=labels,
        )
        for s in samples:
            port = str(s.port)
            up.add_metric([s.device, port], 1.0 if s.up else 0.0)
            info.add_metric([s.device, port, s.state, s.link_layer, s.netdev or ""], 1.0)
            if s.rate_bps is not None:
                rate.add_metric([s.device, port], s.rate_bps / 8)
        yield from (up, info, rate)

    def close(self) -> None:
        pass


_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("receive_bytes", "fabric_rdma_port_receive_bytes_total", "Data bytes received."),
    ("transmit_bytes", "fabric_rdma_port_transmit_bytes_total", "Data bytes transmitted."),
    ("receive_packets", "fabric_rdma_port_receive_packets_total", "Packets received."),
    ("transmit_packets", "fabric_rdma_port_transmit_packets_total", "Packets transmitted."),
    (
        "transmit_discards",
        "fabric_rdma_port_transmit_discards_total",
        "Outbound packets discarded (port down or congested).",
    ),
    ("receive_errors", "fabric_rdma_port_receive_errors_total", "Received packets with errors."),
    ("symbol_errors", "fabric_rdma_port_symbol_errors_total", "Minor link errors on the port."),
    (
        "link_downed",
        "fabric_rdma_port_link_downed_total",
        "Times the link error recovery process failed and the link went down.",
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


def _port_number(port_dir: Path) -> int:
    try:
        return int(port_dir.name)
    except ValueError:
        raise CollectorError(f"{port_dir}: port directory is not a number") from None


def _read_port(device: Path, port_dir: Path) -> RdmaPortSample:
    # Plain string paths and os.read: this runs for every port every tick, and pathlib
    # plus text-mode files cost about three times as much per file.
    base = str(port_dir)
    counters = f"{base}/counters/"
    hw = f"{base}/hw_counters/"
    port = _port_number(port_dir)
    return RdmaPortSample(
        device=device.name,
        port=port,
        state=_read_state(f"{base}/state"),
        link_layer=_read_text(f"{base}/link_layer"),
        netdev=_port_netdev(device, port),
        rate_bps=_read_rate(f"{base}/rate"),
        receive_bytes=_read_counter(counters + "port_rcv_data") * _DATA_WORD_BYTES,
        transmit_bytes=_read_counter(counters + "port_xmit_data") * _DATA_WORD_BYTES,
        receive_packets=_read_counter(counters + "port_rcv_packets"),
        transmit_packets=_read_counter(counters + "port_xmit_packets"),
        transmit_discards=_read_counter(counters + "port_xmit_discards"),
        receive_errors=_read_counter(counters + "port_rcv_errors"),
        symbol_errors=_read_counter(counters + "symbol_error"),
        link_downed=_read_counter(counters + "link_downed"),
        cnp_sent=_read_optional_counter(hw + "np_cnp_sent"),
        cnp_handled=_read_optional_counter(hw + "rp_cnp_handled"),
        ecn_marked_packets=_read_optional_counter(hw + "np_ecn_marked_roce_packets"),
        out_of_buffer=_read_optional_counter(hw + "out_of_buffer"),
    )


def _read_file(path: str) -> str:
    """A sysfs attribute's value, stripped. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # sysfs attributes are at most a page.
        return os.read(fd, 4096).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)


def _read_optional_text(path: str) -> str | None:
    try:
        return _read_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CollectorError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _read_text(path: str) -> str:
    text = _read_optional_text(path)
    if text is None:
        raise CollectorError(f"{path}: cannot read: No such file or directory")
    return text


def _read_counter(path: str) -> int:
    return _parse_counter(path, _read_text(path))


def _read_optional_counter(path: str) -> int | None:
    # Only absence means "this HCA has no such counter"; a file that exists but cannot
    # be read is a failure like any other counter.
    text = _read_optional_text(path)
    return None if text is None else _parse_counter(path, text)


def _parse_counter(path: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CollectorError(f"{path}: counter value {text!r} is not a number") from None


def _read_state(path: str) -> str:
    # "4: ACTIVE" -> "ACTIVE"
    text = _read_text(path)
    _, colon, state = text.partition(":")
    return state.strip() if colon else text


def _read_rate(path: str) -> int | None:
    try:
        text = _read_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Some drivers refuse the rate of a port without a link.
        if exc.errno == errno.EINVAL:
            return None
        raise CollectorError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    match = _RATE.match(text)
    if match is None:
        raise CollectorError(f"{path}: rate {text!r} is not 'N Gb/sec (...)'")
    return round(float(match.group(1)) * 1e9)


def _port_netdev(device: Path, port: int) -> str | None:
    """The netdev under the HCA's PCI device whose port index is this port's.

    `dev_port` is the port index since Linux 3.15; older drivers put it in `dev_id` (hex).
    """
    net_dir = f"{device}/device/net"
    try:
        candidates = sorted(os.listdir(net_dir))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CollectorError(f"{net_dir}: cannot list netdevs: {exc.strerror or exc}") from exc
    for netdev in candidates:
        if _netdev_port_index(f"{net_dir}/{netdev}") == port - 1:
            return netdev
    return None


def _netdev_port_index(netdev_dir: str) -> int | None:
    for attr, base in (("dev_port", 10), ("dev_id", 16)):
        path = f"{netdev_dir}/{attr}"
        text = _read_optional_text(path)
        if text is None:
            continue
        try:
            return int(text, base)
        except ValueError:
            raise CollectorError(f"{path}: {attr} {text!r} is not a number") from None
    return None


@register(RdmaCollector, options=RdmaOptions)
def _create(context: CollectorContext[RdmaOptions]) -> RdmaCollector:
    return RdmaCollector(context.options.sysfs_root)
