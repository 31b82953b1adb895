"""Real Slurm jobs through the project's prolog and epilog, with the real agent enforcing
a policy on a veth in a namespace: the job's traffic in its class from its first
interval, the class gone with the epilog, an agent that is down or hung while the hooks
run, and FABRIC_STRICT.

The agent runs in the veth's namespace entered with nsenter (it keeps the host's cgroup
mounts, which nftables resolves job cgroups against); the job's iperf3 enters the same
namespace with nsenter, which keeps its cgroup: the job's socket is in the job's
cgroup, as any job's is.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VethPair, iperf3_intervals
from tests.ctl.conftest import ROOT, run_fabricctl
from tests.slurm.cluster import SlurmCluster

PROLOG = ROOT / "contrib/slurm/fabric-agent-prolog.sh"
EPILOG = ROOT / "contrib/slurm/fabric-agent-epilog.sh"
# The job's class may take the whole veth; everything else is held to 40 Mbit/s, so a
# job flow that went unclassified for a moment shows as a slow interval.
POLICY = """apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: training-node}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: best-effort
  classes:
    - {{name: collectives, priority: 0, rate: 800Mbit, ceil: 1Gbit}}
    - {{name: best-effort, priority: 7, rate: 40Mbit, ceil: 40Mbit}}
"""
BEST_EFFORT_MBIT = 40
# Jobs' flows: comfortably above the best-effort ceiling, whatever the machine's load.
CLASSIFIED_MBIT = 3 * BEST_EFFORT_MBIT


@dataclass
class Node:
    """The agent's side of the node: its directories, its process, its namespace."""

    pair: VethPair
    base: Path
    socket: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def job_dir(self) -> Path:
        return self.base / "jobs"

    @property
    def log(self) -> Path:
        return self.base / "agent.log"

    def start(self) -> float:
        """Start the agent; the monotonic time it was started at."""
        started = time.monotonic()
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.pair.netns}", sys.executable, "-m",
                 "agent", "run", "--collectors", "host,qos", "--interval", "500ms",
                 "--metrics-listen", "127.0.0.1:0", "--grpc-socket", self.socket,
                 "--grpc-listen", "none", "--policy-dir", str(self.base / "policies"),
                 "--state-dir", str(self.base / "state"), "--job-dir", str(self.job_dir),
                 "--reconcile-interval", "5s"],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return started

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def policies(self) -> dict[str, dict[str, Any]]:
        """`fabricctl policy list -o json` by name; {} while the agent does not answer."""
        result = run_fabricctl("--agent", f"unix:{self.socket}", "--timeout", "2s", "policy",
                               "list", "-o", "json")  # fmt: skip
        if result.returncode != 0:
            return {}
        listed = json.loads(result.stdout)
        items = listed if isinstance(listed, list) else listed.get("policies", [])
        return {item["name"]: item for item in items}

    def wait_for(self, what: str, condition: Callable[[], bool], timeout_s: float = 30) -> float:
        """Wait until `condition`; the monotonic time it held."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"agent exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout_s}s: {self.log.read_text()}")
            time.sleep(0.02)
        return time.monotonic()

    def state_of(self, name: str) -> str:
        """enforced, pending, failed; "" when not listed."""
        state = str(self.policies().get(name, {}).get("state", ""))
        return state.removeprefix("POLICY_STATE_").lower()

    def class_bytes(self) -> dict[str, int]:
        """Bytes sent by each class of the policy's tree, by handle (`tc -s class show`;
        this tc has no JSON for classes)."""
        listing = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.pair.netns}", "tc", "-s", "class", "show",
             "dev", self.pair.device],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        sent: dict[str, int] = {}
        handle = ""
        for line in listing.splitlines():
            words = line.split()
            if words[:2] == ["class", "htb"]:
                handle = words[2]
            elif words[:1] == ["Sent"] and handle:
                sent[handle] = int(words[1])
        return sent


@pytest.fixture
def node(shaped_pair: VethPair, tmp_path: Path) -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(prefix="fabric-node-"))
    (base / "policies").mkdir()
    (base / "policies/training-node.yaml").write_text(POLICY.format(device=shaped_pair.device))
    instance = Node(shaped_pair, base, f"{base}/agent.sock")
    try:
        yield instance
    finally:
        instance.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def hooks(node: Node, slurm: SlurmCluster, **settings: str) -> None:
    """Install the project's prolog and epilog with `settings` in their config file."""
    conf = node.base / "slurm.conf"
    values = {"FABRIC_POLICY": "training-node", "FABRIC_CLASS": "collectives",
              "FABRIC_JOB_DIR": str(node.job_dir), **settings}  # fmt: skip
    conf.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    for name, script in (("prolog", PROLOG), ("epilog", EPILOG)):
        wrapper = node.base / f"{name}.sh"
        wrapper.write_text(f"#!/bin/sh\nFABRIC_SLURM_CONF={conf} exec /bin/sh {script}\n")
        wrapper.chmod(0o755)
    slurm.set_hooks(prolog=node.base / "prolog.sh", epilog=node.base / "epilog.sh")


def iperf3_job(pair: VethPair, seconds: int, wait_for: Path | None = None) -> str:
    """A batch script: (once `wait_for` exists) an iperf3 flow to the peer, JSON report."""
    waiting = waiting_job(wait_for) if wait_for else ""
    return (
        f"{waiting}exec nsenter --net=/run/netns/{pair.netns} iperf3 -c {pair.peer_address}"
        f" -t {seconds} -i 0.5 -J\n"
    )


class Server:
    """An iperf3 server on the peer, for one test."""

    def __init__(self, pair: VethPair) -> None:
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{pair.peer_netns}", "iperf3", "-s", "-B",
             pair.peer_address],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)  # iperf3 has no readiness signal

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def server(shaped_pair: VethPair) -> Iterator[Server]:
    instance = Server(shaped_pair)
    try:
        yield instance
    finally:
        instance.close()


def intervals_mbit(report: str) -> list[float]:
    data = json.loads(report[report.index("{") :])
    return [i["sum"]["bits_per_second"] / 1e6 for i in data["intervals"]]


def waiting_job(flag: Path) -> str:
    """A batch script that says it started (`<flag>.started`: the prolog is done), then
    waits for `flag`."""
    return f"touch {flag}.started\nwhile [ ! -e {flag} ]; do sleep 0.05; done\n"


def wait_started(node: Node, flag: Path, timeout_s: float = 30) -> float:
    started = Path(f"{flag}.started")
    return node.wait_for("the batch script started", started.exists, timeout_s)


def sent_bytes(report: str) -> int:
    return int(json.loads(report[report.index("{") :])["end"]["sum_sent"]["bytes"])


def job_file(node: Node, job_id: str) -> Path:
    return node.job_dir / f"slurm-job-{job_id}.json"


def test_a_jobs_traffic_is_in_its_class_from_its_first_interval_and_leaves_with_the_epilog(
    slurm: SlurmCluster, node: Node, server: Server
) -> None:
    node.start()
    node.wait_for("serving", lambda: "training-node" in node.policies())
    hooks(node, slurm)
    before = node.class_bytes()

    job_id = slurm.submit(iperf3_job(node.pair, 3), time_limit="10")
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=60)

    report = slurm.job_output(job_id)
    intervals = intervals_mbit(report)
    after = node.class_bytes()
    gained = {handle: after[handle] - before.get(handle, 0) for handle in after}
    # Leaves: collectives is the first class (fa:10), best-effort the second.
    collectives, best_effort = gained["fa:10"], gained["fa:11"]
    print(
        f"job {job_id}: Mbit/s per 0.5 s {[round(v) for v in intervals]}; class bytes "
        f"collectives {collectives}, best-effort {best_effort}, sent {sent_bytes(report)}"
    )
    # The first half second already ran at the job class's rate, not best-effort's.
    assert intervals[0] > CLASSIFIED_MBIT, intervals
    assert min(intervals) > CLASSIFIED_MBIT, intervals
    assert collectives >= 0.95 * sent_bytes(report)
    assert best_effort < 0.05 * collectives

    # The epilog removed the job file, and the agent the job's assignment.
    node.wait_for("epilog done", lambda: not job_file(node, job_id).exists())
    node.wait_for("assignment gone", lambda: f"slurm-job-{job_id}" not in node.policies())

    # A flow outside any job stays best-effort.
    server.close()
    outside = iperf3_intervals(node.pair, 2, 0.5)
    assert max(outside[1:]) < BEST_EFFORT_MBIT * 1.5, outside


def test_the_lease_is_the_time_limit_plus_the_margin_and_says_so(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    hooks(node, slurm)
    flag = tmp_path / "go"
    submitted = time.time()
    job_id = slurm.submit(waiting_job(flag), time_limit="1:30:00", gres="gpu:2")
    wait_started(node, flag)
    document = json.loads(job_file(node, job_id).read_text())
    flag.touch()
    assert document["qos"]["cgroup"] == slurm.job_cgroup(job_id)
    assert document["gpus"] == ["0", "1"]
    assert document["user"] == "root"
    assert "1:30:00" in document["lease"] and "squeue" in document["lease"]
    assert submitted + 5400 + 3600 - 5 <= document["expires_at"] <= time.time() + 5400 + 3600


def test_an_agent_down_during_the_prolog_classifies_the_job_when_it_is_back(
    slurm: SlurmCluster, node: Node, server: Server, tmp_path: Path
) -> None:
    hooks(node, slurm)  # no agent runs
    flag = tmp_path / "go"
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit(iperf3_job(node.pair, 2, wait_for=flag), time_limit="10")
    wait_started(node, flag)
    assert job_file(node, job_id).exists(), slurm.log_since(slurm.slurmd_log, offset)

    started = node.start()
    enforced = node.wait_for("enforced", lambda: node.state_of(f"slurm-job-{job_id}") == "enforced")
    print(f"agent start to the job enforced: {(enforced - started) * 1000:.0f} ms")
    flag.touch()
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=60)
    intervals = intervals_mbit(slurm.job_output(job_id))
    assert min(intervals) > CLASSIFIED_MBIT, intervals


def test_a_hung_agent_delays_neither_hook_and_catches_up_when_it_runs_again(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    node.start()
    node.wait_for("serving", lambda: "training-node" in node.policies())
    hooks(node, slurm)
    node.pause()
    try:
        flag = tmp_path / "go"
        submitted = time.monotonic()
        job_id = slurm.submit(waiting_job(flag), time_limit="10")
        # The old prolog waited 10 s on a hung agent before giving up.
        assert wait_started(node, flag) - submitted < 8
        assert job_file(node, job_id).exists()
    finally:
        node.resume()
    node.wait_for("enforced", lambda: node.state_of(f"slurm-job-{job_id}") == "enforced")

    node.pause()
    try:
        flag.touch()
        slurm.wait_job_state(job_id, "COMPLETED", timeout_s=30)
        node.wait_for("epilog done", lambda: not job_file(node, job_id).exists(), timeout_s=8)
    finally:
        node.resume()
    node.wait_for("assignment gone", lambda: f"slurm-job-{job_id}" not in node.policies())


def test_strict_mode_holds_a_job_that_cannot_be_classified_and_says_why(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    empty = tmp_path / "cgroup2"
    empty.mkdir()
    hooks(node, slurm, FABRIC_STRICT="1", FABRIC_CGROUP_ROOT=str(empty))
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit("true\n", time_limit="5")
    slurm.wait_job(
        job_id, lambda job: "held" in job.fields.get("Reason", "").lower() or
        job.fields.get("Reason") == "launch_failed_requeued_held", "held", timeout_s=30,
    )  # fmt: skip
    log = slurm.log_since(slurm.slurmd_log, offset)
    assert "prolog failed" in log and "looked for Slurm's cgroup v2 scope" in log
    assert not job_file(node, job_id).exists()


def test_without_strict_mode_the_job_runs_and_the_log_says_why_it_has_no_class(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    empty = tmp_path / "cgroup2"
    empty.mkdir()
    hooks(node, slurm, FABRIC_CGROUP_ROOT=str(empty))
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit("true\n", time_limit="5")
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=30)
    log = slurm.log_since(slurm.slurmd_log, offset)
    assert "looked for Slurm's cgroup v2 scope" in log
    document = (
        json.loads(job_file(node, job_id).read_text()) if job_file(node, job_id).exists() else {}
    )
    assert "qos" not in document
