"""Snapshots as ``fabric.v1`` messages: pure functions, tested without gRPC.

Built from the registered sections (agent.node.collectors.base). A section with a typed
field of ``fabric.v1.Snapshot`` fills it through its `SnapshotField`: sample dataclasses
and proto messages share field names and units, a field the sample leaves None stays
unset (proto3 ``optional``), and a sample field the message lacks is not exported
(tests/node/api/test_convert.py lists those, so new ones are a decision). A section
without one goes into the snapshot's generic ``sections``, each sample a
``google.protobuf.Struct`` of its fields. Requests name sections, or use the deprecated
``Section`` enum, whose values map to names through the proto descriptor.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from agent.common.sections import enum_name, enum_value
from agent.node.collectors.base import SampleT, Section, sample_message, section_owners, sections
from agent.node.collectors.gpu import GPU
from agent.node.collectors.nic import NIC
from agent.node.collectors.nvlink import NVLINK
from agent.node.collectors.rdma import RDMA
from agent.node.snapshot import CollectorStatus, Snapshot, plain
from agent.proto.fabric.v1 import telemetry_pb2, telemetry_service_pb2

_M = TypeVar("_M", bound=Message)


class SectionError(ValueError):
    """A requested section is not one this agent has."""

    def __init__(self, field: str, requested: str, known: Sequence[str]) -> None:
        self.field = field
        self.reason = f"unknown section {requested}; this agent has {', '.join(known)}"
        super().__init__(f"{field}: {self.reason}")


class PageTokenError(ValueError):
    """A page token this agent did not hand out."""

    def __init__(self, token: str) -> None:
        super().__init__(f"page_token: invalid token {token!r}")
        self.token = token


def collector_status(status: CollectorStatus) -> telemetry_pb2.CollectorStatus:
    return telemetry_pb2.CollectorStatus(
        name=status.name,
        success=status.success,
        duration_seconds=status.duration_s,
        samples=status.samples,
        error=status.error or "",
    )


def sample_struct(sample: Any) -> struct_pb2.Struct:
    """A sample's fields as a Struct; values JSON has no type for (paths) as text."""
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(plain(sample), default=str)))
    return struct


def exported_sections() -> list[Section[Any]]:
    """The sections the API serves, in its order: those the deprecated enum has, in the
    enum's order (the order clients have always had), then the others by name."""

    def order(section: Section[Any]) -> tuple[int, int, str]:
        value = enum_value(section.name)
        return (0, value, "") if value is not None else (1, 0, section.name)

    return sorted((s for s in sections().values() if s.exported), key=order)


def validate_sections(values: Iterable[int], names: Iterable[str] = ()) -> frozenset[str]:
    """The names of the requested sections, by enum value and by name together (none
    requested: all); raises SectionError for one the agent does not serve,
    SECTION_UNSPECIFIED included."""
    known = [section.name for section in exported_sections()]
    chosen: set[str] = set()
    for index, value in enumerate(values):
        name = enum_name(value)
        if name is None or name not in known:
            raise SectionError(f"sections[{index}]", str(value), known)
        chosen.add(name)
    for index, name in enumerate(names):
        if name not in known:
            raise SectionError(f"section_names[{index}]", repr(name), known)
        chosen.add(name)
    return frozenset(chosen or known)


def snapshot_to_proto(
    snapshot: Snapshot, sections: Collection[int] = (), section_names: Collection[str] = ()
) -> telemetry_pb2.Snapshot:
    """The snapshot with the requested sections (none: all) and their collectors'
    statuses; raises SectionError."""
    return snapshot_message(snapshot, validate_sections(sections, section_names))


def snapshot_message(snapshot: Snapshot, chosen: frozenset[str]) -> telemetry_pb2.Snapshot:
    """The snapshot with the chosen sections (as `validate_sections` returns them) and
    their collectors' statuses."""
    message = telemetry_pb2.Snapshot(
        node_name=snapshot.node_name,
        agent_version=snapshot.agent_version,
        seq=snapshot.seq,
        interval_seconds=snapshot.interval_s,
        started_unix_seconds=snapshot.started_wall_s,
        completed_unix_seconds=snapshot.completed_wall_s,
    )
    served = exported_sections()
    if all(section.name in chosen for section in served):
        statuses: Iterable[CollectorStatus] = snapshot.collectors
    else:
        owners = section_owners()
        collectors = {owners[name] for name in chosen}
        statuses = (s for s in snapshot.collectors if s.name in collectors)
    message.collectors.extend(collector_status(status) for status in statuses)
    for section in served:
        if section.name in chosen:
            message.section_names.append(section.name)
            _add_section(message, section, snapshot.samples(section))
    return message


def _add_section(
    message: telemetry_pb2.Snapshot, section: Section[SampleT], samples: tuple[SampleT, ...]
) -> None:
    field = section.snapshot_field
    if field is not None:
        getattr(message, field.name).extend(field.message(sample) for sample in samples)
        return
    generic = message.sections.add(name=section.name, fields=section.field_names)
    generic.samples.extend(sample_struct(sample) for sample in samples)


def devices(snapshot: Snapshot) -> list[telemetry_service_pb2.Device]:
    """The GPUs (with their NVLink counts), NICs and RDMA ports the snapshot holds, in
    that order."""
    links: dict[int, int] = {}
    for link in snapshot.samples(NVLINK):
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
        for gpu in snapshot.samples(GPU)
    ]
    found.extend(
        telemetry_service_pb2.Device(nic=sample_message(telemetry_service_pb2.NicDevice, nic))
        for nic in snapshot.samples(NIC)
    )
    found.extend(
        telemetry_service_pb2.Device(
            rdma_port=sample_message(telemetry_service_pb2.RdmaPortDevice, port)
        )
        for port in snapshot.samples(RDMA)
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
