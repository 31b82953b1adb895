"""The immutable snapshot: everything one sampling tick saw, by section."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from agent.node.collectors.base import Section

SampleT = TypeVar("SampleT")


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
    """One tick's samples. Sections are keyed by section name and hold tuples of frozen
    sample dataclasses, so a snapshot can be handed to any thread without copying. A
    section is present (maybe empty) when its collector succeeded on the tick, absent
    when it failed."""

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

    def samples(self, section: Section[SampleT]) -> tuple[SampleT, ...]:
        """The section's samples; empty when it is absent."""
        # The sampler files a sample only under the section that holds its type.
        return cast("tuple[SampleT, ...]", self.sections.get(section.name, ()))

    def has(self, section: Section[Any]) -> bool:
        """Whether the section's collector succeeded on this tick."""
        return section.name in self.sections

    def collected(self, sections: Sequence[Section[Any]]) -> tuple[Any, ...]:
        """The samples of these sections (one collector's), in their order."""
        if len(sections) == 1:
            return self.sections.get(sections[0].name, ())
        return tuple(s for section in sections for s in self.sections.get(section.name, ()))

    def section(self, name: str) -> tuple[Any, ...]:
        """A section's samples by name, untyped: for code that handles every section
        alike (text and JSON rendering)."""
        return self.sections.get(name, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_name": self.node_name,
            "agent_version": self.agent_version,
            "seq": self.seq,
            "interval_s": self.interval_s,
            "started_wall_s": self.started_wall_s,
            "completed_wall_s": self.completed_wall_s,
            "collectors": [plain(status) for status in self.collectors],
            "sections": {
                name: [plain(sample) for sample in samples]
                for name, samples in sorted(self.sections.items())
            },
        }


def plain(value: Any) -> Any:
    """Dataclasses, enums, mappings and tuples as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value
