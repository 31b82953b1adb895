"""Golden exposition: every series the agent exports for the simulated 8-GPU node and the
RDMA fixture tree, with its value where the value is deterministic, diffed against
tests/golden/metrics.txt.

A change to a metric name, label or help text shows up here as a reviewable diff. After
an intended change: `make pytest PYTEST_ARGS="tests/node/test_golden.py --update-golden"`.
"""

from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

import pytest

from agent.node.exporter import ExpositionCache
from tests import ROOT
from tests.conftest import simulated_sampler
from tests.fakenvml import FakeNvml

GOLDEN = ROOT / "tests" / "golden" / "metrics.txt"
DOCS = ROOT / "docs" / "metrics.md"
# Two jobs on the node, their leases running to 2100: one naming its GPUs by index, one
# by UUID.
JOBS = ROOT / "tests" / "fixtures" / "jobs"

# Series whose label sets depend on the machine running the test, not on the agent.
_MACHINE_DEPENDENT = re.compile(r"^fabric_host_cpu_seconds_total\{")
# Series whose values depend on the clock or the machine (host statistics, loopback
# traffic, timings): kept without their value. Every other series keeps its value, so a
# unit or conversion change shows in the diff.
_VALUE_DEPENDENT = re.compile(
    r"^(fabric_host_\w+"
    r"|fabric_nic_(receive|transmit)_\w+_total"
    r"|fabric_collector_duration_seconds"
    r"|fabric_snapshot_timestamp_seconds"
    r"|fabric_exposition_render_seconds"
    r")[{ ]"
)


def series_lines(exposition: bytes) -> list[str]:
    lines = []
    for line in exposition.decode().splitlines():
        if line.startswith("#"):
            lines.append(line)
        elif _MACHINE_DEPENDENT.match(line):
            continue
        elif _VALUE_DEPENDENT.match(line):
            lines.append(line.rsplit(" ", 1)[0])
        else:
            lines.append(line)
    return lines


def test_exposition_matches_golden(
    fakenvml: FakeNvml, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A copy: the agent removes job files whose lease ran out and sets aside bad ones.
    job_dir = shutil.copytree(JOBS, tmp_path / "jobs")
    job_dir.chmod(0o755)
    with simulated_sampler(fakenvml, tmp_path, "golden", job_dir) as sampler:
        cache = ExpositionCache(sampler.collectors)
        sampler.sample(fakenvml.tick())
        # A second tick, 1 s later: GPM rates need two samples.
        cache.update(sampler.sample(fakenvml.tick(advance_s=1.0)))
        exposition = cache.update(sampler.sample(fakenvml.tick(advance_s=1.0))).body

    actual = series_lines(exposition)

    if request.config.getoption("--update-golden"):
        GOLDEN.write_text("\n".join(actual) + "\n")
    expected = GOLDEN.read_text().splitlines()
    diff = "\n".join(difflib.unified_diff(expected, actual, "golden", "actual", lineterm=""))
    assert not diff, f"exposition differs from {GOLDEN} (--update-golden rewrites it):\n{diff}"


def test_docs_list_every_metric() -> None:
    documented = set(re.findall(r"^\| `(fabric_\w+)`", DOCS.read_text(), re.MULTILINE))
    exported = set(re.findall(r"^# TYPE (\S+) ", GOLDEN.read_text(), re.MULTILINE))

    source = "\n".join(p.read_text() for p in (DOCS.parents[1] / "agent").rglob("*.py"))
    # Counters are declared without their _total suffix, as prometheus_client's are.
    unknown = {
        n
        for n in documented - exported
        if n not in source and n.removesuffix("_total") not in source
    }

    assert exported - documented == set(), f"add these to {DOCS}"
    assert unknown == set(), f"{DOCS} lists metrics the agent does not export"
