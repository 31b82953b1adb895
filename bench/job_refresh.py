"""What reading the job directory costs a tick: `JobDirectory.refresh()` with --jobs job
files (each naming 8 GPUs), cold (every file read and parsed), warm (nothing changed: a
listing and one lstat per file), and with one file rewritten; then the jobs collector's
whole `collect` (refresh, matching against 8 GPUs, counts).

In-process, on a directory under /tmp; each figure is the median wall time of --repeat
runs (a cold run gets a fresh JobDirectory each time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.node.collectors.base import Tick
from agent.node.collectors.jobs import JobsCollector
from agent.node.jobs import JobDirectory
from agent.node.nvml import GpuInfo

GPUS = tuple(GpuInfo(i, "NVIDIA H200", f"GPU-{i:08x}-0000-0000-0000-000000000000", "", "", 18, True)
             for i in range(8))  # fmt: skip


def write_job(directory: Path, job_id: int, user: str = "alice") -> None:
    document = {
        "version": 1,
        "scheduler": "slurm",
        "job_id": str(job_id),
        "user": user,
        "gpus": [str(i) for i in range(8)],
        "expires_at": 4102444800,
        "lease": "time limit 01:00:00 (squeue) + 3600s margin",
        "qos": {"policy": "training-node", "className": "collectives",
                "cgroup": f"system.slice/slurmstepd.scope/job_{job_id}"},
    }  # fmt: skip
    (directory / f"slurm-job-{job_id}.json").write_text(json.dumps(document))


def median_us(run: Callable[[], object], repeat: int, before: Callable[[], object] = int) -> float:
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fabric-jobs-") as name:
        directory = Path(name)
        directory.chmod(0o755)
        for job_id in range(1, args.jobs + 1):
            write_job(directory, job_id)

        fresh: list[JobDirectory] = []
        cold = median_us(
            lambda: fresh[-1].refresh(),
            max(args.repeat // 10, 5),
            lambda: fresh.append(JobDirectory(directory)),
        )
        jobs = JobDirectory(directory)
        assert len(jobs.refresh()) == args.jobs
        warm = median_us(jobs.refresh, args.repeat)
        counter = iter(range(10**9))
        changed = median_us(
            jobs.refresh, args.repeat, lambda: write_job(directory, 1, f"u{next(counter)}")
        )
        collector = JobsCollector(jobs, lambda: GPUS)
        collect = median_us(lambda: collector.collect(Tick(1, 0.0, 0.0)), args.repeat)
    print(f"job directory with {args.jobs} job files (8 GPUs each), median of runs:")
    print(f"  refresh, cold (all read and parsed):  {cold:9.0f} us")
    print(f"  refresh, warm (nothing changed):      {warm:9.0f} us")
    print(f"  refresh, one file rewritten:          {changed:9.0f} us")
    print(f"  jobs collector collect (warm):        {collect:9.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
