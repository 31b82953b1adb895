"""The running agent enforcing a policy directory, inside a throwaway namespace: restarts
that change nothing while traffic flows, drift restored within an interval, a kill -9
half-way through an apply, and a bad file that leaves the kernel alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.common.policy.model import load_policy_file
from agent.node.qos import tc
from agent.node.qos.desired import build_tree
from agent.node.qos.htb import HtbTree
from tests import ROOT
from tests.conftest import VethPair, iperf3_intervals
from tests.node.test_e2e_prometheus import http_get

METRICS_PORT = 9478
INTERVAL_S = 0.5

POLICY = """\
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: daemon}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: rest
  classes:
{classes}
    - {{name: rest, priority: 7, rate: 10Mbit}}
"""
SHAPED = """\
    - name: shaped
      priority: 1
      rate: 100Mbit
      ceil: 200Mbit
      match:
        - {dstPorts: ["5201"], protocol: tcp}
"""


def many_classes(count: int) -> str:
    return "".join(
        f"    - name: c{i}\n      priority: 3\n      rate: 1Mbit\n      match:\n"
        f'        - {{dstPorts: ["{6000 + i}"], protocol: tcp}}\n'
        for i in range(count)
    )


class Daemon:
    def __init__(self, pair: VethPair, tmp: Path) -> None:
        self.pair = pair
        self.policy_dir = tmp / "policies"
        self.state_dir = tmp / "state"
        self.policy_dir.mkdir(exist_ok=True)
        self.logs = tmp
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, classes: str = SHAPED) -> Path:
        path = self.policy_dir / "daemon.yaml"
        path.write_text(POLICY.format(device=self.pair.device, classes=classes))
        return path

    def desired(self) -> HtbTree:
        (loaded,) = load_policy_file(self.policy_dir / "daemon.yaml")
        return build_tree(loaded.policy).tree

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        log = (self.logs / f"agent-{self.runs}.log").open("wb")
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.pair.netns}", sys.executable, "-m", "agent",
             "run", "--collectors", "host,qos", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}",
             "--policy-dir", str(self.policy_dir), "--state-dir", str(self.state_dir),
             "--grpc-socket", str(self.logs / "agent.sock"), "--grpc-listen", "127.0.0.1:0",
             "--reconcile-interval", f"{INTERVAL_S}s", "--log-level", "info"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self.process

    def log(self, run: int | None = None) -> str:
        return (self.logs / f"agent-{run or self.runs}.log").read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def tree(self) -> HtbTree | None:
        return tc.read_tree(self.pair.device, netns=self.pair.netns)

    def metric(self, series: str) -> float | None:
        try:
            _, body = http_get(self.pair.netns, METRICS_PORT, "/metrics")
        except OSError:
            return None
        for line in body.decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `check` held; fails after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.fixture
def daemon(shaped_pair: VethPair, tmp_path: Path) -> Iterator[Daemon]:
    instance = Daemon(shaped_pair, tmp_path)
    try:
        yield instance
    finally:
        instance.stop(signal.SIGKILL)


def test_restart_changes_nothing_while_a_flow_is_shaped(daemon: Daemon) -> None:
    daemon.write()
    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "first apply")
    rates: list[float] = []
    flow = threading.Thread(target=lambda: rates.extend(iperf3_intervals(daemon.pair, 6)))
    flow.start()

    time.sleep(1.5)
    daemon.stop()  # --on-exit keep: enforcement stays
    tree_while_down = daemon.tree()
    daemon.start()
    wait_until(lambda: (daemon.metric('fabric_qos_reconcile_total{result="success"}') or 0) >= 1,
               30, "first pass after restart")  # fmt: skip
    flow.join()

    assert tree_while_down == daemon.desired()
    assert "change(s)" not in daemon.log(2), daemon.log(2)
    assert "nftables table reloaded" not in daemon.log(2)
    # Shaped the whole time: no second of the flow above the 200 Mbit/s ceiling.
    assert len(rates) == 6 and max(rates) < 210, rates


def test_deleted_class_comes_back_within_an_interval(daemon: Daemon) -> None:
    daemon.write()
    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "first apply")
    netns, device = daemon.pair.netns, daemon.pair.device

    for pref in ("100", "101"):
        subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "del", "dev", device,
                        "parent", "fa:", "pref", pref], check=True)  # fmt: skip
    subprocess.run(["ip", "netns", "exec", netns, "tc", "class", "del", "dev", device,
                    "classid", "fa:10"], check=True)  # fmt: skip
    took = wait_until(lambda: daemon.tree() == daemon.desired(), 5, "drift corrected")

    assert took <= INTERVAL_S + 0.5
    wait_until(
        lambda: daemon.metric(f'fabric_qos_drift_corrections_total{{device="{device}"}}') == 1.0,
        10, "drift counted",
    )  # fmt: skip


def test_bad_file_leaves_the_kernel_alone(daemon: Daemon) -> None:
    path = daemon.write()
    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "first apply")
    good = daemon.tree()

    path.write_text(path.read_text().replace("ceil: 200Mbit", "ceil: 2Gbit"))
    wait_until(lambda: (daemon.metric('fabric_qos_reconcile_total{result="invalid"}') or 0) >= 2,
               10, "rejected twice")  # fmt: skip

    assert daemon.tree() == good
    assert daemon.log().count("spec.classes[0].ceil: 2Gbit exceeds bandwidth 1Gbit") == 1


@pytest.mark.parametrize("delay_s", [0.3, 0.6, 0.9])
def test_kill_9_during_an_apply_then_restart_converges(daemon: Daemon, delay_s: float) -> None:
    daemon.write(many_classes(60))
    process = daemon.start()

    time.sleep(delay_s)  # somewhere in start-up or in the 60-class apply
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    daemon.start()

    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "converged after kill -9")
