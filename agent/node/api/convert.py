"""Snapshots as ``fabric.v1`` messages: pure functions, tested without gRPC.

Sample dataclasses and proto messages share field names and units; a field the sample
leaves None stays unset (proto3 ``optional``), and a sample field the message lacks is
not exported (tests/api/test_convert.py lists those, so new ones are a decision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeAlias, TypeVar

from google.protobuf.message import Message

from agent.node.collectors.gpu import GpuSample
from agent.node.collectors.host import HostSample
from agent.node.collectors.nic import NicSample
from agent.node.collectors.nvlink import NvLinkSample
from agent.node.collectors.qos import QosClassSample
from agent.node.collectors.rdma import RdmaPortSample
from agent.node.snapshot import CollectorStatus, Snapshot
from agent.proto.fabric.v1 import telemetry_pb2, telemetry_service_pb2

Section: TypeAlias = telemetry_service_pb2.Section.ValueType

_M = TypeVar("_M", bound=Message)


class SectionError(ValueError):
    """A requested section is not one this agent knows."""

    def __init__(self, value: int) -> None:
        super().__init__(f"sections: unknown section {value}")
        self.value = value


class PageTokenError(ValueError):
    """A page token this agent did not hand out."""

    def __init__(self, token: str) -> None:
        super().__init__(f"page_token: invalid token {token!r}")
        self.token = token


def _message(message_type: type[_M], sample: Any, **overrides: Any) -> _M:
    """The message with every field of the sample that it has and that is not None."""
    names = message_type.DESCRIPTOR.fields_by_name
    values = {
        field.name: getattr(sample, field.name)
        for field in dataclasses.fields(sample)
        if field.name in names and getattr(sample, field.name) is not None
    }
    values.update(overrides)
    return message_type(**values)


def gpu_sample(sample: GpuSample) -> telemetry_pb2.GpuSample:
    return _message(
        telemetry_pb2.GpuSample,
        sample,
        xid_errors=[telemetry_pb2.XidCount(xid=xid, count=n) for xid, n in sample.xid_errors],
    )


def host_sample(sample: HostSample) -> telemetry_pb2.HostSample:
    return _message(telemetry_pb2.HostSample, sample, cpu_seconds=dict(sample.cpu_seconds))


def collector_status(status: CollectorStatus) -> telemetry_pb2.CollectorStatus:
    return telemetry_pb2.CollectorStatus(
        name=status.name,
        success=status.success,
        duration_seconds=status.duration_s,
        samples=status.samples,
        error=status.error or "",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _SectionSpec:
    collector: str
    sample_type: type[Any]
    # The repeated field of fabric.v1.Snapshot this section fills.
    field: str
    convert: Callable[[Any], Message]


_SECTIONS: Mapping[Section, _SectionSpec] = {
    telemetry_service_pb2.SECTION_GPU: _SectionSpec("nvml", GpuSample, "gpus", gpu_sample),
    telemetry_service_pb2.SECTION_NVLINK: _SectionSpec(
        "nvlink", NvLinkSample, "nvlinks", lambda s: _message(telemetry_pb2.NvLinkSample, s)
    ),
    telemetry_service_pb2.SECTION_NIC: _SectionSpec(
        "nic", NicSample, "nics", lambda s: _message(telemetry_pb2.NicSample, s)
    ),
    telemetry_service_pb2.SECTION_RDMA: _SectionSpec(
        "rdma", RdmaPortSample, "rdma_ports", lambda s: _message(telemetry_pb2.RdmaPortSample, s)
    ),
    # The qos section also holds the reconciler's QosReconcileSample, not exported here.
    telemetry_service_pb2.SECTION_QOS: _SectionSpec(
        "qos",
        QosClassSample,
        "qos_classes",
        lambda s: _message(telemetry_pb2.QosClassSample, s),
    ),
    telemetry_service_pb2.SECTION_HOST: _SectionSpec("host", HostSample, "host", host_sample),
}

ALL_SECTIONS: tuple[Section, ...] = tuple(_SECTIONS)


def validate_sections(sections: Iterable[int]) -> frozenset[Section]:
    """The requested sections (empty: all); raises SectionError for an unknown value,
    SECTION_UNSPECIFIED included."""
    chosen: set[Section] = set()
    for value in sections:
        if value not in _SECTIONS:
            raise SectionError(value)
        chosen.add(telemetry_service_pb2.Section.ValueType(value))
    return frozenset(chosen or _SECTIONS)


def snapshot_to_proto(snapshot: Snapshot, sections: Collection[int] = ()) -> telemetry_pb2.Snapshot:
    """The snapshot with the given sections (empty: all) and their collectors' statuses."""
    chosen = validate_sections(sections)
    message = telemetry_pb2.Snapshot(
        node_name=snapshot.node_name,
        agent_version=snapshot.agent_version,
        seq=snapshot.seq,
        interval_seconds=snapshot.interval_s,
        started_unix_seconds=snapshot.started_wall_s,
        completed_unix_seconds=snapshot.completed_wall_s,
    )
    if len(chosen) == len(_SECTIONS):
        statuses: Iterable[CollectorStatus] = snapshot.collectors
    else:
        collectors = {_SECTIONS[section].collector for section in chosen}
        statuses = (s for s in snapshot.collectors if s.name in collectors)
    message.collectors.extend(collector_status(status) for status in statuses)
    for section in ALL_SECTIONS:
        if section not in chosen:
            continue
        spec = _SECTIONS[section]
        getattr(message, spec.field).extend(
            spec.convert(sample)
            for sample in snapshot.section(spec.collector)
            if isinstance(sample, spec.sample_type)
        )
    return message


def devices(snapshot: Snapshot) -> list[telemetry_service_pb2.Device]:
    """The GPUs (with their NVLink counts), NICs and RDMA ports the snapshot holds, in
    that order."""
    links: dict[int, int] = {}
    for link in snapshot.section("nvlink"):
        if isinstance(link, NvLinkSample):
            links[link.gpu] = links.get(link.gpu, 0) + 1
    found = [
        telemetry_service_pb2.Device(
            gpu=telemetry_service_pb2.GpuDevice(
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                pci_bus_id=gpu.pci_bus_id,
                lost=gpu.lost,
                nvlink_count=links.get(gpu.index, 0),
            )
        )
        for gpu in snapshot.section("nvml")
        if isinstance(gpu, GpuSample)
    ]
    found.extend(
        telemetry_service_pb2.Device(nic=_message(telemetry_service_pb2.NicDevice, nic))
        for nic in snapshot.section("nic")
        if isinstance(nic, NicSample)
    )
    found.extend(
        telemetry_service_pb2.Device(rdma_port=_message(telemetry_service_pb2.RdmaPortDevice, port))
        for port in snapshot.section("rdma")
        if isinstance(port, RdmaPortSample)
    )
    return found


def page(items: list[_M], page_size: int, page_token: str) -> tuple[list[_M], str]:
    """One page of items and the token of the next ("" on the last page). The token is
    the offset: devices change rarely, and a page that shifts by one is harmless."""
    try:
        start = int(page_token) if page_token else 0
    except ValueError:
        raise PageTokenError(page_token) from None
    if start < 0 or start > len(items):
        raise PageTokenError(page_token)
    end = len(items) if page_size == 0 else min(len(items), start + page_size)
    return items[start:end], (str(end) if end < len(items) else "")
