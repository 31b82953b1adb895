"""Wall time of the Slurm prolog and epilog (contrib/slurm), as slurmd runs them: /bin/sh
with no PATH, the environment slurmd gives, waited for by the caller.

Per case, `--runs` runs (default 20) of `/bin/sh HOOK`, each timed with perf_counter
around `subprocess.run` (fork, exec, the hook, wait: what slurmd waits for). Cases:
- prolog, stub squeue (a sh script printing a time limit), a class configured, the
  job's scope present in a fake cgroup2 tree, no syslog socket (log to stderr): the
  job's critical path;
- the same with logger writing to a syslog socket (a datagram socket this process
  reads);
- prolog with a real squeue when `--slurm-conf` names a running controller's
  configuration and `--job-id` one of its jobs (SLURM_CONF is passed as slurmd does);
- epilog, removing the file the prolog wrote;
- once: prolog with a squeue that never answers (FABRIC_SQUEUE_TIMEOUT=2), the bound.
Prints median, p99 (with 20 runs: the slowest) and max in ms, and the size of the job
file the prolog wrote.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROLOG = ROOT / "contrib/slurm/fabric-agent-prolog.sh"
EPILOG = ROOT / "contrib/slurm/fabric-agent-epilog.sh"
JOB = "4242"
NODE = "node1"
GOAL_PROLOG_MS = 100.0

STUB_SQUEUE = """#!/bin/sh
if [ -n "${STUB_SQUEUE_SLEEP:-}" ]; then
    sleep "$STUB_SQUEUE_SLEEP"
fi
echo 1:00:00
"""


def timed(script: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True,
                            timeout=60, check=False)  # fmt: skip
    elapsed_ms = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} exited {result.returncode}: {result.stderr!r}")
    return elapsed_ms


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {len(values)} | {statistics.median(values):.1f} | "
            f"{percentile(values, 0.99):.1f} | {max(values):.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--slurm-conf", help="a running controller's slurm.conf")
    parser.add_argument("--job-id", default=JOB, help="a job of that controller")
    parser.add_argument("--squeue", default="/usr/bin/squeue")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fabric-hooks-bench-") as name:
        base = Path(name)
        squeue = base / "squeue"
        squeue.write_text(STUB_SQUEUE)
        squeue.chmod(0o755)
        cgroup_root = base / "cgroup"
        (cgroup_root / "system.slice" / f"{NODE}_slurmstepd.scope").mkdir(parents=True)
        config = base / "slurm.conf"
        config.write_text("FABRIC_POLICY=training-node\nFABRIC_CLASS=collectives\n")
        job_dir = base / "jobs"
        env = {
            "SLURM_JOB_ID": JOB, "SLURM_JOB_USER": "alice", "SLURM_JOB_PARTITION": "gpu",
            "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7", "SLURMD_NODENAME": NODE,
            "SLURM_SCRIPT_CONTEXT": "prolog_slurmd", "FABRIC_SLURM_CONF": str(config),
            "FABRIC_JOB_DIR": str(job_dir), "FABRIC_CGROUP_ROOT": str(cgroup_root),
            "FABRIC_SQUEUE": str(squeue), "FABRIC_SYSLOG_SOCKET": str(base / "no-syslog"),
        }  # fmt: skip
        rows = []
        prolog = [timed(PROLOG, env) for _ in range(args.runs)]
        rows.append(row("prolog, stub squeue, stderr log", prolog))
        job_file = job_dir / f"slurm-job-{JOB}.json"
        size = job_file.stat().st_size
        example = job_file.read_text().strip()
        epilog = []
        for _ in range(args.runs):
            timed(PROLOG, env)
            epilog.append(timed(EPILOG, env))
        rows.append(row("epilog, stderr log", epilog))

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
            syslog.bind(str(base / "log.sock"))
            syslog.setblocking(False)
            logged = {**env, "FABRIC_SYSLOG_SOCKET": str(base / "log.sock")}
            with_logger = []
            for _ in range(args.runs):
                with_logger.append(timed(PROLOG, logged))
                while True:
                    try:
                        syslog.recv(65536)
                    except BlockingIOError:
                        break
            rows.append(row("prolog, stub squeue, logger to a syslog socket", with_logger))

        if args.slurm_conf:
            real = {**env, "SLURM_CONF": args.slurm_conf, "SLURM_JOB_ID": args.job_id,
                    "FABRIC_SQUEUE": args.squeue}  # fmt: skip
            real_runs = [timed(PROLOG, real) for _ in range(args.runs)]
            lease = (job_dir / f"slurm-job-{args.job_id}.json").read_text()
            if "(squeue)" not in lease:
                raise RuntimeError(f"squeue gave no time limit: {lease}")
            rows.append(row(f"prolog, real squeue ({args.squeue}) against slurmctld", real_runs))

        hung = timed(PROLOG, {**env, "STUB_SQUEUE_SLEEP": "30", "FABRIC_SQUEUE_TIMEOUT": "2"})
        rows.append(row("prolog, squeue hangs (FABRIC_SQUEUE_TIMEOUT=2)", [hung]))

    print("| case | runs | median ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for line in rows:
        print(line)
    print(f"\njob file: {size} bytes (8 GPUs, a class): {example}")
    median = statistics.median(prolog)
    verdict = "met" if median <= GOAL_PROLOG_MS else "NOT met"
    print(f"goal: prolog median <= {GOAL_PROLOG_MS:.0f} ms: {verdict} ({median:.1f} ms)")


if __name__ == "__main__":
    main()
