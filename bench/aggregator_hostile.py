"""Hostile input against one real `fabric-aggregator run`: does one peer grow its store
or memory? (docs/benchmarks.md, "Aggregator under hostile input").

A fresh aggregator (SQLite store in a temporary directory, plaintext TCP with
--insecure-plaintext-agents: the impostor's way in; default limits) and, from this
process, one peer that:
  1. registers 2,000 distinct node names, one after another, each with ~100 KB of
     labels (1,500 labels of 63-byte values); each stream opens, registers, reads the
     answer or the refusal, and closes. Reported: the status codes, the store file's
     size (state.db plus its -wal) and the aggregator's RSS before and after, and the
     largest ListNodes page over a full listing (client limit raised to 64 MiB to see
     the page, whatever its size);
  2. registers one node and sends it a 20,000-GPU summary (every GPU with an NVLink
     error) twice a second for 30 s on its stream. Reported: RSS before and after,
     summaries the aggregator counted received and dropped (its /metrics).

--baseline runs against a checkout from before these bounds (no `init`, no
--insecure-plaintext-agents): run this file from that checkout's bench/ directory.
Writes --json (default bench/results/aggregator_hostile.json) and prints the figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the agent package

from agent_overhead import free_port, rss_bytes, terminate  # noqa: E402

from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb  # noqa: E402
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2_grpc import (  # noqa: E402
    AggregatorServiceStub,
)

REGISTRATIONS, LABELS_EACH = 2_000, 1_500
GPUS, SUMMARIES_PER_S, SUMMARY_SECONDS = 20_000, 2, 30
BIG_CLIENT_BYTES = 64 * 1024 * 1024


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("state.db*"))


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def connect(stub: AggregatorServiceStub, messages: list[pb.AgentMessage]) -> str:
    """Open a stream, send `messages`, read the first answer; its code name."""
    try:
        first = next(stub.Connect(iter(messages), timeout=30))
    except grpc.RpcError as exc:
        return str(exc.code().name)
    except StopIteration:
        return "ENDED"
    return "OK" if first.HasField("registered") else "UNEXPECTED"


def labels(index: int) -> dict[str, str]:
    return {f"label-{i:05d}": f"{index:08d}" + "v" * 55 for i in range(LABELS_EACH)}


def list_all(stub: AggregatorServiceStub) -> tuple[int, int, int]:
    """(nodes, pages, largest page bytes) of a full listing."""
    token, nodes, pages, largest = "", 0, 0, 0
    while True:
        page = stub.ListNodes(pb.ListNodesRequest(page_size=1000, page_token=token), timeout=60)
        nodes, pages, largest = nodes + len(page.nodes), pages + 1, max(largest, page.ByteSize())
        token = page.next_page_token
        if not token:
            return nodes, pages, largest


def big_summary(seq: int) -> pb.AgentMessage:
    gpus = [
        pb.GpuSummary(
            index=i,
            uuid=f"GPU-{i:032d}",
            power_watts=700.0,
            utilization_ratio=0.5,
            # Errors on every GPU: the windowed top-N keeps an hour of them.
            nvlink_errors=1,
            nvlink_link_errors=[pb.LinkErrorDelta(link=0, errors=1)],
        )
        for i in range(GPUS)
    ]
    return pb.AgentMessage(summary=pb.NodeSummary(seq=seq, gpus=gpus))


def summary_flood(stub: AggregatorServiceStub) -> str:
    """Register big-node (retrying past the registration rate), then the summaries."""
    outgoing: queue.Queue[pb.AgentMessage | None] = queue.Queue()
    deadline = time.monotonic() + 60
    while True:
        outgoing.put(pb.AgentMessage(register=pb.Register(node_name="big-node")))
        call = stub.Connect(iter(outgoing.get, None), timeout=SUMMARY_SECONDS + 60)
        try:
            next(call)
            break
        except grpc.RpcError as exc:
            outgoing = queue.Queue()
            if time.monotonic() > deadline:
                return f"register: {exc.code().name}"
            time.sleep(1)

    def drain() -> None:
        with contextlib.suppress(grpc.RpcError):
            collections.deque(call, maxlen=0)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    message = big_summary(0).SerializeToString()
    start = time.monotonic()
    for seq in range(SUMMARIES_PER_S * SUMMARY_SECONDS):
        time.sleep(max(0.0, start + seq / SUMMARIES_PER_S - time.monotonic()))
        summary = pb.AgentMessage.FromString(message)
        summary.summary.seq = seq + 1
        outgoing.put(summary)
    time.sleep(2)
    outgoing.put(None)
    call.cancel()
    return "OK"


def run(baseline: bool, registrations: int = REGISTRATIONS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fabric-hostile-") as directory:
        base = Path(directory)
        store = f"sqlite://{base / 'state.db'}"
        port, metrics_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "agent.aggregator.main", "run", "--store", store,
            "--grpc-listen", f"127.0.0.1:{port}", "--grpc-socket", str(base / "a.sock"),
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "error",
        ]  # fmt: skip
        if not baseline:
            argv.append("--insecure-plaintext-agents")
            init = [sys.executable, "-m", "agent.aggregator.main", "init", "--store", store]
            subprocess.run(init, cwd=ROOT, check=True, capture_output=True)
        process = subprocess.Popen(argv, cwd=ROOT)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        options = [("grpc.max_receive_message_length", BIG_CLIENT_BYTES)]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        stub = AggregatorServiceStub(channel)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.ListNodes(pb.ListNodesRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.2)
            result: dict[str, Any] = {"baseline": baseline}
            result["rss_start_mib"] = rss_bytes(process.pid) / 2**20
            result["store_start_bytes"] = store_bytes(base)

            codes: collections.Counter[str] = collections.Counter()
            started = time.monotonic()
            for index in range(registrations):
                register = pb.Register(node_name=f"fake-{index:05d}", labels=labels(index))
                codes[connect(stub, [pb.AgentMessage(register=register)])] += 1
            result["registrations_s"] = time.monotonic() - started
            result["registration_codes"] = dict(codes)
            time.sleep(1)  # the store's writes land
            result["store_after_registrations_bytes"] = store_bytes(base)
            result["rss_after_registrations_mib"] = rss_bytes(process.pid) / 2**20
            try:
                nodes, pages, largest = list_all(stub)
                result["listing"] = {"nodes": nodes, "pages": pages, "largest_page_bytes": largest}
            except grpc.RpcError as exc:
                result["listing"] = {"error": f"{exc.code().name}: {exc.details()}"}

            before = rss_bytes(process.pid)
            result["summary_flood"] = summary_flood(stub)
            result["rss_before_summaries_mib"] = before / 2**20
            result["rss_after_summaries_mib"] = rss_bytes(process.pid) / 2**20
            result["summaries_counted"] = metric(metrics_url, "fabric_aggregator_summaries_total")
            if not baseline:
                result["summaries_dropped"] = metric(
                    metrics_url, "fabric_aggregator_summaries_dropped_total"
                )
            result["store_end_bytes"] = store_bytes(base)
            return result
        finally:
            channel.close()
            terminate(process, 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="store_true", help="a checkout without the bounds")
    parser.add_argument("--registrations", type=int, default=REGISTRATIONS)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/aggregator_hostile.json")
    args = parser.parse_args()
    result = run(args.baseline, args.registrations)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
