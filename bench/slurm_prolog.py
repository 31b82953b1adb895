"""What a Slurm Prolog costs and sees on the real test cluster (tests/slurm/cluster.py):
Debian's Slurm 22.05, one node on loopback, cgroup/v2, PrologFlags=Alloc,Contain.

Needs root and the Slurm packages (`make test` installs them). Measures, wall clock:
- cluster start: munged + slurmctld + slurmd until the node is IDLE (fresh cluster each);
- a trivial batch job (`exit 0`): `sbatch` to COMPLETED as `scontrol show job` reports it,
  polled every 50 ms;
- from the Prolog's last instruction (`date +%s.%N`) to the job cgroup's appearance (a
  thread polls the directory every 1 ms) and to the batch script's first instruction;
- what the Prolog pays to ask Slurm for the job's time limit: `squeue -h -j ID -o %l`
  and `scontrol show job ID`, each run 20 times inside one Prolog;
- where the Prolog's stderr goes at SlurmdDebug=info (the default) and debug2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.slurm.cluster import SlurmCluster, missing_requirements


def ms(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1000:.0f} ms, "
        f"min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f} (n={len(values)})"
    )


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


class CgroupPoller:
    """When (time.time()) a job's cgroup directory first exists, polled every 1 ms."""

    def __init__(self, cluster: SlurmCluster) -> None:
        self._cluster = cluster
        self._job_id: str | None = None
        self._seen: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)
        self._thread.start()

    def watch(self, job_id: str) -> None:
        self._job_id = job_id

    def _poll(self) -> None:
        while not self._stop.is_set():
            job_id = self._job_id
            if job_id is not None and self._cluster.job_cgroup_path(job_id).exists():
                self._seen = time.time()
                return
            time.sleep(0.001)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self._seen


def cgroup_appearance(cluster: SlurmCluster, work: Path, runs: int) -> None:
    prolog = script(
        work / "prolog-ts", 'echo "$(/bin/date +%s.%N)" > ' + f"{work}/prolog-end.$SLURM_JOB_ID\n"
    )
    to_cgroup: list[float] = []
    to_script: list[float] = []
    with cluster.hooks(prolog=prolog):
        for _ in range(runs):
            poller = CgroupPoller(cluster)
            job_id = cluster.submit(
                f'echo "$(/bin/date +%s.%N)" > {work}/script-start.$SLURM_JOB_ID\n'
            )
            poller.watch(job_id)
            cluster.wait_job_state(job_id, "COMPLETED")
            seen = poller.stop()
            prolog_end = float((work / f"prolog-end.{job_id}").read_text())
            script_start = float((work / f"script-start.{job_id}").read_text())
            if seen is not None:
                to_cgroup.append(seen - prolog_end)
            to_script.append(script_start - prolog_end)
    print(f"prolog end -> job cgroup exists: {ms(to_cgroup)}")
    print(f"prolog end -> batch script's first instruction: {ms(to_script)}")


def query_cost(cluster: SlurmCluster, work: Path, repeats: int) -> None:
    body = ""
    for name, command in (
        ("squeue", '/usr/bin/squeue -h -j "$SLURM_JOB_ID" -o %l'),
        ("scontrol", '/usr/bin/scontrol show job "$SLURM_JOB_ID"'),
    ):
        body += (
            f"i=0; while [ $i -lt {repeats} ]; do a=$(/bin/date +%s%N); {command} >/dev/null; "
            f"b=$(/bin/date +%s%N); echo $((b - a)) >> {work}/{name}.$SLURM_JOB_ID; "
            "i=$((i + 1)); done\n"
        )
    prolog = script(work / "prolog-query", body)
    with cluster.hooks(prolog=prolog):
        job_id = cluster.submit("exit 0\n")
        cluster.wait_job_state(job_id, "COMPLETED", timeout_s=120)
    for name in ("squeue", "scontrol"):
        values = [int(v) / 1e9 for v in (work / f"{name}.{job_id}").read_text().split()]
        print(f"{name} from inside the prolog: {ms(values)}")


def stderr_destination(cluster: SlurmCluster, work: Path) -> None:
    prolog = script(work / "prolog-say", 'echo "prolog-stderr-$SLURM_JOB_ID" >&2\n')
    failing = script(work / "prolog-fail", 'echo "prolog-stderr-$SLURM_JOB_ID" >&2\nexit 1\n')
    for label, hook in (("exit 0", prolog), ("exit 1", failing)):
        offset = cluster.log_offset(cluster.slurmd_log)
        with cluster.hooks(prolog=hook):
            job_id = cluster.submit("exit 0\n")
            cluster.wait_job(
                job_id,
                lambda job: job.state == "COMPLETED" or "held" in job.fields.get("Reason", ""),
                "completed or held",
            )
        log = cluster.log_since(cluster.slurmd_log, offset)
        lines = [line for line in log.splitlines() if f"prolog-stderr-{job_id}" in line]
        print(
            f"  SlurmdDebug={cluster.slurmd_debug}, prolog {label}: {lines or 'not in slurmd log'}"
        )
        cluster.reset()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"skipped: {reason}")
        return 0
    starts: list[float] = []
    for _ in range(3):
        cluster = SlurmCluster.start()
        starts.append(cluster.start_s)
        cluster.stop()
    print(f"cluster start to idle node: {ms(starts)}")
    cluster = SlurmCluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            trivial: list[float] = []
            for _ in range(args.runs):
                began = time.monotonic()
                cluster.wait_job_state(cluster.submit("exit 0\n"), "COMPLETED")
                trivial.append(time.monotonic() - began)
            print(f"trivial job, sbatch to COMPLETED: {ms(trivial)}")
            cgroup_appearance(cluster, work, args.runs)
            query_cost(cluster, work, 20)
            print("where the prolog's stderr goes:")
            stderr_destination(cluster, work)
    finally:
        cluster.stop()
    quiet = SlurmCluster.start(slurmd_debug="info")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stderr_destination(quiet, Path(tmp))
    finally:
        quiet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
