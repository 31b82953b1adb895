"""The collector framework: a registry of named collectors and the contract they follow.

A collector module registers itself with `@register("name")`; nothing else in the agent
names it. The sampler runs each collector in its own worker, records success and
duration, and stores what it returned under its name in the snapshot. The collector also
renders its own samples as Prometheus metric families, so a new source touches its own
files only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from agent.node.config import AgentConfig
    from agent.node.families import Family


@dataclass(frozen=True, slots=True)
class Tick:
    """One sampling instant: a sequence number and the clocks it was scheduled at."""

    seq: int
    monotonic_s: float
    wall_s: float


class Sample(Protocol):
    """Samples are frozen dataclasses; this marks the role, not a shape."""


class Collector(Protocol):
    """What the sampler drives. Implementations raise on failure; they never swallow."""

    name: str

    def collect(self, tick: Tick) -> Sequence[Any]:
        """Return this tick's samples (frozen dataclasses). Raise on failure."""
        ...

    def metrics(self, samples: Sequence[Any]) -> Iterable[Family]:
        """Render samples produced by `collect` as metric families (agent.node.families)."""
        ...

    def close(self) -> None:
        """Release resources (threads, handles). Called once at shutdown."""
        ...


T = TypeVar("T")


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
class CollectorContext:
    """What a collector factory gets: the validated config and the shared resources."""

    config: AgentConfig
    shared: SharedResources


CollectorFactory = Callable[[CollectorContext], Collector]


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    factory: CollectorFactory
    default_enabled: bool


_REGISTRY: dict[str, Registration] = {}


def register(
    name: str, *, default_enabled: bool = True
) -> Callable[[CollectorFactory], CollectorFactory]:
    """Class or function decorator: make a collector available under `name`."""

    def decorate(factory: CollectorFactory) -> CollectorFactory:
        if name in _REGISTRY:
            raise ValueError(f"collector {name!r} registered twice")
        _REGISTRY[name] = Registration(name, factory, default_enabled)
        return factory

    return decorate


def registrations() -> dict[str, Registration]:
    """All registered collectors, importing every module of the package first."""
    import importlib
    import pkgutil

    import agent.node.collectors as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_REGISTRY)
