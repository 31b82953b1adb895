"""Where one tick's CPU goes: each collector, building the families, encoding, gzip;
and the exposition beside prometheus_client's `generate_latest` of the same snapshot.

In-process, on the simulated 8-GPU H200 node (tests/fakenvml) plus the RDMA fixture tree
and this host's interfaces. Each step is timed with time.thread_time over --ticks ticks
(--gap seconds apart, so GPM has two samples), steps run one after another on one
thread; medians are printed. The agent runs the collectors on worker threads; the
difference to `agent_overhead.py`'s whole-process figure is that hand-over, the event
waiter and the HTTP server.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from agent.node.collectors.base import SharedResources, Tick, file_samples
from agent.node.config import AgentConfig
from agent.node.exporter import SnapshotMetrics, TextEncoder, snapshot_families
from agent.node.runtime import build_collectors
from agent.node.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between ticks")
    args = parser.parse_args()
    os.environ.setdefault(
        "FAKE_NVML_SCENARIO", str(ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json")
    )
    config = AgentConfig(
        nvml_library=ROOT / "tests/fakenvml/libnvidia-ml.so.1",
        sysfs_root=ROOT / "tests/fixtures/sysfs",
    )
    shared = SharedResources()
    collectors = build_collectors(config, shared)
    encoder = TextEncoder()
    # The anchor: prometheus_client's own rendering of the same snapshot.
    custom = SnapshotMetrics(collectors)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(custom)
    anchor: list[float] = []
    steps: dict[str, list[float]] = {c.name: [] for c in collectors}
    steps |= {"families": [], "encode": [], "gzip": []}
    counts: dict[str, int] = {}
    body = b""
    try:
        for seq in range(1, args.ticks + 3):
            tick = Tick(seq, time.monotonic(), time.time())
            sections = {}
            for collector in collectors:
                start = time.thread_time()
                samples = collector.collect(tick)
                steps[collector.name].append(time.thread_time() - start)
                counts[collector.name] = len(samples)
                sections |= file_samples(collector.name, collector.sections, samples)
            snapshot = Snapshot("bench", "-", seq, 1.0, tick.wall_s, time.time(), sections, ())
            start = time.thread_time()
            families = list(snapshot_families(snapshot, collectors))
            steps["families"].append(time.thread_time() - start)
            start = time.thread_time()
            body = encoder.encode(families)
            steps["encode"].append(time.thread_time() - start)
            start = time.thread_time()
            gzip.compress(body, compresslevel=1, mtime=0)
            steps["gzip"].append(time.thread_time() - start)
            custom.snapshot = snapshot
            start = time.thread_time()
            generate_latest(registry)
            anchor.append(time.thread_time() - start)
            time.sleep(args.gap)
    finally:
        shared.close()

    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(f"CPU per tick, median of {args.ticks} ticks ({series} series, {len(body)} bytes)\n")
    print("| step | samples | ms |\n|---|---:|---:|")
    total = 0.0
    for name, values in steps.items():
        median_ms = 1e3 * statistics.median(values[2:])  # the first two warm caches up
        total += median_ms
        print(f"| {name} | {counts.get(name, '')} | {median_ms:.3f} |")
    print(f"| total | | {total:.3f} |")
    ours = 1e3 * statistics.median(
        [f + e for f, e in zip(steps["families"][2:], steps["encode"][2:], strict=True)]
    )
    theirs = 1e3 * statistics.median(anchor[2:])
    print(
        f"\nexposition: agent (families + encode) {ours:.3f} ms, prometheus_client "
        f"generate_latest over the same snapshot {theirs:.3f} ms, ratio {ours / theirs:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
