"""The collector framework: sections, filing samples by type, the registry, options."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.node.collectors.base import (
    CollectorContext,
    NoOptions,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    UndeclaredSampleError,
    file_samples,
    find_registration,
    options_from_config,
    register,
    registrations,
    registry_scope,
    sections,
)
from agent.node.config import AgentConfig
from agent.node.families import Family
from agent.node.sampler import Sampler
from agent.node.uplink.summary import summary_order
from agent.proto.fabric.v1 import telemetry_pb2


@dataclass(frozen=True, slots=True)
class Port:
    name: str


@dataclass(frozen=True, slots=True)
class Counter:
    value: int


PORTS = Section("ports", Port)
COUNTERS = Section("counters", Counter)


class TwoSections:
    """A collector filling two sections; it returns what the test gives it."""

    name = "two"
    sections = (PORTS, COUNTERS)

    def __init__(self, samples: Sequence[Any] = ()) -> None:
        self.samples = samples

    def collect(self, tick: Tick) -> Sequence[Any]:
        return self.samples

    def metrics(self, samples: Sequence[Any]) -> Iterable[Family]:
        return ()

    def close(self) -> None:
        pass


def create_two(context: CollectorContext[NoOptions]) -> TwoSections:
    return TwoSections()


def test_samples_are_filed_by_type_and_every_section_is_present() -> None:
    filed = file_samples("two", TwoSections.sections, [Port("a"), Counter(1), Port("b")])

    assert filed == {"ports": (Port("a"), Port("b")), "counters": (Counter(1),)}
    assert file_samples("two", TwoSections.sections, [Port("a")])["counters"] == ()


def test_a_sample_no_section_holds_is_an_error_naming_the_collector() -> None:
    with pytest.raises(UndeclaredSampleError, match="collector two returned a str"):
        file_samples("two", TwoSections.sections, [Port("a"), "stray"])


def test_the_sampler_reports_an_undeclared_sample_as_the_collectors_failure() -> None:
    collector = TwoSections([Port("a"), 42])
    sampler = Sampler([collector], node_name="n1", interval_s=1.0, timeout_s=1.0)

    snapshot = sampler.sample()
    sampler.close()

    (status,) = snapshot.collectors
    assert not status.success
    assert "UndeclaredSampleError: collector two returned a int" in (status.error or "")
    assert not snapshot.has(PORTS) and not snapshot.has(COUNTERS)


def test_typed_access_and_a_collectors_samples() -> None:
    collector = TwoSections([Counter(7), Port("a")])
    sampler = Sampler([collector], node_name="n1", interval_s=1.0, timeout_s=1.0)

    snapshot = sampler.sample()
    sampler.close()

    assert snapshot.samples(PORTS) == (Port("a"),)
    assert snapshot.samples(COUNTERS) == (Counter(7),)
    assert snapshot.collected(TwoSections.sections) == (Port("a"), Counter(7))
    assert COUNTERS.select([Port("a"), Counter(7)]) == (Counter(7),)
    assert snapshot.collectors[0].samples == 2


def test_registered_sections_are_the_seven_typed_ones_and_the_reconcilers() -> None:
    typed = {
        name: section.snapshot_field.name
        for name, section in sections().items()
        if section.snapshot_field is not None
    }

    assert typed == {
        "gpu": "gpus",
        "nvlink": "nvlinks",
        "nic": "nics",
        "rdma": "rdma_ports",
        "host": "host",
        "qos": "qos_classes",
        "jobs": "jobs",
    }
    assert not sections()["qos_reconcile"].exported


def test_every_registration_builds_its_options_from_the_configuration(tmp_path: Path) -> None:
    config = AgentConfig(sysfs_root=tmp_path, state_dir=tmp_path, interfaces=("eth*",))

    built = {
        name: options_from_config(registration.options_type, config)
        for name, registration in registrations().items()
    }

    for options in built.values():
        for field in dataclasses.fields(options):
            assert getattr(options, field.name) == getattr(config, field.name)
    assert {type(options).__name__ for options in built.values()} == {
        "NvmlOptions",
        "NicOptions",
        "RdmaOptions",
        "QosOptions",
        "JobOptions",
        "NoOptions",
    }


@dataclass(frozen=True, slots=True)
class Misspelt:
    sysfs_rot: Path


@dataclass(frozen=True, slots=True)
class Mistyped:
    sysfs_root: str


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Misspelt, r"Misspelt.sysfs_rot is not an AgentConfig field"),
        (Mistyped, r"Mistyped.sysfs_root is <class 'str'>, AgentConfig's is .*Path"),
    ],
)
def test_options_must_be_agent_config_fields_of_the_same_type(
    options: type[Any], message: str
) -> None:
    with registry_scope(), pytest.raises(ValueError, match=message):
        register(TwoSections, options=options)(create_two)


def test_a_section_name_is_registered_once() -> None:
    class Again(TwoSections):
        name = "again"
        sections = (Section("gpu", Port),)

    with registry_scope(), pytest.raises(ValueError, match="section 'gpu' registered twice"):
        register(Again, options=NoOptions)(create_two)


def test_a_registry_scope_undoes_its_registrations() -> None:
    with registry_scope():
        register(TwoSections, options=NoOptions)(create_two)
        assert "two" in registrations() and "ports" in sections()

    assert "two" not in registrations()
    assert "ports" not in sections()


def test_a_former_name_finds_the_collector_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Renamed(TwoSections):
        name = "renamed"

    with registry_scope():
        register(Renamed, options=NoOptions, former_names=("old-name",))(create_two)

        found = [find_registration("old-name") for _ in range(3)]

    assert [registration.name for registration in found if registration] == ["renamed"] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["collector name 'old-name' is now 'renamed'"]


def test_the_gpu_collector_answers_to_nvml() -> None:
    found = find_registration("nvml")

    assert found is not None and found.name == "gpu"


def test_a_snapshot_field_must_be_a_repeated_field_of_its_message_type() -> None:
    with pytest.raises(ValueError, match="no repeated NicSample field 'gpus'"):
        SnapshotField("gpus", telemetry_pb2.NicSample)
    with pytest.raises(ValueError, match="no repeated NicSample field 'nic'"):
        SnapshotField("nic", telemetry_pb2.NicSample)


def test_a_sample_type_is_a_dataclass() -> None:
    with pytest.raises(TypeError, match="str is no dataclass"):
        Section("text", str)


class _Noop:
    def summarize(self, samples: tuple[Any, ...], summary: Any, clock: SummaryClock) -> None:
        pass


def test_summarizers_run_after_the_sections_they_follow() -> None:
    links = Section("links", Port, summarizer=_Noop, summarize_after=("boards",))
    boards = Section("boards", Counter, summarizer=_Noop)
    quiet = Section("quiet", Port)  # no summarizer

    ordered = summary_order([links, quiet, boards])

    assert [section.name for section in ordered] == ["boards", "links"]


def test_summarizers_that_follow_each_other_are_refused() -> None:
    first = Section("first", Port, summarizer=_Noop, summarize_after=("second",))
    second = Section("second", Counter, summarizer=_Noop, summarize_after=("first",))

    with pytest.raises(ValueError, match="cycle"):
        summary_order([first, second])


def test_the_summary_clock_falls_back_to_the_nominal_interval() -> None:
    clock = SummaryClock(completed_wall_s=100.0, interval_s=1.0)

    assert clock.elapsed_s(97.5) == 2.5
    assert clock.elapsed_s(None) == 1.0
    assert clock.elapsed_s(101.0) == 1.0
