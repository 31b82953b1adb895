"""The agent's side of a Slurm node for tests and benchmarks: the agent in a veth's
namespace with a policy and a job directory, the project's hooks installed into the
test cluster, and iperf3 jobs to the veth's peer.

The agent runs in the veth's namespace entered with nsenter (it keeps the host's cgroup
mounts, which nftables resolves job cgroups against); a job's iperf3 enters the same
namespace with nsenter, which keeps its cgroup: the job's socket is in the job's
cgroup, as any job's is.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import VethPair
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


@contextmanager
def agent_node(pair: VethPair) -> Iterator[Node]:
    """A Node on `pair` with the policy in place (the agent not started); its agent
    stopped and its directory removed after."""
    base = Path(tempfile.mkdtemp(prefix="fabric-node-"))
    (base / "policies").mkdir()
    (base / "policies/training-node.yaml").write_text(POLICY.format(device=pair.device))
    instance = Node(pair, base, f"{base}/agent.sock")
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


def hooks(node: Node, slurm: SlurmCluster, **settings: str) -> None:
    """Install the project's prolog and epilog for `node`'s agent, every job in class
    collectives of training-node, with `settings` over that in their config file."""
    values = {"FABRIC_POLICY": "training-node", "FABRIC_CLASS": "collectives", **settings}
    install_hooks(slurm, node.base, node.job_dir, **values)


def install_hooks(slurm: SlurmCluster, directory: Path, job_dir: Path, **settings: str) -> None:
    """Install the project's prolog and epilog, writing job files into `job_dir`, with
    `settings` in their config file (kept in `directory`)."""
    conf = directory / "slurm.conf"
    values = {"FABRIC_JOB_DIR": str(job_dir), **settings}
    conf.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    for name, script in (("prolog", PROLOG), ("epilog", EPILOG)):
        wrapper = directory / f"{name}.sh"
        wrapper.write_text(f"#!/bin/sh\nFABRIC_SLURM_CONF={conf} exec /bin/sh {script}\n")
        wrapper.chmod(0o755)
    slurm.set_hooks(prolog=directory / "prolog.sh", epilog=directory / "epilog.sh")


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
