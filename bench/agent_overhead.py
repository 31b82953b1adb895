"""Agent overhead beside prometheus-node-exporter, in one run on this host.

Starts fabric-agent against the simulated 8-GPU H200 node (tests/fakenvml) plus this
host's NICs, and Debian's prometheus-node-exporter with its defaults, both on loopback.
Then, for each:
  1. steady state: CPU (utime+stime from /proc) and RSS over --duration seconds at the
     agent's 1 s interval, with one scrape per second of each (a 1 s scrape interval);
  2. scrape latency: --scrapes sequential scrapes (full body read, gzip as Prometheus
     asks), p50/p99;
  3. freshness: scrape time minus fabric_snapshot_timestamp_seconds, for the agent
     (node_exporter samples on the scrape, so its values are as fresh as its latency).
Where the time goes: the agent's own per-collector durations and render time, medians
over the steady-state scrapes.

Writes bench/results/agent_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKENVML = ROOT / "tests/fakenvml/libnvidia-ml.so.1"
SCENARIO = ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process by its PID and wait; SIGKILL it if it outlives `timeout_s`."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def scrape(url: str) -> tuple[float, bytes]:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        gzipped = response.headers.get("Content-Encoding") == "gzip"
    elapsed = time.perf_counter() - start
    if gzipped:
        import gzip

        body = gzip.decompress(body)
    return elapsed, body


def wait_ready(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            scrape(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    cpu_s: float = 0.0
    rss: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    series: int = 0
    body_bytes: int = 0


def series_count(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def gauge(body: bytes, name: str, labels: str = "") -> float | None:
    match = re.search(rb"^" + re.escape(f"{name}{labels}".encode()) + rb" (\S+)$", body, re.M)
    return float(match.group(1)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--scrapes", type=int, default=1000, help="latency scrapes per target")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/agent_overhead.json")
    args = parser.parse_args()

    node_exporter = shutil.which("prometheus-node-exporter")
    if node_exporter is None:
        print("prometheus-node-exporter is missing (make bench installs it)", file=sys.stderr)
        return 2
    agent_port, ne_port = free_port(), free_port()
    env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--metrics-listen",
            f"127.0.0.1:{agent_port}",
            "--nvml-library",
            str(FAKENVML),
            "--interval",
            "1s",
            "--state-dir",
            "/tmp/fabric-bench-state",
            "--grpc-socket",
            "/tmp/fabric-bench-state/agent.sock",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    exporter = subprocess.Popen(
        [node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    targets = [
        Target("fabric-agent", f"http://127.0.0.1:{agent_port}/metrics", agent),
        Target("node_exporter", f"http://127.0.0.1:{ne_port}/metrics", exporter),
    ]
    collector_ms: dict[str, list[float]] = {}
    render_ms: list[float] = []
    try:
        for target in targets:
            wait_ready(target.url)
        time.sleep(args.warmup)

        # 1. Steady state at one scrape per second each.
        start_cpu = {t.name: cpu_seconds(t.process.pid) for t in targets}
        start = time.monotonic()
        second = 0
        while time.monotonic() - start < args.duration:
            for target in targets:
                _, body = scrape(target.url)
                target.rss.append(rss_bytes(target.process.pid))
                target.series, target.body_bytes = series_count(body), len(body)
                if target is targets[0]:
                    for match in re.finditer(
                        rb'^fabric_collector_duration_seconds\{collector="([^"]+)"\} (\S+)$',
                        body,
                        re.M,
                    ):
                        collector_ms.setdefault(match.group(1).decode(), []).append(
                            float(match.group(2)) * 1e3
                        )
                    render = gauge(body, "fabric_exposition_render_seconds")
                    if render is not None:
                        render_ms.append(render * 1e3)
            second += 1
            time.sleep(max(0.0, start + second - time.monotonic()))
        elapsed = time.monotonic() - start
        for target in targets:
            target.cpu_s = cpu_seconds(target.process.pid) - start_cpu[target.name]
        cpu_ratio = {t.name: t.cpu_s / elapsed for t in targets}

        # 2. Scrape latency, and 3. freshness for the agent.
        for target in targets:
            for _ in range(args.scrapes):
                latency, body = scrape(target.url)
                target.latencies_s.append(latency)
                if target is targets[0]:
                    stamp = gauge(body, "fabric_snapshot_timestamp_seconds")
                    if stamp is not None:
                        target.freshness_s.append(time.time() - stamp)
    finally:
        for target in targets:
            target.process.send_signal(signal.SIGTERM)
        for target in targets:
            try:
                target.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                target.process.kill()

    results: dict[str, object] = {
        "duration_s": args.duration,
        "scrapes": args.scrapes,
        "targets": {},
    }
    for target in targets:
        results["targets"][target.name] = {  # type: ignore[index]
            "cpu_percent_of_core": round(100 * cpu_ratio[target.name], 3),
            "rss_mib_median": round(statistics.median(target.rss) / 2**20, 1),
            "rss_mib_max": round(max(target.rss) / 2**20, 1),
            "scrape_ms_p50": round(1e3 * statistics.median(target.latencies_s), 3),
            "scrape_ms_p99": round(1e3 * percentile(target.latencies_s, 0.99), 3),
            "series": target.series,
            "body_bytes": target.body_bytes,
            "freshness_ms_median": round(1e3 * statistics.median(target.freshness_s), 1)
            if target.freshness_s
            else None,
            "freshness_ms_p99": round(1e3 * percentile(target.freshness_s, 0.99), 1)
            if target.freshness_s
            else None,
            "freshness_ms_max": round(1e3 * max(target.freshness_s), 1)
            if target.freshness_s
            else None,
        }
    results["agent_collector_ms_median"] = {
        k: round(statistics.median(v), 3) for k, v in collector_ms.items()
    }
    results["agent_render_ms_median"] = (
        round(statistics.median(render_ms), 3) if render_ms else None
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    a, n = results["targets"]["fabric-agent"], results["targets"]["node_exporter"]  # type: ignore[index]
    print("| metric | fabric-agent | node_exporter | ratio |\n|---|---|---|---|")
    for key in (
        "cpu_percent_of_core",
        "rss_mib_median",
        "rss_mib_max",
        "scrape_ms_p50",
        "scrape_ms_p99",
        "series",
    ):
        ratio = a[key] / n[key] if n[key] else float("nan")
        print(f"| {key} | {a[key]} | {n[key]} | {ratio:.2f} |")
    print(
        f"| freshness_ms_median / p99 / max | {a['freshness_ms_median']} / "
        f"{a['freshness_ms_p99']} / {a['freshness_ms_max']} | (samples on scrape) | |"
    )
    print(
        "collector ms (median):",
        results["agent_collector_ms_median"],
        "render ms:",
        results["agent_render_ms_median"],
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
