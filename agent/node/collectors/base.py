"""The collector framework: collectors, the snapshot sections they fill, and their registry.

A collector module declares each section it fills once, as a `Section`: its name, its
sample type, its typed field of ``fabric.v1.Snapshot`` if it has one, and its part of the
fleet summary. The module registers its collector with
`@register(GpuCollector, options=NvmlOptions)`; nothing else in the agent names it. The
sampler runs each collector on its own worker, records success and duration, and files
what it returned under its sections by sample type. The collector renders its own samples
as Prometheus metric families; the gRPC conversion and the uplink's summary are built from
the registered sections. So a new source touches its own files only.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import threading
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from agent.node.config import AgentConfig
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from agent.node.families import Family

log = logging.getLogger(__name__)

T = TypeVar("T")
SampleT = TypeVar("SampleT")
SampleT_contra = TypeVar("SampleT_contra", contravariant=True)
MessageT = TypeVar("MessageT", bound=Message)
OptionsT = TypeVar("OptionsT", bound="DataclassInstance")
CollectorT = TypeVar("CollectorT", bound="Collector")


@dataclass(frozen=True, slots=True)
class Tick:
    """One sampling instant: a sequence number and the clocks it was scheduled at."""

    seq: int
    monotonic_s: float
    wall_s: float


def sample_message(message_type: type[MessageT], sample: Any, **overrides: Any) -> MessageT:
    """The message with every field of the sample (a dataclass) that it has and that is
    not None, then `overrides`: sample dataclasses and proto messages share field names
    and units, and a None stays unset (proto3 ``optional``)."""
    names = message_type.DESCRIPTOR.fields_by_name
    values = {
        field.name: getattr(sample, field.name)
        for field in dataclasses.fields(sample)
        if field.name in names and getattr(sample, field.name) is not None
    }
    values.update(overrides)
    return message_type(**values)


@dataclass(frozen=True, eq=False)
class SnapshotField(Generic[SampleT]):
    """A typed repeated field of ``fabric.v1.Snapshot`` and how a sample becomes one of its
    messages."""

    name: str
    message_type: type[Message]
    # Builds the message; None: it is `sample_message` of the sample.
    convert: Callable[[SampleT], Message] | None = None

    def __post_init__(self) -> None:
        field = telemetry_pb2.Snapshot.DESCRIPTOR.fields_by_name.get(self.name)
        if (
            field is None
            or not field.is_repeated
            or field.message_type is not self.message_type.DESCRIPTOR
        ):
            raise ValueError(
                f"fabric.v1.Snapshot has no repeated {self.message_type.__name__} field "
                f"{self.name!r}"
            )

    def message(self, sample: SampleT) -> Message:
        if self.convert is not None:
            return self.convert(sample)
        return sample_message(self.message_type, sample)


@dataclass(frozen=True, slots=True)
class SummaryClock:
    """When the snapshot being summarized was completed and the nominal sampling
    interval: what summarizers turn counter increases into rates over."""

    completed_wall_s: float
    interval_s: float

    def elapsed_s(self, since_s: float | None) -> float:
        """Seconds since an earlier snapshot; the nominal interval where there is none or
        the wall clock stepped back (a rate over a non-positive interval means nothing)."""
        if since_s is None or self.completed_wall_s <= since_s:
            return self.interval_s
        return self.completed_wall_s - since_s


class Summarizer(Protocol[SampleT_contra]):
    """A section's part of the fleet summary. It adds to each `NodeSummary` from the
    section's samples, keeping what it needs of earlier snapshots (counters, when)."""

    def summarize(
        self, samples: tuple[SampleT_contra, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        """Called for every snapshot that carries the section: one whose collector failed
        does not, so the next call's increases cover the gap."""
        ...


@dataclass(frozen=True, eq=False)
class Section(Generic[SampleT]):
    """A part of the snapshot, filled by one collector with samples of one type, and the
    key to them: `snapshot.samples(GPU)` is a `tuple[GpuSample, ...]`."""

    name: str
    sample_type: type[SampleT]
    # The section's typed field of fabric.v1.Snapshot; None: the snapshot's generic
    # `sections` carry it, each sample as a google.protobuf.Struct.
    snapshot_field: SnapshotField[SampleT] | None = None
    # False keeps the section off the gRPC API; /metrics and the summary still have it.
    exported: bool = True
    # Makes the section's summarizer (one per summary builder); None: it has no part in
    # the fleet summary.
    summarizer: Callable[[], Summarizer[SampleT]] | None = None
    # Sections whose summarizers run before this one's (it adds to what they wrote).
    summarize_after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.sample_type):
            raise TypeError(f"section {self.name}: {self.sample_type.__name__} is no dataclass")

    @property
    def field_names(self) -> tuple[str, ...]:
        """The fields of the section's samples, in their order."""
        kind = self.sample_type
        assert dataclasses.is_dataclass(kind)
        return tuple(field.name for field in dataclasses.fields(kind))

    def select(self, samples: Iterable[Any]) -> tuple[SampleT, ...]:
        """This section's samples among those of a collector with several sections (what
        its `metrics` gets)."""
        kind = self.sample_type
        return tuple(s for s in samples if type(s) is kind)


class Collector(Protocol):
    """What the sampler drives. Implementations raise on failure; they never swallow."""

    @property
    def name(self) -> str: ...

    @property
    def sections(self) -> Sequence[Section[Any]]:
        """The sections its samples are filed under, by sample type."""
        ...

    def collect(self, tick: Tick) -> Sequence[Any]:
        """Return this tick's samples, each of a type one of its sections holds. Raise on
        failure."""
        ...

    def metrics(self, samples: Sequence[Any]) -> Iterable[Family]:
        """Render samples produced by `collect` as metric families (agent.node.families)."""
        ...

    def close(self) -> None:
        """Release resources (threads, handles). Called once at shutdown."""
        ...


class UndeclaredSampleError(TypeError):
    """A collector returned a sample that none of its sections holds: a bug in the
    collector, reported as its failure on the tick."""


def file_samples(
    collector: str, sections: Sequence[Section[Any]], samples: Iterable[Any]
) -> dict[str, tuple[Any, ...]]:
    """The samples by section name, every section present (empty when it got none).
    Raises UndeclaredSampleError for a sample whose type no section holds."""
    by_type: dict[type[Any], list[Any]] = {section.sample_type: [] for section in sections}
    for sample in samples:
        filed = by_type.get(type(sample))
        if filed is None:
            held = ", ".join(section.sample_type.__name__ for section in sections)
            raise UndeclaredSampleError(
                f"collector {collector} returned a {type(sample).__name__}; its sections "
                f"hold {held or 'nothing'}"
            )
        filed.append(sample)
    return {section.name: tuple(by_type[section.sample_type]) for section in sections}


class SharedResources:
    """Objects several collectors share (one NVML session for the GPU and NVLink
    collectors), created on first use and closed once at shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []

    def get(self, key: str, factory: Callable[[], T], close: Callable[[T], None]) -> T:
        with self._lock:
            if key not in self._items:
                item = factory()
                self._items[key] = item
                self._closers.append(lambda: close(item))
            value: T = self._items[key]
            return value

    def find(self, key: str) -> Any | None:
        """The object under `key` if something created it, else None."""
        with self._lock:
            return self._items.get(key)

    def close(self) -> None:
        with self._lock:
            closers, self._closers = self._closers, []
            self._items.clear()
        for closer in reversed(closers):
            closer()


@dataclass(frozen=True, slots=True)
class NoOptions:
    """The options of a collector that takes none from the configuration."""


@dataclass(frozen=True, slots=True)
class CollectorContext(Generic[OptionsT]):
    """What a collector factory gets: its own options and the shared resources."""

    options: OptionsT
    shared: SharedResources


def options_from_config(options_type: type[OptionsT], config: AgentConfig) -> OptionsT:
    """The options object with each field taken from the AgentConfig field of its name."""
    fields = dataclasses.fields(options_type)
    return options_type(**{field.name: getattr(config, field.name) for field in fields})


def _check_options(collector: str, options_type: type[DataclassInstance]) -> None:
    """Every field of the options type is an AgentConfig field of the same type: the
    framework fills one from the other by name."""
    hints = typing.get_type_hints(options_type)
    for field in dataclasses.fields(options_type):
        config_field = AgentConfig.model_fields.get(field.name)
        if config_field is None:
            raise ValueError(
                f"collector {collector}: {options_type.__name__}.{field.name} is not an "
                "AgentConfig field"
            )
        if hints[field.name] != config_field.annotation:
            raise ValueError(
                f"collector {collector}: {options_type.__name__}.{field.name} is "
                f"{hints[field.name]}, AgentConfig's is {config_field.annotation}"
            )


@dataclass(frozen=True, slots=True)
class Registration(Generic[OptionsT]):
    name: str
    sections: tuple[Section[Any], ...]
    factory: Callable[[CollectorContext[OptionsT]], Collector]
    options_type: type[OptionsT]
    default_enabled: bool
    # Names the collector had before; a configuration naming one still selects it.
    former_names: tuple[str, ...] = ()

    def create(self, config: AgentConfig, shared: SharedResources) -> Collector:
        """The collector, with its options taken from `config`."""
        options = options_from_config(self.options_type, config)
        return self.factory(CollectorContext(options, shared))


_REGISTRY: dict[str, Registration[Any]] = {}
_modules_imported = False
_warned_former_names: set[str] = set()


def register(
    collector: type[CollectorT],
    *,
    options: type[OptionsT],
    default_enabled: bool = True,
    former_names: Sequence[str] = (),
) -> Callable[
    [Callable[[CollectorContext[OptionsT]], CollectorT]],
    Callable[[CollectorContext[OptionsT]], CollectorT],
]:
    """Factory decorator: make `collector` available under its `name`, filling the
    sections its `sections` name. Both are class attributes, read here before any
    instance exists. The factory gets the options object `options` built from the
    configuration and the shared resources."""
    # Read off the class at run time: typing would have them instance properties.
    name: object = getattr(collector, "name", None)
    sections: object = getattr(collector, "sections", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{collector.__name__}.name must be a non-empty string")
    if not isinstance(sections, tuple) or not all(isinstance(s, Section) for s in sections):
        raise TypeError(f"{collector.__name__}.sections must be a tuple of Section")

    def decorate(
        factory: Callable[[CollectorContext[OptionsT]], CollectorT],
    ) -> Callable[[CollectorContext[OptionsT]], CollectorT]:
        _add(Registration(name, sections, factory, options, default_enabled, tuple(former_names)))
        return factory

    return decorate


def _add(registration: Registration[Any]) -> None:
    name = registration.name
    taken = {n for r in _REGISTRY.values() for n in (r.name, *r.former_names)}
    for used in (name, *registration.former_names):
        if used in taken:
            raise ValueError(f"collector {used!r} registered twice")
    known = {s.name for r in _REGISTRY.values() for s in r.sections}
    types: set[type[Any]] = set()
    for section in registration.sections:
        if section.name in known:
            raise ValueError(f"collector {name}: section {section.name!r} registered twice")
        if section.sample_type in types:
            raise ValueError(
                f"collector {name}: two sections hold {section.sample_type.__name__}; the "
                "sampler files samples by type"
            )
        known.add(section.name)
        types.add(section.sample_type)
    _check_options(name, registration.options_type)
    _REGISTRY[name] = registration


def _import_collector_modules() -> None:
    global _modules_imported
    if _modules_imported:
        return
    import agent.node.collectors as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")
    _modules_imported = True


def registrations() -> dict[str, Registration[Any]]:
    """All registered collectors, importing every module of the package first."""
    _import_collector_modules()
    return dict(_REGISTRY)


def sections() -> dict[str, Section[Any]]:
    """Every registered collector's sections, by name."""
    return {s.name: s for r in registrations().values() for s in r.sections}


def section_owners() -> dict[str, str]:
    """The collector that fills each registered section, by section name."""
    return {s.name: r.name for r in registrations().values() for s in r.sections}


def find_registration(name: str) -> Registration[Any] | None:
    """The collector registered under `name` or, with a warning logged once, one that
    was called `name` before."""
    known = registrations()
    if name in known:
        return known[name]
    for registration in known.values():
        if name in registration.former_names:
            if name not in _warned_former_names:
                _warned_former_names.add(name)
                log.warning("collector name %r is now %r", name, registration.name)
            return registration
    return None


@contextmanager
def registry_scope() -> Iterator[None]:
    """Registrations made inside are undone on exit: for a test that adds a collector
    without it leaking into the tests after it."""
    _import_collector_modules()
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
