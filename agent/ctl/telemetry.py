"""`fabricctl telemetry [--section S,...] [--watch [--interval D]]`: the agent's latest
snapshot, or its snapshots as they are taken, as tables per section or as JSON.

The sections are the agent's: fabricctl asks for them by name, and the agent refuses a
name it does not have (INVALID_ARGUMENT, listing the ones it has). The sections with a
typed field in the snapshot print as tables made for them; any other prints as a table
of its samples' fields. Counters are cumulative in a snapshot; in `--watch` the NIC, RDMA
and NVLink tables add rates over the time between two consecutive snapshots.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeVar

import grpc
from google.protobuf import duration_pb2, json_format

from agent.common import rates
from agent.common.sections import enum_names, enum_value
from agent.ctl.client import EXIT_OK, UsageError
from agent.ctl.output import (
    expiry,
    human_bps,
    human_bytes,
    human_count,
    or_dash,
    percent,
    table,
    to_json,
)
from agent.proto.fabric.v1 import telemetry_pb2, telemetry_service_pb2, telemetry_service_pb2_grpc

Snapshot = telemetry_pb2.Snapshot
_T = TypeVar("_T")


def parse_sections(text: str | None) -> list[str]:
    """`nic,gpu` -> ['nic', 'gpu']; None or empty: [] (every section the agent has)."""
    if text is None:
        return []
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name and name not in names:
            names.append(name)
    if text.strip() and not names:
        raise UsageError(f"--section {text!r}: no section named")
    return names


def _requested(
    names: Sequence[str],
) -> tuple[list[telemetry_service_pb2.Section.ValueType], list[str]]:
    """The request's sections: by name, and again through the deprecated enum where it
    has them, so that an agent older than section names sends them too."""
    values = sorted(value for name in names if (value := enum_value(name)) is not None)
    return values, list(names)


def get(channel: grpc.Channel, sections: Sequence[str], *, output: str, timeout_s: float) -> int:
    """Print the latest snapshot; raises grpc.RpcError."""
    stub = telemetry_service_pb2_grpc.TelemetryServiceStub(channel)
    values, names = _requested(sections)
    request = telemetry_service_pb2.GetSnapshotRequest(sections=values, section_names=names)
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
    values, names = _requested(sections)
    request = telemetry_service_pb2.WatchSnapshotsRequest(sections=values, section_names=names)
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
    sections: Sequence[str] = (),
    previous: Snapshot | None = None,
    missed: int = 0,
) -> str:
    """A header line, failed collectors, then one table per section asked for (none:
    all; `(none)` when the node has nothing in it); rates against `previous` where
    given."""
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
    # The sections with a typed field of the snapshot, and their tables.
    typed: dict[str, Callable[[], str]] = {
        "gpu": lambda: _gpus(snapshot),
        "nvlink": lambda: _nvlinks(snapshot, previous, seconds),
        "nic": lambda: _nics(snapshot, previous, seconds),
        "rdma": lambda: _rdma_ports(snapshot, previous, seconds),
        "qos": lambda: _qos_classes(snapshot),
        "host": lambda: _host(snapshot),
        "jobs": lambda: _jobs(snapshot),
    }
    for name in _section_order(snapshot, sections):
        lines.append("")
        lines.append(f"{name.upper()}")
        render = typed.get(name)
        lines.append(render() if render is not None else _generic(snapshot, name))
    return "\n".join(lines)


def _section_order(snapshot: Snapshot, requested: Sequence[str]) -> list[str]:
    """The sections to print: those asked for (none: all) in the agent's order."""
    if snapshot.section_names:
        carried = list(snapshot.section_names)
        return [name for name in carried if name in requested] if requested else carried
    # An agent older than section names sends what the deprecated enum has.
    known = enum_names()
    if not requested:
        return known
    return sorted(requested, key=lambda n: known.index(n) if n in known else len(known))


def _elapsed_s(snapshot: Snapshot, previous: Snapshot | None) -> float | None:
    if previous is None:
        return None
    return snapshot.started_unix_seconds - previous.started_unix_seconds


def _rate_bps(now: int, then: int | None, seconds: float | None) -> str:
    bytes_per_s = rates.rate(now, then, seconds)
    return "-" if bytes_per_s is None else human_bps(bytes_per_s * 8)


def _by_key(items: Iterable[_T], key: Callable[[_T], object]) -> dict[object, _T]:
    return {key(item): item for item in items}


def _gpus(snapshot: Snapshot) -> str:
    if not snapshot.gpus:
        return "(none)"
    holders = _job_holders(snapshot)
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
        row = [str(gpu.index), or_dash(gpu.name), util, memory, power, temp, state]
        if holders is not None:
            row.insert(-1, ",".join(holders.get(gpu.index, [])) or "-")
        rows.append(row)
    header = ["GPU", "NAME", "UTIL", "MEMORY", "POWER", "TEMP", "STATE"]
    if holders is not None:
        header.insert(-1, "JOBS")
    return table(header, rows)


def _job_holders(snapshot: Snapshot) -> dict[int, list[str]] | None:
    """The ids of the jobs holding each GPU, by index; None when the snapshot does not
    carry the jobs (not asked for, or an agent without them)."""
    if "jobs" not in snapshot.section_names:
        return None
    holders: dict[int, list[str]] = {}
    for job in snapshot.jobs:
        for index in job.gpu_indices:
            holders.setdefault(index, []).append(job.job_id)
    return holders


def _jobs(snapshot: Snapshot) -> str:
    """One row per job: its user, the node's GPUs it holds, the entries of its job file
    that name no GPU here, and when its lease runs out."""
    if not snapshot.jobs:
        return "(none)"
    rows = [
        (
            job.job_id,
            or_dash(job.user),
            ",".join(str(index) for index in job.gpu_indices) or "-",
            ",".join(job.unmatched_gpus) or "-",
            expiry(job.expires_unix_seconds),
        )
        for job in snapshot.jobs
    ]
    return table(("JOB", "USER", "GPUS", "NOT-ON-NODE", "EXPIRES"), rows)


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
        rx, rx_rate = _data_columns(port, then, "receive_bytes", seconds)
        tx, tx_rate = _data_columns(port, then, "transmit_bytes", seconds)
        rows.append(
            (
                f"{port.device}/{port.port}",
                or_dash(port.state),
                or_dash(port.link_layer),
                or_dash(port.netdev),
                human_bps(port.rate_bps) if port.HasField("rate_bps") else "-",
                rx,
                tx,
                rx_rate,
                tx_rate,
                # Unset where the HCA has no such counter (an i40iw without a PMA).
                str(port.receive_errors + port.symbol_errors)
                if port.HasField("receive_errors") or port.HasField("symbol_errors")
                else "-",
                cnp,
            )
        )
    header = ("PORT", "STATE", "LINK", "NETDEV", "RATE", "RX", "TX", "RX-RATE", "TX-RATE",
              "ERRORS", "CNP-SENT/HANDLED")  # fmt: skip
    return table(header, rows)


def _data_columns(
    port: telemetry_pb2.RdmaPortSample,
    then: telemetry_pb2.RdmaPortSample | None,
    field: Literal["receive_bytes", "transmit_bytes"],
    seconds: float | None,
) -> tuple[str, str]:
    """Total and rate of a data counter; "-" where the port has no such counter."""
    if not port.HasField(field):
        return "-", "-"
    now: int = getattr(port, field)
    before: int | None = getattr(then, field) if then and then.HasField(field) else None
    return human_bytes(now), _rate_bps(now, before, seconds)


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


def _generic(snapshot: Snapshot, name: str) -> str:
    """A section without a typed field: one row per sample, one column per field."""
    section = next((s for s in snapshot.sections if s.name == name), None)
    if section is None or not section.samples:
        return "(none)"
    samples = [json_format.MessageToDict(sample) for sample in section.samples]
    columns = list(section.fields) or sorted({key for sample in samples for key in sample})
    rows = [tuple(_cell(sample.get(column)) for column in columns) for sample in samples]
    return table(tuple(column.upper() for column in columns), rows)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # A Struct's numbers are doubles: integers print as integers.
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
