"""GetSnapshot latency over the agent's unix socket, beside its /metrics scrape.

Starts `fabric-agent run` against the simulated 8-GPU H200 node (tests/fakenvml) plus
this host's NICs (1 s interval, every collector), with its gRPC API on a unix socket in
a temporary directory. Per run (a fresh agent each, --runs of them):
  1. --calls sequential GetSnapshot calls, all sections, from a real gRPC client
     (grpcio, one channel): wall time per call including the client's decoding,
     p50 / p99 / max;
  2. the same for each section alone (--section-calls each);
  3. the reference point: --calls sequential scrapes of the agent's /metrics, the same
     snapshot as Prometheus text (full body read, gzip as Prometheus asks).
The figures are medians over the runs. Where the time goes, in this process on a
snapshot of the same node: converting it to fabric.v1 messages, serializing them, the
agent's cached path (what a call costs the server once the snapshot is converted) and
the client's decoding.

Writes bench/results/api_snapshot.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the agent package

from agent_overhead import cpu_seconds, free_port, terminate  # noqa: E402

from agent.common.sections import enum_names  # noqa: E402
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb  # noqa: E402
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub  # noqa: E402

FAKENVML = ROOT / "tests/fakenvml/libnvidia-ml.so.1"
SCENARIO = ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json"
# The sections timed one by one: those with a typed field in the snapshot.
SECTION_NAMES = enum_names()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@cache
def has_grpc_listen() -> bool:
    """Whether this agent has the TCP listener flag: when it does, the bench keeps it on
    loopback rather than the default 0.0.0.0."""
    help_text = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "--grpc-listen" in help_text


@dataclass(frozen=True)
class RunningAgent:
    process: subprocess.Popen[bytes]
    socket_path: Path
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"


@contextmanager
def running_agent(interval: str = "1s") -> Iterator[RunningAgent]:
    """`fabric-agent run` on the simulated node, with its state, policies and socket in a
    temporary directory (short: unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as directory:
        base = Path(directory)
        (base / "policies").mkdir()
        metrics_port = free_port()
        argv = [
            sys.executable, "-m", "agent", "run",
            "--interval", interval,
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--nvml-library", str(FAKENVML),
            "--grpc-socket", str(base / "agent.sock"),
            "--state-dir", str(base / "state"),
            "--policy-dir", str(base / "policies"),
            "--log-level", "warning",
        ]  # fmt: skip
        if has_grpc_listen():
            argv += ["--grpc-listen", f"127.0.0.1:{free_port()}"]
        env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
        process = subprocess.Popen(argv, cwd=ROOT, env=env)
        agent = RunningAgent(
            process, base / "agent.sock", f"http://127.0.0.1:{metrics_port}/metrics"
        )
        try:
            wait_for_snapshot(agent)
            yield agent
        finally:
            terminate(process, 15)


def wait_for_snapshot(agent: RunningAgent, timeout_s: float = 30.0) -> None:
    """Until GetSnapshot answers with a snapshot (UNAVAILABLE before the first tick)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if agent.process.poll() is not None:
            raise RuntimeError(f"the agent exited with {agent.process.returncode}")
        try:
            with grpc.insecure_channel(agent.target) as channel:
                TelemetryServiceStub(channel).GetSnapshot(pb.GetSnapshotRequest(), timeout=2)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def timed(call: Callable[[], object], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


def scrape(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def summary_ms(latencies: list[float]) -> dict[str, float]:
    return {
        "p50": round(1e3 * statistics.median(latencies), 3),
        "p99": round(1e3 * percentile(latencies, 0.99), 3),
        "max": round(1e3 * max(latencies), 3),
    }


def one_run(calls: int, section_calls: int, warmup: int) -> dict[str, object]:
    with running_agent() as agent, grpc.insecure_channel(agent.target) as channel:
        stub = TelemetryServiceStub(channel)
        full = pb.GetSnapshotRequest()
        timed(lambda: stub.GetSnapshot(full, timeout=5), warmup)
        start_cpu = cpu_seconds(agent.pid)
        latencies = timed(lambda: stub.GetSnapshot(full, timeout=5), calls)
        server_cpu_s = cpu_seconds(agent.pid) - start_cpu
        response = stub.GetSnapshot(full, timeout=5)
        sections: dict[str, dict[str, float]] = {}
        for name in SECTION_NAMES:
            request = pb.GetSnapshotRequest(section_names=[name])
            timed(lambda request=request: stub.GetSnapshot(request, timeout=5), warmup)
            sections[name] = summary_ms(
                timed(lambda request=request: stub.GetSnapshot(request, timeout=5), section_calls)
            )
        timed(lambda: scrape(agent.metrics_url), warmup)
        scrapes = timed(lambda: scrape(agent.metrics_url), calls)
    return {
        "get_snapshot_ms": summary_ms(latencies),
        # CPU the agent spent per call, its sampling included (a tick or two per run).
        "agent_cpu_ms_per_call": round(1e3 * server_cpu_s / calls, 3),
        "response_bytes": response.ByteSize(),
        "counts": {
            "gpus": len(response.snapshot.gpus),
            "nvlinks": len(response.snapshot.nvlinks),
            "nics": len(response.snapshot.nics),
            "rdma_ports": len(response.snapshot.rdma_ports),
        },
        "sections_ms": sections,
        "metrics_scrape_ms": summary_ms(scrapes),
    }


def in_process_costs(repeats: int = 200) -> dict[str, float]:
    """Median ms per step on a snapshot of the simulated node built in this process."""
    os.environ.setdefault("FAKE_NVML_SCENARIO", str(SCENARIO))
    from agent.node.api import convert, telemetry
    from agent.node.collectors.base import SharedResources, Tick, file_samples
    from agent.node.config import AgentConfig
    from agent.node.runtime import build_collectors
    from agent.node.snapshot import Snapshot

    shared = SharedResources()
    try:
        collectors = build_collectors(AgentConfig(nvml_library=FAKENVML), shared)
        sections: dict[str, tuple[object, ...]] = {}
        for seq in (1, 2):  # two ticks, so GPM has a sample pair
            tick = Tick(seq, time.monotonic(), time.time())
            sections = {
                name: samples
                for c in collectors
                for name, samples in file_samples(c.name, c.sections, c.collect(tick)).items()
            }
            time.sleep(0.2)
        snapshot = Snapshot("bench", "-", 2, 1.0, tick.wall_s, time.time(), sections, ())
    finally:
        shared.close()

    def median_ms(step: Callable[[], object]) -> float:
        return round(1e3 * statistics.median(timed(step, repeats)), 4)

    message = convert.snapshot_to_proto(snapshot)
    published = telemetry.PublishedSnapshot(snapshot)
    every = convert.validate_sections(())
    body = telemetry.get_snapshot_response(published.encoded(every))
    return {
        "convert_ms": median_ms(lambda: convert.snapshot_to_proto(snapshot)),
        "serialize_ms": median_ms(message.SerializeToString),
        # What a call costs the server once a reader has converted the snapshot.
        "cached_response_ms": median_ms(
            lambda: telemetry.get_snapshot_response(published.encoded(every))
        ),
        "client_decode_ms": median_ms(lambda: pb.GetSnapshotResponse.FromString(body)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="agents started, one run each")
    parser.add_argument("--calls", type=int, default=2000, help="GetSnapshot calls per run")
    parser.add_argument("--section-calls", type=int, default=500, help="per section, per run")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/api_snapshot.json")
    args = parser.parse_args()

    runs = [one_run(args.calls, args.section_calls, args.warmup) for _ in range(args.runs)]

    def median_of(pick: Callable[[dict[str, object]], float]) -> float:
        return round(statistics.median(pick(run) for run in runs), 3)

    def ms(key: str, stat: str, section: str | None = None) -> float:
        if section is None:
            return median_of(lambda run: run[key][stat])  # type: ignore[index]
        return median_of(lambda run: run[key][section][stat])  # type: ignore[index]

    results: dict[str, object] = {
        "runs": args.runs,
        "calls": args.calls,
        "section_calls": args.section_calls,
        "grpc_listen_flag": has_grpc_listen(),
        "get_snapshot_ms": {s: ms("get_snapshot_ms", s) for s in ("p50", "p99", "max")},
        "metrics_scrape_ms": {s: ms("metrics_scrape_ms", s) for s in ("p50", "p99", "max")},
        "sections_ms": {
            name: {s: ms("sections_ms", s, name) for s in ("p50", "p99", "max")}
            for name in SECTION_NAMES
        },
        "agent_cpu_ms_per_call": median_of(lambda run: run["agent_cpu_ms_per_call"]),  # type: ignore[arg-type,return-value]
        "response_bytes": runs[-1]["response_bytes"],
        "counts": runs[-1]["counts"],
        "in_process": in_process_costs(),
        "per_run": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    get, ref = results["get_snapshot_ms"], results["metrics_scrape_ms"]
    print(f"medians of {args.runs} runs, {args.calls} calls each; {results['counts']}, "
          f"{results['response_bytes']} bytes\n")  # fmt: skip
    print("| | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")
    print(f"| GetSnapshot, all sections | {get['p50']} | {get['p99']} | {get['max']} |")  # type: ignore[index]
    for name, stats in results["sections_ms"].items():  # type: ignore[attr-defined]
        print(f"| GetSnapshot, {name} only | {stats['p50']} | {stats['p99']} | {stats['max']} |")
    print(f"| /metrics scrape (gzip) | {ref['p50']} | {ref['p99']} | {ref['max']} |")  # type: ignore[index]
    print(f"\nagent CPU per GetSnapshot call: {results['agent_cpu_ms_per_call']} ms")
    print("in process (median ms):", results["in_process"])
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
