"""Fault scenarios end to end: the agent process against the simulated node, scraped over
HTTP. A fault on the GPU side never stops the other collectors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ROOT
from tests.conftest import free_port

SCENARIOS = ROOT / "tests/fakenvml/scenarios"
SYSFS = ROOT / "tests/fixtures/sysfs"
OTHERS = ("nic", "rdma", "host")


@dataclass
class RunningAgent:
    process: subprocess.Popen[str]
    url: str

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            text = response.read().decode()
        return {
            m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)
        }

    def wait_for(
        self, check: Callable[[dict[str, float]], bool], timeout_s: float = 20
    ) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        series: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                series = self.scrape()
            except OSError:
                series = {}
            if series and check(series):
                return series
            time.sleep(0.2)
        raise AssertionError(
            f"condition not met in {timeout_s} s; last scrape had {len(series)} series"
        )

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=20)
        return stderr


@pytest.fixture
def run_agent(fakenvml_library: Path, tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    started: list[RunningAgent] = []

    def start(scenario: str | None, library: Path | None = None) -> RunningAgent:
        port = free_port()
        env = dict(os.environ)
        if scenario is not None:
            env["FAKE_NVML_SCENARIO"] = str(SCENARIOS / scenario)
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--metrics-listen", f"127.0.0.1:{port}",
             "--interval", "200ms", "--interfaces", "lo", "--sysfs-root", str(SYSFS),
             "--state-dir", str(tmp_path / "state"),
             "--grpc-socket", str(tmp_path / f"agent-{port}.sock"), "--grpc-listen", "127.0.0.1:0",
             "--nvml-library", str(library or fakenvml_library)],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        agent = RunningAgent(process, f"http://127.0.0.1:{port}/metrics")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.stop()


def success(series: dict[str, float], collector: str) -> float | None:
    return series.get(f'fabric_collector_success{{collector="{collector}"}}')


def others_ok(series: dict[str, float]) -> bool:
    return all(success(series, name) == 1.0 for name in OTHERS)


def test_gpu_lost_mid_run_is_marked_and_the_rest_keeps_sampling(
    run_agent: Callable[..., RunningAgent],
) -> None:
    agent = run_agent("gpu-lost.json")

    # The GPU may fall off between the two GPU collectors of one tick; by the next tick
    # both see it.
    series = agent.wait_for(
        lambda s: (
            s.get('fabric_gpu_lost{gpu="3"}') == 1.0
            and 'fabric_nvlink_up{gpu="3",link="0"}' not in s
        )
    )

    assert success(series, "gpu") == 1.0 and success(series, "nvlink") == 1.0
    assert others_ok(series)
    assert all(series.get(f'fabric_gpu_lost{{gpu="{gpu}"}}') == 0.0 for gpu in (0, 1, 2, 4, 7))
    assert 'fabric_gpu_utilization_ratio{gpu="3"}' not in series
    assert 'fabric_gpu_utilization_ratio{gpu="4"}' in series
    assert series.get('fabric_gpu_xid_errors_total{gpu="3",xid="79"}') == 1.0
    links = [k for k in series if k.startswith("fabric_nvlink_transmit_bytes_total{")]
    assert len(links) == 7 * 18
    assert not any('gpu="3"' in k for k in links)


def test_link_down_shows_state_and_errors(run_agent: Callable[..., RunningAgent]) -> None:
    agent = run_agent("nvlink-down.json")

    series = agent.wait_for(lambda s: s.get('fabric_nvlink_up{gpu="1",link="7"}') == 0.0)

    assert series['fabric_nvlink_up{gpu="1",link="6"}'] == 1.0
    errors = 'fabric_nvlink_errors_total{gpu="1",link="7",type="%s"}'
    assert series[errors % "replay"] == 5.0
    assert series[errors % "recovery"] == 1.0
    assert series[errors % "crc_flit"] == 120.0
    assert series['fabric_nvlink_errors_total{gpu="1",link="6",type="replay"}'] == 0.0
    assert others_ok(series) and success(series, "nvlink") == 1.0


def test_xid_events_are_counted_per_gpu_and_code(run_agent: Callable[..., RunningAgent]) -> None:
    agent = run_agent("xid-79.json")

    series = agent.wait_for(lambda s: s.get('fabric_gpu_xid_errors_total{gpu="5",xid="79"}') == 2.0)

    assert series.get('fabric_gpu_xid_errors_total{gpu="2",xid="13"}') == 1.0
    assert 'fabric_gpu_xid_errors_total{gpu="0",xid="79"}' not in series
    assert series['fabric_gpu_lost{gpu="5"}'] == 0.0


def test_unsupported_functions_leave_series_out(run_agent: Callable[..., RunningAgent]) -> None:
    agent = run_agent("not-supported.json")

    series = agent.wait_for(lambda s: success(s, "gpu") == 1.0 and others_ok(s))

    assert 'fabric_gpu_power_watts{gpu="0"}' in series
    assert 'fabric_gpu_energy_joules_total{gpu="0"}' not in series
    assert 'fabric_gpu_temperature_celsius{gpu="0",sensor="memory"}' not in series
    assert 'fabric_gpu_temperature_celsius{gpu="0",sensor="gpu"}' in series
    assert not any(k.startswith("fabric_gpu_remapped_rows{") for k in series)


@pytest.mark.parametrize("scenario", ["driver-not-loaded.json", None])
def test_no_driver_runs_on_and_says_so_once(
    run_agent: Callable[..., RunningAgent], tmp_path: Path, scenario: str | None
) -> None:
    library = None if scenario else tmp_path / "missing" / "libnvidia-ml.so.1"
    agent = run_agent(scenario, library)

    series = agent.wait_for(lambda s: others_ok(s) and success(s, "gpu") == 0.0)
    time.sleep(1.0)  # five more ticks without a driver
    stderr = agent.stop()

    assert success(series, "nvlink") == 0.0
    assert not any(k.startswith("fabric_gpu_") for k in series)
    assert stderr.count("NVML not available") == 1, stderr
    assert agent.process.returncode == 0
