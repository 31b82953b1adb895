"""What a burst of maximal API requests costs the agent: its memory before, at the peak and
after, and whether sampling kept up.

Starts `fabric-agent run` on the simulated 8-GPU node (as bench/api_snapshot.py does),
with its unix socket and a plaintext TCP listener. Then three bursts, each of --clients
concurrent PlanPolicy calls, one client thread each:
  1. tcp-large: a 3.8 MB request each, over plaintext TCP (an unauthenticated client);
  2. unix-large: the same over the unix socket;
  3. unix-max: a request just under the receive limit (2 MiB) over the unix socket.
The request is a policy with one class holding as many match entries as fit the size.
For each: the status codes returned, the wall time of the burst, the agent's VmRSS before
and after (2 s after the burst, once the agent is idle again), its VmHWM (peak RSS since
start), and the largest gap between snapshot ticks during the burst (the sampler's
stall). Writes bench/results/api_hostile.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_overhead import free_port, terminate
from api_snapshot import FAKENVML, ROOT, SCENARIO

from agent.common.policy.documents import encode_document
from agent.proto.fabric.v1 import qos_service_pb2 as qos_pb
from agent.proto.fabric.v1 import telemetry_service_pb2 as pb
from agent.proto.fabric.v1.qos_service_pb2_grpc import QosServiceStub
from agent.proto.fabric.v1.telemetry_service_pb2_grpc import TelemetryServiceStub

# Without a receive limit of their own, clients may send what the server allows.
CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024)]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def plan_request(size_bytes: int) -> qos_pb.PlanPolicyRequest:
    """A PlanPolicy request of about `size_bytes`: one class, many match entries."""
    entry = {"dstCidr": "10.0.0.0/8", "dstPorts": ["5201"], "protocol": "tcp"}
    document = {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosPolicy",
        "metadata": {"name": "burst"},
        "spec": {
            "interface": "lo",
            "direction": "egress",
            "bandwidth": "1Gbit",
            "defaultClass": "rest",
            "classes": [
                {"name": "bulk", "priority": 1, "rate": "300Mbit", "match": [entry]},
                {"name": "rest", "priority": 7, "rate": "100Mbit"},
            ],
        },
    }
    bulk: dict[str, object] = document["spec"]["classes"][0]  # type: ignore[index]

    def request(entries: int) -> qos_pb.PlanPolicyRequest:
        bulk["match"] = [entry] * entries
        return qos_pb.PlanPolicyRequest(object=encode_document(document))

    one = request(1).ByteSize()
    per_entry = request(2).ByteSize() - one
    return request(1 + max(0, (size_bytes - one) // per_entry))


@contextmanager
def agent() -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as directory:
        base = Path(directory)
        (base / "policies").mkdir()
        tcp_port = free_port()
        argv = [
            sys.executable, "-m", "agent", "run",
            "--interval", "1s",
            "--metrics-listen", f"127.0.0.1:{free_port()}",
            "--nvml-library", str(FAKENVML),
            "--grpc-socket", str(base / "agent.sock"),
            "--grpc-listen", f"127.0.0.1:{tcp_port}",
            "--state-dir", str(base / "state"),
            "--policy-dir", str(base / "policies"),
            "--log-level", "warning",
        ]  # fmt: skip
        env = dict(os.environ, FAKE_NVML_SCENARIO=str(SCENARIO))
        process = subprocess.Popen(argv, cwd=ROOT, env=env)
        try:
            channel = grpc.insecure_channel(f"unix:{base / 'agent.sock'}")
            stub = TelemetryServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            channel.close()
            yield process, base / "agent.sock", tcp_port
        finally:
            terminate(process, 15)


class TickWatch:
    """The largest gap between the agent's snapshot ticks while running."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self._stub = TelemetryServiceStub(self._channel)
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = pb.WatchSnapshotsRequest(sections=[pb.SECTION_HOST])
        stream = self._stub.WatchSnapshots(request)
        last: float | None = None
        for message in stream:
            started = message.snapshot.started_unix_seconds
            if last is not None:
                self.gaps.append(started - last)
            last = started
            if self._stop.is_set():
                stream.cancel()
                return

    def __enter__(self) -> TickWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._channel.close()


def burst(
    target: str, request: qos_pb.PlanPolicyRequest, clients: int
) -> tuple[dict[str, int], float]:
    def call(_: int) -> str:
        channel = grpc.insecure_channel(target, options=CLIENT_OPTIONS)
        try:
            QosServiceStub(channel).PlanPolicy(request, timeout=300)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name
        finally:
            channel.close()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = Counter(pool.map(call, range(clients)))
    return dict(codes), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    large = plan_request(3_800_000)
    under_limit = plan_request(2 * 1024 * 1024 - 64 * 1024)
    results: dict[str, object] = {}
    with agent() as (process, socket, tcp_port):
        targets = {
            "tcp-large": (f"127.0.0.1:{tcp_port}", large),
            "unix-large": (f"unix:{socket}", large),
            "unix-max": (f"unix:{socket}", under_limit),
        }
        for name, (target, request) in targets.items():
            time.sleep(2)
            before = status_kib(process.pid, "VmRSS")
            with TickWatch(socket) as ticks:
                time.sleep(2.5)
                codes, wall_s = burst(target, request, args.clients)
                time.sleep(2.5)
            after = status_kib(process.pid, "VmRSS")
            results[name] = {
                "request_bytes": request.ByteSize(),
                "codes": codes,
                "wall_s": round(wall_s, 2),
                "rss_before_mib": round(before / 1024, 1),
                "rss_after_mib": round(after / 1024, 1),
                "rss_peak_since_start_mib": round(status_kib(process.pid, "VmHWM") / 1024, 1),
                "largest_tick_gap_s": round(max(ticks.gaps, default=0.0), 2),
            }
    out = ROOT / "bench/results/api_hostile.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'burst':<11} {'bytes':>9} {'codes':<28} {'wall s':>6} {'RSS before':>10} "
          f"{'after':>7} {'peak':>7} {'tick gap':>8}")  # fmt: skip
    for name, row in results.items():
        assert isinstance(row, dict)
        print(f"{name:<11} {row['request_bytes']:>9} {json.dumps(row['codes']):<28} "
              f"{row['wall_s']:>6} {row['rss_before_mib']:>10} {row['rss_after_mib']:>7} "
              f"{row['rss_peak_since_start_mib']:>7} {row['largest_tick_gap_s']:>8}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
