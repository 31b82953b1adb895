"""The immutable snapshot: everything one sampling tick saw, by collector name."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class CollectorStatus:
    """How one collector fared on one tick."""

    name: str
    success: bool
    duration_s: float
    samples: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One tick's samples. Sections are keyed by collector name and hold tuples of frozen
    sample dataclasses, so a snapshot can be handed to any thread without copying."""

    node_name: str
    agent_version: str
    seq: int
    interval_s: float
    started_wall_s: float
    completed_wall_s: float
    sections: Mapping[str, tuple[Any, ...]]
    collectors: tuple[CollectorStatus, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", MappingProxyType(dict(self.sections)))

    def section(self, name: str) -> tuple[Any, ...]:
        return self.sections.get(name, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_name": self.node_name,
            "agent_version": self.agent_version,
            "seq": self.seq,
            "interval_s": self.interval_s,
            "started_wall_s": self.started_wall_s,
            "completed_wall_s": self.completed_wall_s,
            "collectors": [_plain(status) for status in self.collectors],
            "sections": {
                name: [_plain(sample) for sample in samples]
                for name, samples in sorted(self.sections.items())
            },
        }


def _plain(value: Any) -> Any:
    """Dataclasses, enums, mappings and tuples as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
