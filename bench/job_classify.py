"""How soon a Slurm job's traffic is classified: from the moment its cgroup appears to
the end of the reconcile pass that put its nftables rule in the kernel.

Needs root and a cgroup2 mount. Runs the daemon's reconcile loop and path watcher
(`agent.node.runtime.start_watcher`, as `fabric-agent run` does) inside a throwaway
network namespace (entered as `nsenter --net` enters it) on a veth, with a policy file
(class `collectives`) and a job directory. Per repetition: a job file is written as the
prolog writes it (its cgroup not there yet, as with Slurm 22.05, which makes it after
the prolog); once the assignment is pending, after a random pause of 0-100 ms, the job
cgroup is made under a scope of the benchmark's own (`mkdir`, the way slurmstepd makes
it) and the clock runs until a pass ends with the assignment enforced (the nftables
table then holds its rule, checked); then the job file and the cgroup are removed. The
same is measured with the watcher off (the passes every `--reconcile-interval`, 5 s by
default), the anchor: what the agent did before it watched the cgroup tree. Also timed:
an agent starting with the job file and the cgroup already there (its prolog ran while
the agent was down): from constructing the reconciler to the end of its first pass, the
job enforced.

Prints medians and p99 in ms. `--repetitions` (default 50 watched, 10 polled).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from agent.common.policy.model import detect_cgroup2_root
from agent.node.qos.api_objects import ENFORCED, PENDING
from agent.node.qos.pipeline import QosSettings
from agent.node.qos.reconciler import Reconciler
from agent.node.runtime import start_watcher

DEVICE = "fabjob0"
POLICY = """apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: node}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: best-effort
  classes:
    - {{name: collectives, priority: 1, rate: 600Mbit}}
    - {{name: best-effort, priority: 7, rate: 100Mbit}}
"""


def write_job(job_dir: Path, job_id: int, cgroup: str) -> Path:
    """The job file, as the prolog writes it (a dotfile renamed into place)."""
    path = job_dir / f"slurm-job-{job_id}.json"
    tmp = job_dir / f".{path.name}.tmp"
    document = {
        "version": 1,
        "scheduler": "slurm",
        "job_id": str(job_id),
        "user": "bench",
        "expires_at": time.time() + 3600,
        "qos": {"policy": "node", "className": "collectives", "cgroup": cgroup},
    }
    tmp.write_text(json.dumps(document))
    tmp.rename(path)
    return path


class Node:
    """The reconcile loop (and the watcher when `watched`)."""

    def __init__(self, base: Path, root: Path, interval_s: float, watched: bool):
        self.job_dir = base / "jobs"
        self.job_dir.mkdir(mode=0o755, exist_ok=True)
        policy_dir = base / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "node.yaml").write_text(POLICY.format(device=DEVICE))
        settings = QosSettings(policy_dir, base / "state", cgroup_root=root,
                               file_settle_s=0.0, job_dir=self.job_dir)  # fmt: skip
        self.reconciler = Reconciler(settings)
        self.enforced: dict[str, float] = {}
        self.changed = threading.Condition()
        self.reconciler.after_pass.append(self._after_pass)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.reconciler.run, args=(self.stop, interval_s))
        self.thread.start()
        if watched and not start_watcher(self.reconciler, self.stop):
            raise SystemExit("inotify unavailable")

    def _after_pass(self) -> None:
        now = time.perf_counter()
        with self.changed:
            for view in self.reconciler.policies():
                if view.source == "slurm":
                    self.enforced.setdefault(f"{view.name} {view.state}", now)
            self.changed.notify_all()

    def wait(self, key: str, timeout_s: float = 30.0) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.enforced, timeout_s):
                raise SystemExit(f"timed out waiting for {key}")
            return self.enforced[key]

    def close(self) -> None:
        self.stop.set()
        self.reconciler.wake.set()
        self.thread.join(30)
        self.reconciler.remove_all()
        self.reconciler.close()


def latencies(node: Node, scope: Path, root: Path, first_id: int, count: int) -> list[float]:
    times = []
    for job_id in range(first_id, first_id + count):
        cgroup = scope / f"job_{job_id}"
        relative = str(cgroup.relative_to(root))
        path = write_job(node.job_dir, job_id, relative)
        node.wait(f"slurm-job-{job_id} {PENDING}")
        time.sleep(random.uniform(0.0, 0.1))
        started = time.perf_counter()
        cgroup.mkdir()
        done = node.wait(f"slurm-job-{job_id} {ENFORCED}")
        times.append((done - started) * 1000)
        table = json.dumps(node.reconciler.kernel.read_nft_table())
        if relative not in table:
            raise SystemExit(f"{relative}: enforced but not in the nftables table")
        path.unlink()
        node.reconciler.wake.set()
        deadline = time.monotonic() + 30
        while relative in json.dumps(node.reconciler.kernel.read_nft_table()):
            if time.monotonic() > deadline:
                raise SystemExit(f"{relative}: rule not removed")
            time.sleep(0.01)
        cgroup.rmdir()
    return times


def restart_times(base: Path, root: Path, scope: Path, count: int) -> list[float]:
    times = []
    for i in range(count):
        cgroup = scope / f"restart_{i}"
        cgroup.mkdir()
        job_dir = base / "jobs"
        path = write_job(job_dir, 900000 + i, str(cgroup.relative_to(root)))
        started = time.perf_counter()
        settings = QosSettings(base / "policies", base / "state", cgroup_root=root,
                               file_settle_s=0.0, job_dir=job_dir)  # fmt: skip
        reconciler = Reconciler(settings)
        reconciler.reconcile()
        elapsed = (time.perf_counter() - started) * 1000
        state = {v.name: v.state for v in reconciler.policies()}[path.stem]
        if state != ENFORCED:
            raise SystemExit(f"{path.stem}: {state} after the first pass")
        times.append(elapsed)
        path.unlink()
        reconciler.reconcile()
        reconciler.close()
        cgroup.rmdir()
    return times


def summary(label: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{label:<44} n={len(values):<3} median {statistics.median(values):8.1f} ms"
            f"   p99 {p99:8.1f} ms   max {ordered[-1]:8.1f} ms")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=50)
    parser.add_argument("--polled", type=int, default=10)
    parser.add_argument("--reconcile-interval", type=float, default=5.0)
    args = parser.parse_args()
    root = detect_cgroup2_root()
    if os.geteuid() != 0 or root is None:
        print("needs root and a cgroup2 mount", file=sys.stderr)
        return 2
    netns = f"fabjob-{os.getpid()}-{secrets.token_hex(2)}"
    scope = root / f"fabric-bench-{os.getpid()}_slurmstepd.scope"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    scope.mkdir()
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", DEVICE, "type", "veth", "peer",
                        "name", DEVICE + "p"], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", netns, "link", "set", DEVICE, "up"], check=True)
        # The whole benchmark in the namespace, as `nsenter --net` runs the agent: its
        # kernel calls are then those of an agent in its own namespace. Threads started
        # from here on inherit it.
        pyroute2_netns.setns(netns)
        with tempfile.TemporaryDirectory() as directory:
            base = Path(directory)
            watched = Node(base, root, args.reconcile_interval, watched=True)
            try:
                latencies(watched, scope, root, 1, 3)  # warm-up
                fast = latencies(watched, scope, root, 100, args.repetitions)
            finally:
                watched.close()
            polled = Node(base, root, args.reconcile_interval, watched=False)
            try:
                slow = latencies(polled, scope, root, 1000, args.polled)
            finally:
                polled.close()
            restart = restart_times(base, root, scope, 10)
    finally:
        for child in scope.iterdir():
            if child.is_dir():
                child.rmdir()
        scope.rmdir()
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(
        f"cgroup appears -> pass with the job's rule ends (reconcile interval "
        f"{args.reconcile_interval:g}s)"
    )
    print(summary("watched (inotify)", fast))
    print(summary("polled (anchor: no watcher)", slow))
    print(
        f"ratio of medians (polled / watched): "
        f"{statistics.median(slow) / statistics.median(fast):.0f}x"
    )
    print(summary("agent start with the job there: first pass", restart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
