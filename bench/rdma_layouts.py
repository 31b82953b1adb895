"""The RDMA collector per HCA layout: what it reads and what one tick costs.

For each fixture root under tests/fixtures/rdma/ (mlx4, i40iw, irdma, mlx5 RoCE, hfi1),
the golden root tests/fixtures/sysfs, and all of them merged into one tree: ports,
series exported, files opened and directories listed per tick, and the time of
`collect()` (wall and thread CPU) and of `metrics()`, medians over --calls calls after
ten warm-up calls, on one thread. The fixtures are plain files, not sysfs: on an HCA, a
read of a counter goes to the driver (mlx5 caches hw_counters for `lifespan` ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.node.collectors import rdma
from agent.node.collectors.base import Tick

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


@contextmanager
def counted_calls(counts: dict[str, int]) -> Iterator[None]:
    """Count the collector module's os.open and os.scandir calls."""
    real_open, real_scandir = os.open, os.scandir

    def open_counted(*args: Any, **kwargs: Any) -> int:
        counts["open"] += 1
        return real_open(*args, **kwargs)

    def scandir_counted(*args: Any, **kwargs: Any) -> Any:
        counts["scandir"] += 1
        return real_scandir(*args, **kwargs)

    rdma.os.open = open_counted  # type: ignore[assignment]
    rdma.os.scandir = scandir_counted  # type: ignore[assignment]
    try:
        yield
    finally:
        rdma.os.open = real_open
        rdma.os.scandir = real_scandir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    roots = {"golden (tests/fixtures/sysfs)": FIXTURES / "sysfs"}
    roots |= {p.name: p for p in sorted((FIXTURES / "rdma").iterdir())}
    with tempfile.TemporaryDirectory() as merged:
        for root in list(roots.values()):
            shutil.copytree(
                root / "class/infiniband", Path(merged) / "class/infiniband", dirs_exist_ok=True
            )
        roots["all of the above"] = Path(merged)
        print(
            "| layout | HCAs | ports | series | files opened | dirs listed "
            "| collect ms (wall) | collect ms (CPU) | metrics() ms |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, root in roots.items():
            collector = rdma.RdmaCollector(root)
            tick = Tick(1, time.monotonic(), time.time())
            counts = {"open": 0, "scandir": 0}
            with counted_calls(counts):
                samples = collector.collect(tick)
            for _ in range(10):
                collector.collect(tick)
            wall, cpu, render = [], [], []
            for _ in range(args.calls):
                start_wall, start_cpu = time.perf_counter(), time.thread_time()
                samples = collector.collect(tick)
                cpu.append(time.thread_time() - start_cpu)
                wall.append(time.perf_counter() - start_wall)
                start_wall = time.perf_counter()
                families = list(collector.metrics(samples))
                render.append(time.perf_counter() - start_wall)
            series = sum(len(family.rows) for family in families)
            print(
                f"| {name} | {len(rdma.RDMA_DEVICES.select(samples))} "
                f"| {len(rdma.RDMA.select(samples))} | {series} | {counts['open']} "
                f"| {counts['scandir']} | {statistics.median(wall) * 1e3:.3f} "
                f"| {statistics.median(cpu) * 1e3:.3f} | {statistics.median(render) * 1e3:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
