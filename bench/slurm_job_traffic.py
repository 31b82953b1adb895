"""Where a real Slurm job's traffic goes, second by second from the job's start.

Needs root, the Slurm packages and iperf3 (`make test` installs them). Runs the test
cluster (tests/slurm/cluster.py: Debian's Slurm 22.05, one node on loopback, cgroup/v2,
PrologFlags=Alloc,Contain) with the project's prolog and epilog, and `fabric-agent run`
in a network namespace shaping one end of a veth with a two-class policy (the jobs'
class `collectives` up to 1 Gbit/s, everything else `best-effort` at 40 Mbit/s; tests/
slurm/node.py). Each job's batch script stamps its start (`date +%s.%N`) and runs a
3-second iperf3 flow to the veth's peer. While it runs the benchmark reads the two
classes' byte counters (`tc -s class show`, every ~20 ms) and reports, per second of the
job (from the stamp), the bytes each class carried, and how long after the script's
start the job's class first counted bytes. Medians over `--jobs` jobs (default 5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import netns_unavailable, veth_namespaces
from tests.slurm.cluster import SlurmCluster, missing_requirements
from tests.slurm.node import Node, Server, agent_node, hooks

COLLECTIVES, BEST_EFFORT = "fa:10", "fa:11"
SECONDS = 3


def job_script(node: Node, stamp: Path) -> str:
    pair = node.pair
    return (
        f"date +%s.%N > {stamp}\n"
        f"exec nsenter --net=/run/netns/{pair.netns} iperf3 -c {pair.peer_address}"
        f" -t {SECONDS} -i 1\n"
    )


def sample(node: Node, stop: threading.Event, out: list[tuple[float, dict[str, int]]]) -> None:
    while not stop.is_set():
        out.append((time.time(), node.class_bytes()))
        time.sleep(0.01)


def at(samples: list[tuple[float, dict[str, int]]], when: float, handle: str) -> int:
    """The class's counter at the last sample taken at or before `when`."""
    value = samples[0][1].get(handle, 0)
    for taken, counters in samples:
        if taken > when:
            break
        value = counters.get(handle, 0)
    return value


def one_job(slurm: SlurmCluster, node: Node, directory: Path, index: int) -> dict[str, float]:
    stamp = directory / f"start-{index}"
    samples: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(node, stop, samples))
    sampler.start()
    try:
        job_id = slurm.submit(job_script(node, stamp), time_limit="10")
        slurm.wait_job_state(job_id, "COMPLETED", timeout_s=60)
    finally:
        stop.set()
        sampler.join()
    started = float(stamp.read_text())
    result: dict[str, float] = {}
    for second in range(SECONDS):
        for name, handle in (("class", COLLECTIVES), ("best-effort", BEST_EFFORT)):
            begin = at(samples, started + second, handle)
            end = at(samples, started + second + 1, handle)
            result[f"{name} s{second}"] = (end - begin) / 1e6
    base = at(samples, started, COLLECTIVES)
    first = next(
        (taken for taken, counters in samples
         if taken >= started and counters.get(COLLECTIVES, 0) > base + 100_000),
        float("nan"),
    )  # fmt: skip
    result["first class bytes after (ms)"] = (first - started) * 1000
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    reason = missing_requirements() or netns_unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    slurm = SlurmCluster.start()
    try:
        with veth_namespaces() as pair, agent_node(pair) as node:
            node.start()
            node.wait_for("serving", lambda: "training-node" in node.policies())
            hooks(node, slurm)
            server = Server(pair)
            try:
                results = [one_job(slurm, node, node.base, i) for i in range(args.jobs)]
            finally:
                server.close()
    finally:
        slurm.stop()
    print(f"real Slurm jobs, {SECONDS} s iperf3 each, n={len(results)}; MB per second of "
          "the job (median, min-max)")  # fmt: skip
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"  {key:<30} {statistics.median(values):9.1f}   "
              f"({min(values):.1f}-{max(values):.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
