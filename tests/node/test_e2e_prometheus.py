"""End to end: the agent on the simulated H200 node, scraped by a real Prometheus.

Everything runs inside a throwaway network namespace (`veth_pair.netns`): the agent,
Prometheus on that namespace's loopback, and iperf3 sending across the veth to the peer
namespace. The test talks to Prometheus through sockets opened inside the namespace.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from tests import ROOT
from tests.conftest import VethPair

FAKENVML = ROOT / "tests/fakenvml/libnvidia-ml.so.1"
SCENARIOS = ROOT / "tests/fakenvml/scenarios"
SYSFS = ROOT / "tests/fixtures/sysfs"
AGENT_PORT, PROMETHEUS_PORT = 9478, 9090

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("prometheus", "promtool", "iperf3")),
    reason="needs prometheus, promtool and iperf3 (make test installs them)",
)


def in_netns(netns: str, *argv: str) -> list[str]:
    # nsenter, not `ip netns exec`: the latter remounts /sys for the namespace; the agent
    # keeps the host's mounts, as it would in production.
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def http_get(netns: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path from inside `netns`."""
    sock = pyroute2_netns.create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    sock.settimeout(timeout_s)
    try:
        sock.connect(("127.0.0.1", port))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        connection.sock = sock
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        sock.close()


def wait_http(netns: str, port: int, path: str, timeout_s: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = http_get(netns, port, path)
            if status == 200:
                return body
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{path} on port {port} not ready after {timeout_s} s: {last}")


@dataclass
class Stack:
    pair: VethPair
    tmp: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(self.pair.netns, PROMETHEUS_PORT, path)
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, predicate: Any, timeout_s: float = 30.0) -> float:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(promql)
            if value is not None and predicate(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{promql} never satisfied the check; last value {value}")


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def agent_argv(pair: VethPair, state: Path, *extra: str) -> list[str]:
    return in_netns(
        pair.netns, sys.executable, "-m", "agent", "run",
        "--metrics-listen", f"127.0.0.1:{AGENT_PORT}", "--interval", "1s",
        "--interfaces", pair.device, "--nvml-library", str(FAKENVML),
        "--sysfs-root", str(SYSFS), "--state-dir", str(state),
        "--grpc-socket", str(state.parent / "agent.sock"), "--grpc-listen", "127.0.0.1:0",
        *extra,
    )  # fmt: skip


def scenario_env(name: str) -> dict[str, str]:
    return {**os.environ, "FAKE_NVML_SCENARIO": str(SCENARIOS / name)}


@pytest.fixture
def stack(veth_pair: VethPair, tmp_path: Path) -> Iterator[Stack]:
    """The agent (8-GPU scenario) and Prometheus scraping it every second."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: fabric\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{AGENT_PORT}']\n"
    )
    processes = [
        start(
            agent_argv(veth_pair, tmp_path / "state"),
            tmp_path / "agent.log",
            scenario_env("hgx-h200-8gpu.json"),
        ),
        start(
            in_netns(
                veth_pair.netns,
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            ),
            tmp_path / "prometheus.log",
        ),
    ]
    try:
        wait_http(veth_pair.netns, AGENT_PORT, "/metrics")
        wait_http(veth_pair.netns, PROMETHEUS_PORT, "/-/ready")
        yield Stack(veth_pair, tmp_path)
    finally:
        for process in processes:
            stop(process)


def iperf3(pair: VethPair, seconds: int, bitrate: str) -> dict[str, Any]:
    """TCP from `pair.netns` to the peer namespace; returns iperf3's JSON report."""
    server = subprocess.Popen(
        in_netns(pair.peer_netns, "iperf3", "--server", "--one-off", "--bind", pair.peer_address),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            client = subprocess.run(
                in_netns(pair.netns, "iperf3", "--client", pair.peer_address, "--time",
                         str(seconds), "--bitrate", bitrate, "--json"),
                capture_output=True, text=True, check=False, timeout=seconds + 30,
            )  # fmt: skip
            report: dict[str, Any] = json.loads(client.stdout or "{}")
            if client.returncode == 0 and "sum_sent" in report.get("end", {}):
                return report
            time.sleep(0.1)  # the server was not listening yet
        raise AssertionError(f"iperf3 failed: {client.stdout} {client.stderr}")
    finally:
        stop(server)


def test_prometheus_sees_traffic_and_every_nvlink(stack: Stack) -> None:
    device = stack.pair.device
    stack.wait_for(f'fabric_nic_transmit_bytes_total{{device="{device}"}}', lambda v: v >= 0)

    report = iperf3(stack.pair, seconds=4, bitrate="200M")
    sent_bps = report["end"]["sum_sent"]["bits_per_second"]
    time.sleep(1.5)  # let the last second of traffic be scraped

    # Over the window that covers the transfer, the rate Prometheus computes from the
    # agent's counter is the rate iperf3 achieved (bytes on the wire include headers).
    rate = stack.scalar(
        f'max_over_time(rate(fabric_nic_transmit_bytes_total{{device="{device}"}}[3s])[10s:1s])'
    )
    assert rate is not None
    assert 0.8 * sent_bps / 8 < rate < 1.3 * sent_bps / 8, (rate, sent_bps / 8)

    assert stack.scalar("count(fabric_nvlink_transmit_bytes_total)") == 144
    assert stack.scalar("count(fabric_nvlink_receive_bytes_total)") == 144
    assert stack.scalar("count(fabric_gpu_info)") == 8
    # NVLink counters advance between scrapes.
    assert (stack.scalar("min(rate(fabric_nvlink_transmit_bytes_total[5s]))") or 0) > 0
    assert stack.scalar("min(fabric_collector_success)") == 1
    assert stack.scalar('up{job="fabric"}') == 1


def test_exposition_passes_promtool(stack: Stack) -> None:
    _, body = http_get(stack.pair.netns, AGENT_PORT, "/metrics")

    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)

    assert result.returncode == 0, result.stdout + result.stderr
