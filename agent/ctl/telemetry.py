"""`fabricctl telemetry [--section S,...] [--watch [--interval D]]`: the agent's latest
snapshot, or its snapshots as they are taken, as tables per section or as JSON.

Counters are cumulative in a snapshot; in `--watch` the NIC, RDMA and NVLink tables
add rates over the time between two consecutive snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from agent.ctl.client import EXIT_OK, UsageError
from agent.ctl.output import (
    human_bps,
    human_bytes,
    human_count,
    or_dash,
    percent,
    table,
    to_json,
)
from agent.proto.fabric.v1 import telemetry_pb2, telemetry_service_pb2, telemetry_service_pb2_grpc

# --section names, in the order their tables print.
SECTIONS: dict[str, telemetry_service_pb2.Section.ValueType] = {
    "gpu": telemetry_service_pb2.SECTION_GPU,
    "nvlink": telemetry_service_pb2.SECTION_NVLINK,
    "nic": telemetry_service_pb2.SECTION_NIC,
    "rdma": telemetry_service_pb2.SECTION_RDMA,
    "qos": telemetry_service_pb2.SECTION_QOS,
    "host": telemetry_service_pb2.SECTION_HOST,
}

Snapshot = telemetry_pb2.Snapshot
_T = TypeVar("_T")


def parse_sections(text: str | None) -> list[str]:
    """`gpu,nic` -> ['gpu', 'nic'] in table order; None or empty: every section."""
    if not text:
        return list(SECTIONS)
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(names - SECTIONS.keys())
    if unknown:
        raise UsageError(
            f"--section: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})"
        )
    return [name for name in SECTIONS if name in names]


def _request_sections(names: Sequence[str]) -> list[telemetry_service_pb2.Section.ValueType]:
    # Every section requested is the same as none: the agent sends all.
    return [] if len(names) == len(SECTIONS) else [SECTIONS[name] for name in names]


def get(channel: grpc.Channel, sections: Sequence[str], *, output: str, timeout_s: float) -> int:
    """Print the latest snapshot; raises grpc.RpcError."""
    stub = telemetry_service_pb2_grpc.TelemetryServiceStub(channel)
    request = telemetry_service_pb2.GetSnapshotRequest(sections=_request_sections(sections))
    response = stub.GetSnapshot(request, timeout=timeout_s)
    if output == "json":
        print(to_json(response.snapshot))
    else:
        print(render_snapshot(response.snapshot, sections))
    return EXIT_OK


def watch(
    channel: grpc.Channel, sections: Sequence[str], *, output: str, interval_s: float | None
) -> int:
    """Print snapshots as the agent streams them until the stream ends or Ctrl-C (exit
    0); raises grpc.RpcError."""
    if interval_s is not None and interval_s < 0:
        raise UsageError("--interval must not be negative")
    stub = telemetry_service_pb2_grpc.TelemetryServiceStub(channel)
    request = telemetry_service_pb2.WatchSnapshotsRequest(sections=_request_sections(sections))
    if interval_s is not None:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(interval_s * 1e9))
        request.interval.CopyFrom(interval)
    stream = stub.WatchSnapshots(request)
    previous: Snapshot | None = None
    try:
        for response in stream:
            if output == "json":
                print(to_json(response, one_line=True), flush=True)
            else:
                print(render_snapshot(response.snapshot, sections, previous, response.missed))
                print(flush=True)
            previous = response.snapshot
    except KeyboardInterrupt:
        stream.cancel()
    return EXIT_OK


def render_snapshot(
    snapshot: Snapshot,
    sections: Sequence[str] = tuple(SECTIONS),
    previous: Snapshot | None = None,
    missed: int = 0,
) -> str:
    """A header line, failed collectors, then one table per section (`(none)` when the
    node has nothing in it); rates against `previous` where given."""
    header = (
        f"node {snapshot.node_name}  seq {snapshot.seq}  agent {snapshot.agent_version}  "
        f"interval {snapshot.interval_seconds:g}s"
    )
    if missed:
        header += f"  (missed {missed} snapshot{'' if missed == 1 else 's'})"
    lines = [header]
    failed = [c for c in snapshot.collectors if not c.success]
    for status in failed:
        lines.append(f"collector {status.name} FAILED: {status.error}")
    seconds = _elapsed_s(snapshot, previous)
    renderers: dict[str, Callable[[], str]] = {
        "gpu": lambda: _gpus(snapshot),
        "nvlink": lambda: _nvlinks(snapshot, previous, seconds),
        "nic": lambda: _nics(snapshot, previous, seconds),
        "rdma": lambda: _rdma_ports(snapshot, previous, seconds),
        "qos": lambda: _qos_classes(snapshot),
        "host": lambda: _host(snapshot),
    }
    for name in sections:
        lines.append("")
        lines.append(f"{name.upper()}")
        lines.append(renderers[name]())
    return "\n".join(lines)


def _elapsed_s(snapshot: Snapshot, previous: Snapshot | None) -> float | None:
    if previous is None:
        return None
    seconds = snapshot.started_unix_seconds - previous.started_unix_seconds
    return seconds if seconds > 0 else None


def _rate_bps(now: int, then: int | None, seconds: float | None) -> str:
    if then is None or seconds is None or now < then:
        return "-"
    return human_bps((now - then) * 8 / seconds)


def _by_key(items: Iterable[_T], key: Callable[[_T], object]) -> dict[object, _T]:
    return {key(item): item for item in items}


def _gpus(snapshot: Snapshot) -> str:
    if not snapshot.gpus:
        return "(none)"
    rows = []
    for gpu in snapshot.gpus:
        memory = "-"
        if gpu.HasField("memory_used_bytes") and gpu.HasField("memory_total_bytes"):
            memory = f"{human_bytes(gpu.memory_used_bytes)}/{human_bytes(gpu.memory_total_bytes)}"
        power = f"{gpu.power_watts:.0f}W" if gpu.HasField("power_watts") else "-"
        if gpu.HasField("power_limit_watts"):
            power += f"/{gpu.power_limit_watts:.0f}W"
        util = percent(gpu.utilization_gpu_ratio) if gpu.HasField("utilization_gpu_ratio") else "-"
        temp = "-"
        if gpu.HasField("temperature_gpu_celsius"):
            temp = f"{gpu.temperature_gpu_celsius}C"
        state = "LOST" if gpu.lost else ("error: " + gpu.error if gpu.error else "ok")
        rows.append((str(gpu.index), or_dash(gpu.name), util, memory, power, temp, state))
    return table(("GPU", "NAME", "UTIL", "MEMORY", "POWER", "TEMP", "STATE"), rows)


def _nvlinks(snapshot: Snapshot, previous: Snapshot | None, seconds: float | None) -> str:
    """One row per GPU: links up, cumulative payload bytes, rates, error counters."""
    if not snapshot.nvlinks:
        return "(none)"
    per_gpu: dict[int, list[telemetry_pb2.NvLinkSample]] = {}
    for link in snapshot.nvlinks:
        per_gpu.setdefault(link.gpu, []).append(link)
    before: dict[int, tuple[int, int]] = {}
    if previous is not None:
        for link in previous.nvlinks:
            tx, rx = before.get(link.gpu, (0, 0))
            before[link.gpu] = (tx + link.transmit_bytes, rx + link.receive_bytes)
    rows = []
    for gpu, links in sorted(per_gpu.items()):
        up = sum(1 for link in links if link.up)
        tx = sum(link.transmit_bytes for link in links)
        rx = sum(link.receive_bytes for link in links)
        errors = sum(
            link.replay_errors + link.recovery_errors + link.crc_flit_errors + link.crc_data_errors
            for link in links
        )
        then = before.get(gpu)
        rows.append(
            (
                str(gpu),
                f"{up}/{len(links)}",
                human_bytes(tx),
                human_bytes(rx),
                _rate_bps(tx, then[0] if then else None, seconds),
                _rate_bps(rx, then[1] if then else None, seconds),
                str(errors),
            )
        )
    return table(("GPU", "LINKS-UP", "TX", "RX", "TX-RATE", "RX-RATE", "ERRORS"), rows)


def _nics(snapshot: Snapshot, previous: Snapshot | None, seconds: float | None) -> str:
    if not snapshot.nics:
        return "(none)"
    before = _by_key(previous.nics if previous else (), lambda n: n.device)
    rows = []
    for nic in snapshot.nics:
        then = before.get(nic.device)
        rows.append(
            (
                nic.device,
                or_dash(nic.operstate),
                human_bps(nic.speed_bps) if nic.HasField("speed_bps") else "-",
                str(nic.mtu_bytes),
                human_bytes(nic.receive_bytes),
                human_bytes(nic.transmit_bytes),
                _rate_bps(nic.receive_bytes, then.receive_bytes if then else None, seconds),
                _rate_bps(nic.transmit_bytes, then.transmit_bytes if then else None, seconds),
                str(nic.receive_errors + nic.transmit_errors),
                str(nic.receive_drops + nic.transmit_drops),
            )
        )
    header = ("NIC", "STATE", "SPEED", "MTU", "RX", "TX", "RX-RATE", "TX-RATE", "ERRORS", "DROPS")
    return table(header, rows)


def _rdma_ports(snapshot: Snapshot, previous: Snapshot | None, seconds: float | None) -> str:
    if not snapshot.rdma_ports:
        return "(none)"
    before = _by_key(previous.rdma_ports if previous else (), lambda p: (p.device, p.port))
    rows = []
    for port in snapshot.rdma_ports:
        then = before.get((port.device, port.port))
        cnp = f"{port.cnp_sent}/{port.cnp_handled}" if port.HasField("cnp_sent") else "-"
        rows.append(
            (
                f"{port.device}/{port.port}",
                or_dash(port.state),
                or_dash(port.link_layer),
                or_dash(port.netdev),
                human_bps(port.rate_bps) if port.HasField("rate_bps") else "-",
                human_bytes(port.receive_bytes),
                human_bytes(port.transmit_bytes),
                _rate_bps(port.receive_bytes, then.receive_bytes if then else None, seconds),
                _rate_bps(port.transmit_bytes, then.transmit_bytes if then else None, seconds),
                str(port.receive_errors + port.symbol_errors),
                cnp,
            )
        )
    header = ("PORT", "STATE", "LINK", "NETDEV", "RATE", "RX", "TX", "RX-RATE", "TX-RATE",
              "ERRORS", "CNP-SENT/HANDLED")  # fmt: skip
    return table(header, rows)


def _qos_classes(snapshot: Snapshot) -> str:
    if not snapshot.qos_classes:
        return "(none)"
    rows = [
        (
            cls.policy,
            cls.class_name,
            cls.device,
            human_bps(cls.rate_bps) if cls.HasField("rate_bps") else "-",
            human_bytes(cls.sent_bytes),
            str(cls.dropped_packets),
            str(cls.overlimits),
            human_bytes(cls.backlog_bytes),
        )
        for cls in snapshot.qos_classes
    ]
    header = ("POLICY", "CLASS", "DEVICE", "THROUGHPUT", "SENT", "DROPS", "OVERLIMITS", "BACKLOG")
    return table(header, rows)


def _host(snapshot: Snapshot) -> str:
    if not snapshot.host:
        return "(none)"
    host = snapshot.host[0]
    memory = (
        f"{human_bytes(host.memory_available_bytes)} available of "
        f"{human_bytes(host.memory_total_bytes)}"
    )
    cpu = " ".join(
        f"{mode}={human_count(seconds)}s" for mode, seconds in sorted(host.cpu_seconds.items())
    )
    return (
        f"load {host.load1:.2f} {host.load5:.2f} {host.load15:.2f}  memory {memory}\n"
        f"cpu seconds: {cpu}"
    )
