"""Telemetry sections by name, and the deprecated ``fabric.v1.Section`` enum's values.

Sections are named (``gpu``, ``nic``, ...) by the agent's collectors. The enum predates
that and covers the six sections it was made with; its values map to names through the
proto descriptor (``SECTION_GPU`` is ``gpu``), so no table here can drift from the proto.
"""

from __future__ import annotations

from agent.proto.fabric.v1 import telemetry_service_pb2

_ENUM = telemetry_service_pb2.DESCRIPTOR.enum_types_by_name["Section"]
_PREFIX = "SECTION_"


def _name(enum_value_name: str) -> str:
    return enum_value_name.removeprefix(_PREFIX).lower()


# The enum's sections in the enum's order, SECTION_UNSPECIFIED left out.
_BY_VALUE: dict[int, str] = {v.number: _name(v.name) for v in _ENUM.values if v.number != 0}
_BY_NAME: dict[str, int] = {name: number for number, name in _BY_VALUE.items()}


def enum_name(value: int) -> str | None:
    """The section an enum value stands for; None for SECTION_UNSPECIFIED or a value the
    enum does not have."""
    return _BY_VALUE.get(value)


def enum_value(name: str) -> telemetry_service_pb2.Section.ValueType | None:
    """The enum value of a named section; None when the enum has none for it."""
    number = _BY_NAME.get(name)
    return None if number is None else telemetry_service_pb2.Section.ValueType(number)


def enum_names() -> list[str]:
    """The sections the enum has, in its order."""
    return list(_BY_VALUE.values())
