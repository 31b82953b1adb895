"""200 WatchSnapshots streams at 1 Hz: the agent's CPU, its sampling jitter, delivery.

Starts `fabric-agent run` as bench/api_snapshot.py does (the simulated 8-GPU H200 node,
1 s interval, API on a unix socket in a temporary directory). One client process
(grpc.aio, one channel) keeps an observer stream open throughout (host section only,
every snapshot) and, per run (a fresh agent each, --runs of them):
  1. idle: --duration seconds with the observer alone, the anchor;
  2. loaded: --streams more streams, all sections, interval 1 s, opened together; after
     --warmup seconds, --duration seconds measured.
In each window:
  - CPU: utime + stime of the agent from /proc/PID/stat, as a share of one core;
  - jitter: how late each tick started against the sampler's fixed-rate schedule. The
    snapshot carries its tick's start (started_unix_seconds, taken as the tick begins);
    ticks are due on a grid `interval` apart, so lateness is the start's offset from
    that grid, measured from the least late tick of the run (both windows share the
    grid). The offset between the wall and monotonic clocks is checked to stay put;
  - tick duration: completed minus started, which streams must not stretch;
  - delivery: snapshots each stream received (one per second expected), the `missed`
    they were told of, and the delay from a snapshot's completion to its arrival.
Figures are medians over runs. Writes bench/results/api_watch.json, prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import duration_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_snapshot import (
    ROOT,
    RunningAgent,
    cpu_seconds,
    has_grpc_listen,
    percentile,
    running_agent,
)

from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub

INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Received:
    stream: int
    arrived_s: float  # wall clock, this process
    seq: int
    started_s: float
    completed_s: float
    missed: int


@dataclass
class Streams:
    """What every stream received, and how streams that ended early ended."""

    received: list[Received] = field(default_factory=list)
    ended: dict[int, str] = field(default_factory=dict)


async def watch(stub: TelemetryServiceStub, index: int, request: pb.WatchSnapshotsRequest,
                into: Streams) -> None:  # fmt: skip
    call = stub.WatchSnapshots(request)
    try:
        async for response in call:  # type: ignore[attr-defined]
            snapshot = response.snapshot
            into.received.append(
                Received(index, time.time(), snapshot.seq, snapshot.started_unix_seconds,
                         snapshot.completed_unix_seconds, response.missed)
            )  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        into.ended[index] = exc.code().name
    except asyncio.CancelledError:
        call.cancel()
        raise


def request(sections: list[pb.Section.ValueType]) -> pb.WatchSnapshotsRequest:
    return pb.WatchSnapshotsRequest(
        sections=sections, interval=duration_pb2.Duration(seconds=int(INTERVAL_S))
    )


def threads(pid: int) -> int:
    match = re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(match.group(1)) / 1024, 1) if match else 0.0


@dataclass
class Window:
    start_s: float
    end_s: float
    cpu_s: float
    threads: int
    rss_mib: float

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / (self.end_s - self.start_s)


async def measure(agent: RunningAgent, duration_s: float) -> Window:
    start_cpu, start = cpu_seconds(agent.pid), time.time()
    await asyncio.sleep(duration_s)
    end_cpu, end = cpu_seconds(agent.pid), time.time()
    return Window(start, end, end_cpu - start_cpu, threads(agent.pid), rss_mib(agent.pid))


async def one_run_async(agent: RunningAgent, streams: int, duration_s: float,
                        warmup_s: float) -> dict[str, object]:  # fmt: skip
    clock_offset_s = time.time() - time.monotonic()
    observed, loaded = Streams(), Streams()
    async with grpc.aio.insecure_channel(agent.target) as channel:
        stub = TelemetryServiceStub(channel)
        observer = asyncio.create_task(watch(stub, -1, request([pb.SECTION_HOST]), observed))
        await asyncio.sleep(warmup_s)
        idle = await measure(agent, duration_s)
        everything: list[pb.Section.ValueType] = []
        tasks = [
            asyncio.create_task(watch(stub, index, request(everything), loaded))
            for index in range(streams)
        ]
        await asyncio.sleep(warmup_s)
        busy = await measure(agent, duration_s)
        for task in [*tasks, observer]:
            task.cancel()
        await asyncio.gather(*tasks, observer, return_exceptions=True)
    clock_drift_s = time.time() - time.monotonic() - clock_offset_s

    # Every tick's start, whichever stream saw it; lateness against the grid.
    started = {r.seq: (r.started_s, r.completed_s) for r in observed.received + loaded.received}
    first = min(s for s, _ in started.values())
    offsets = {
        seq: (s - first) - round((s - first) / INTERVAL_S) * INTERVAL_S
        for seq, (s, _) in started.items()
    }
    baseline = min(offsets.values())

    def ticks(window: Window) -> dict[str, float]:
        inside = [seq for seq, (s, _) in started.items() if window.start_s <= s < window.end_s]
        late_ms = [1e3 * (offsets[seq] - baseline) for seq in inside]
        took_ms = [1e3 * (started[seq][1] - started[seq][0]) for seq in inside]
        return {
            "ticks": len(inside),
            "lateness_ms_p50": round(statistics.median(late_ms), 3),
            "lateness_ms_p99": round(percentile(late_ms, 0.99), 3),
            "lateness_ms_max": round(max(late_ms), 3),
            "tick_ms_p50": round(statistics.median(took_ms), 3),
            "tick_ms_max": round(max(took_ms), 3),
        }

    in_window = [r for r in loaded.received if busy.start_s <= r.arrived_s < busy.end_s]
    per_stream = {index: 0 for index in range(streams)}
    for r in in_window:
        per_stream[r.stream] += 1
    delay_ms = [1e3 * (r.arrived_s - r.completed_s) for r in in_window]
    window_s = busy.end_s - busy.start_s
    return {
        "idle": {
            "cpu_percent_of_core": round(idle.cpu_percent, 3),
            "threads": idle.threads,
            "rss_mib": idle.rss_mib,
            **ticks(idle),
        },
        "loaded": {
            "cpu_percent_of_core": round(busy.cpu_percent, 3),
            "threads": busy.threads,
            "rss_mib": busy.rss_mib,
            **ticks(busy),
            "snapshots_per_stream_per_s_min": round(min(per_stream.values()) / window_s, 3),
            "snapshots_per_stream_per_s_max": round(max(per_stream.values()) / window_s, 3),
            "missed_total": sum(r.missed for r in in_window),
            "streams_ended": dict(sorted(loaded.ended.items())),
            "delivery_ms_p50": round(statistics.median(delay_ms), 3) if delay_ms else None,
            "delivery_ms_p99": round(percentile(delay_ms, 0.99), 3) if delay_ms else None,
            "delivery_ms_max": round(max(delay_ms), 3) if delay_ms else None,
        },
        "clock_drift_ms": round(1e3 * clock_drift_s, 3),
    }


def one_run(streams: int, duration_s: float, warmup_s: float) -> dict[str, object]:
    with running_agent() as agent:
        return asyncio.run(one_run_async(agent, streams, duration_s, warmup_s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="agents started, one run each")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/api_watch.json")
    args = parser.parse_args()

    runs = [one_run(args.streams, args.duration, args.warmup) for _ in range(args.runs)]

    def median_of(phase: str, key: str) -> float | None:
        values = [run[phase][key] for run in runs]  # type: ignore[index]
        if any(v is None for v in values):
            return None
        return round(statistics.median(values), 3)

    keys = {
        "idle": ["cpu_percent_of_core", "threads", "rss_mib", "lateness_ms_p50",
                 "lateness_ms_p99", "lateness_ms_max", "tick_ms_p50", "tick_ms_max"],
        "loaded": ["cpu_percent_of_core", "threads", "rss_mib", "lateness_ms_p50",
                   "lateness_ms_p99", "lateness_ms_max", "tick_ms_p50", "tick_ms_max",
                   "snapshots_per_stream_per_s_min", "snapshots_per_stream_per_s_max",
                   "missed_total", "delivery_ms_p50", "delivery_ms_p99", "delivery_ms_max"],
    }  # fmt: skip
    results: dict[str, object] = {
        "runs": args.runs,
        "streams": args.streams,
        "duration_s": args.duration,
        "grpc_listen_flag": has_grpc_listen(),
        **{phase: {key: median_of(phase, key) for key in names} for phase, names in keys.items()},
        "per_run": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    idle, loaded = results["idle"], results["loaded"]
    print(f"medians of {args.runs} runs, {args.duration:g} s windows\n")
    print(f"| | observer only | + {args.streams} streams |\n|---|---:|---:|")
    for key in keys["idle"]:
        print(f"| {key} | {idle[key]} | {loaded[key]} |")  # type: ignore[index]
    for key in keys["loaded"][len(keys["idle"]) :]:
        print(f"| {key} | | {loaded[key]} |")  # type: ignore[index]
    ended = [run["loaded"]["streams_ended"] for run in runs]  # type: ignore[index]
    print(f"\nstreams ended early, per run: {ended}")
    print(f"clock drift per run, ms: {[run['clock_drift_ms'] for run in runs]}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
