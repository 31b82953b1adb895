"""N simulated agents against one `fabric-aggregator run`: summary latency, loss, reads, CPU.

Per run (a fresh aggregator each: SQLite store in a temporary directory, its own TCP,
unix socket and metrics ports; ended by its PID), one generator process (this one, one
asyncio loop, grpc.aio) plays N agents:
  - each node opens its `Connect` stream, registers (8 GPUs, labels) and waits for
    `registered`; streams share channels, --streams-per-channel to a channel (each
    channel its own TCP connection);
  - once all N are registered, each node sends one summary a second, node i at phase
    i/N of the second, for --warmup then --duration seconds. A summary's `sampled_at`
    is its scheduled send time, so whatever delays it in this process counts as latency;
    a summary this process could not issue within 1 s of its time is skipped and
    counted as a miss. The summary is built by hand (see `node_summary`): what
    SummaryBuilder makes of an 8-GPU HGX node, 4 NICs and 2 QoS classes, values
    differing per node; each send is the node's pre-serialized summary with seq and
    sampled_at appended (protobuf merges repeated occurrences of a message field);
  - latency probe: a rotating sample of --probe-nodes nodes (a new sample every 10 s);
    after each of their sends, GetNode at 2, 5, 10, 20, 35, 50, 75, 100, 150 ms ... (see
    PROBE_OFFSETS_MS) after the scheduled time until the node's summary has that seq.
    Latency = the answer's arrival - the scheduled time (an upper bound); the previous
    poll's start bounds it from below, and their gap is the resolution;
  - reads, open loop at fixed rates from a separate channel of this process: ListNodes
    (first page of 100), QueryTop (GPU gpu_power_watts limit 10; NODE
    nic_transmit_bytes_per_second limit 10), --query-rate each a second; and a full
    listing (pages of 1000, sequential) every --full-list-every seconds.
In the measured window: CPU = utime + stime from /proc/PID/stat (aggregator) and
os.times() (this process), as a share of one core; the aggregator's RSS at the end;
the aggregator's fabric_aggregator_summary_delay_seconds histogram over the window
(quantiles interpolated in buckets, as histogram_quantile does). Loss: summaries sent
over the whole run against fabric_aggregator_summaries_total after a 3 s drain.
With --profile-seconds, py-spy samples the aggregator (non-blocking) in the middle of
the window of the largest N's first run; the top frames are kept in the JSON.

Writes --json (default bench/results/aggregator_load.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the agent package

from agent_overhead import cpu_seconds, free_port, rss_bytes, terminate  # noqa: E402

from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb  # noqa: E402
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2_grpc import (  # noqa: E402
    AggregatorServiceStub,
)

CONNECT = "/fabric.aggregator.v1.AggregatorService/Connect"
INTERVAL_S = 1.0
# A summary not issued within this long of its time is a miss (skipped, not sent late).
MISS_AFTER_S = 1.0
# GetNode polls after a sampled node's scheduled send, ms; then every 500 ms up to 5 s.
PROBE_OFFSETS_MS = (2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 400, 500, 650, 800, 1000)
PROBE_GIVE_UP_MS = 5000
PROBE_ROTATE_S = 10.0
REGISTER_CONCURRENCY = 200
DRAIN_S = 3.0
GPUS, NVLINKS, NICS = 8, 18, 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# --- the simulated node ---


def node_name(index: int) -> str:
    return f"node-{index:05d}"


def register_message(index: int) -> bytes:
    register = pb.Register(
        node_name=node_name(index),
        labels={
            "rack": f"r{index // 32:03d}",
            "pool": "train" if index % 4 else "infer",
            "gpu": "h200",
        },
        agent_version="bench",
        capabilities=["gpu", "nvlink", "nic", "rdma", "host", "qos", "qos-enforce"],
        gpu_count=GPUS,
        summary_interval=duration_pb2.Duration(seconds=int(INTERVAL_S)),
    )
    return pb.AgentMessage(register=register).SerializeToString()


def node_summary(index: int) -> pb.NodeSummary:
    """One summary interval of a busy 8-GPU HGX H200 node, by hand: what SummaryBuilder
    makes of two snapshots (rates, no deltas on a healthy node), values varying by node."""
    rng = random.Random(index)
    gpus = [
        pb.GpuSummary(
            index=gpu,
            uuid=f"GPU-{index:08x}-{gpu:04x}-4e1f-9a6c-{rng.getrandbits(48):012x}",
            utilization_ratio=round(rng.uniform(0.3, 1.0), 3),
            power_watts=round(rng.uniform(150.0, 700.0), 1),
            nvlink_transmit_bytes_per_second=rng.uniform(1e9, 4e11),
            nvlink_receive_bytes_per_second=rng.uniform(1e9, 4e11),
            nvlink_links=NVLINKS,
        )
        for gpu in range(GPUS)
    ]
    nics = [
        pb.NicSummary(
            device=f"ib{nic}",
            operstate="up",
            receive_bytes_per_second=rng.uniform(1e8, 5e10),
            transmit_bytes_per_second=rng.uniform(1e8, 5e10),
        )
        for nic in range(NICS)
    ]
    qos = [
        pb.QosClassSummary(
            policy="training", class_name=name, device="ib0", sent_bits_per_second=rate
        )
        for name, rate in (("gold", rng.uniform(1e9, 2e11)), ("bronze", rng.uniform(1e8, 5e10)))
    ]
    return pb.NodeSummary(
        interval=duration_pb2.Duration(seconds=int(INTERVAL_S)),
        gpus=gpus,
        nics=nics,
        qos_classes=qos,
        reconcile=pb.ReconcileSummary(passes={"success": 1}),
    )


def summary_bytes(static: bytes, seq: int, sampled_at_s: float) -> bytes:
    """The node's summary with this seq and time: parsing merges the two occurrences."""
    head = pb.NodeSummary(seq=seq)
    head.sampled_at.FromNanoseconds(int(sampled_at_s * 1e9))
    return static + pb.AgentMessage(summary=head).SerializeToString()


# --- the aggregator process ---


@dataclass(frozen=True)
class RunningAggregator:
    process: subprocess.Popen[bytes]
    target: str
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def running_aggregator(gone_after: str = "60s") -> Iterator[RunningAggregator]:
    with tempfile.TemporaryDirectory(prefix="fabric-agg-") as directory:
        base = Path(directory)
        grpc_port, metrics_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "agent.aggregator.main", "run",
            "--store", f"sqlite:///{base / 'state.db'}",
            "--grpc-listen", f"127.0.0.1:{grpc_port}",
            "--grpc-socket", str(base / "aggregator.sock"),
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--summary-interval", "1s",
            "--stale-after-missed", "3",
            "--gone-after", gone_after,
            "--log-level", "warning", "--insecure-plaintext-agents",
            # Every simulated agent connects from this one address, at once.
            "--registrations-per-peer-s", "1000000", "--registrations-per-s", "1000000",
        ]  # fmt: skip
        init = [sys.executable, "-m", "agent.aggregator.main", "init", "--store", argv[4]]
        subprocess.run(init, cwd=ROOT, check=True, capture_output=True)
        process = subprocess.Popen(argv, cwd=ROOT)
        aggregator = RunningAggregator(
            process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
        )
        try:
            wait_ready(aggregator)
            yield aggregator
        finally:
            terminate(process, 20)


def wait_ready(aggregator: RunningAggregator, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if aggregator.process.poll() is not None:
            raise RuntimeError(f"the aggregator exited with {aggregator.process.returncode}")
        try:
            with grpc.insecure_channel(aggregator.target) as channel:
                AggregatorServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=2)
            scrape(aggregator.metrics_url)
            return
        except (grpc.RpcError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def metric(body: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def buckets(body: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram, by upper bound."""
    found = {}
    for bound, count in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', body, re.M):
        found[float(bound)] = float(count)
    return found


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """histogram_quantile over the increase between two scrapes, in seconds."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


# --- the generator ---


@dataclass
class Tally:
    sent: int = 0
    missed: int = 0  # not issued within MISS_AFTER_S of its time
    failed: int = 0  # write raised
    streams_failed: dict[str, int] = field(default_factory=collections.Counter)
    # Send start minus scheduled time, and write completion minus scheduled time (ms),
    # of summaries scheduled in the window.
    issue_late_ms: list[float] = field(default_factory=list)
    written_late_ms: list[float] = field(default_factory=list)


@dataclass
class Probe:
    upper_ms: list[float] = field(default_factory=list)
    resolution_ms: list[float] = field(default_factory=list)
    # GetNode round trips of the probe in the window: the floor of what it can see.
    round_trip_ms: list[float] = field(default_factory=list)
    first_poll: int = 0  # summaries already visible at the first poll (2 ms)
    polls: int = 0
    not_seen: int = 0


@dataclass
class Schedule:
    """When node i sends seq k: t0 + (k - 1) + i / N."""

    t0: float
    nodes: int
    seqs: int
    window: tuple[float, float]

    def due(self, index: int, seq: int) -> float:
        return self.t0 + (seq - 1) * INTERVAL_S + INTERVAL_S * index / self.nodes

    def in_window(self, at_s: float) -> bool:
        return self.window[0] <= at_s < self.window[1]


# Requests go as bytes (no serializer): each node's summary is serialized once.
AgentCall = grpc.aio.StreamStreamCall[bytes, pb.AggregatorMessage]


async def register(channel: grpc.aio.Channel, index: int) -> AgentCall:
    connect: grpc.aio.StreamStreamMultiCallable[bytes, pb.AggregatorMessage]
    connect = channel.stream_stream(
        CONNECT, request_serializer=None, response_deserializer=pb.AggregatorMessage.FromString
    )
    call = connect()
    await call.write(register_message(index))
    reply = await call.read()
    if not isinstance(reply, pb.AggregatorMessage) or reply.WhichOneof("kind") != "registered":
        raise RuntimeError(f"{node_name(index)}: no `registered` answer: {reply}")
    return call


async def run_node(call: AgentCall, index: int, schedule: Schedule, tally: Tally) -> None:
    static = pb.AgentMessage(summary=node_summary(index)).SerializeToString()
    for seq in range(1, schedule.seqs + 1):
        due = schedule.due(index, seq)
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.time()
        if started - due > MISS_AFTER_S:
            tally.missed += 1
            continue
        try:
            await call.write(summary_bytes(static, seq, due))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            tally.failed += schedule.seqs - seq + 1
            name = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            tally.streams_failed[name] += 1
            return
        tally.sent += 1
        if schedule.in_window(due):
            tally.issue_late_ms.append(1e3 * (started - due))
            tally.written_late_ms.append(1e3 * (time.time() - due))


async def probe_node(
    stub: AggregatorServiceStub, index: int, schedule: Schedule, until_s: float, probe: Probe
) -> None:
    """Each summary of one node until `until_s`: when it became visible through GetNode."""
    request = pb.GetNodeRequest(name=node_name(index))
    offsets = [*PROBE_OFFSETS_MS, *range(1500, PROBE_GIVE_UP_MS + 1, 500)]
    seq = max(1, int((time.time() - schedule.due(index, 1)) // INTERVAL_S) + 2)
    while seq <= schedule.seqs and schedule.due(index, seq) < until_s:
        due = schedule.due(index, seq)
        previous_start = due
        seen_seq = 0
        for offset_ms in offsets:
            delay = due + offset_ms / 1e3 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.time()
            try:
                response = await stub.GetNode(request, timeout=10)  # type: ignore[misc]
            except grpc.aio.AioRpcError:
                previous_start = start
                continue
            probe.polls += 1
            answered = time.time()
            if schedule.in_window(due):
                probe.round_trip_ms.append(1e3 * (answered - start))
            seen_seq = response.node.summary.seq
            if seen_seq >= seq:
                if schedule.in_window(due):
                    probe.upper_ms.append(1e3 * (answered - due))
                    probe.resolution_ms.append(1e3 * (answered - previous_start))
                    probe.first_poll += previous_start == due
                break
            previous_start = start
        else:
            if schedule.in_window(due):
                probe.not_seen += 1
        # A slow answer may already show later seqs: move on to the next unseen one.
        seq = max(seq + 1, seen_seq + 1)


async def probe_loop(
    stub: AggregatorServiceStub, schedule: Schedule, sample: int, probe: Probe
) -> None:
    rotation = 0
    end = schedule.due(0, schedule.seqs + 1)
    while time.time() < end:
        until = min(end, time.time() + PROBE_ROTATE_S)
        chosen = random.Random(rotation).sample(range(schedule.nodes), min(sample, schedule.nodes))
        await asyncio.gather(*(probe_node(stub, i, schedule, until, probe) for i in chosen))
        rotation += 1


async def read_loop(
    name: str,
    period_s: float,
    call: Callable[[], Awaitable[object]],
    schedule: Schedule,
    into: dict[str, list[float]],
) -> None:
    """Open loop: `call()` every period; its latency kept when it starts in the window."""
    pending: set[asyncio.Task[None]] = set()

    async def once() -> None:
        start = time.time()
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            into.setdefault(f"{name}_errors", []).append(float(exc.code().value[0]))
            return
        if schedule.in_window(start):
            into.setdefault(name, []).append(1e3 * (time.time() - start))

    next_s = schedule.t0
    end = schedule.window[1]
    while next_s < end:
        delay = next_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(once())
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_s += period_s
    await asyncio.gather(*pending)


async def full_listing(stub: AggregatorServiceStub, page_size: int) -> int:
    token, count = "", 0
    while True:
        request = pb.ListNodesRequest(page_size=page_size, page_token=token)
        response = await stub.ListNodes(request, timeout=60)  # type: ignore[misc]
        count += len(response.nodes)
        token = response.next_page_token
        if not token:
            return count


def dist(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(values),
        "p50": round(statistics.median(values), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2),
    }


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
            "--nonblocking", "--format", "raw", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path, top: int = 25) -> dict[str, object]:
    """Self and inclusive sample shares of py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \((?:[^()]*/)?([^/()]+)\)$", r" (\1)", f) for f in stack.split(";")]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = {"self": own.most_common(top), "inclusive": inclusive.most_common(top)}
    return {
        "samples": total,
        **{
            kind: [(frame, round(100 * count / total, 1)) for frame, count in rows]
            for kind, rows in share.items()
        },
    }


async def one_run_async(
    aggregator: RunningAggregator, nodes: int, args: argparse.Namespace, profile: Path | None
) -> dict[str, object]:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(aggregator.target, options=options)
        for _ in range(-(-nodes // args.streams_per_channel))
    ]
    reads_channel = grpc.aio.insecure_channel(
        aggregator.target, options=[*options, ("grpc.max_receive_message_length", 64 << 20)]
    )
    stub = AggregatorServiceStub(reads_channel)
    tally, probe = Tally(), Probe()
    reads: dict[str, list[float]] = {}
    try:
        # Register everyone first.
        started = time.time()
        limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def register_one(index: int) -> AgentCall:
            async with limit:
                return await register(channels[index // args.streams_per_channel], index)

        calls = await asyncio.gather(*(register_one(i) for i in range(nodes)))
        register_s = time.time() - started

        seqs = int(args.warmup + args.duration)
        t0 = float(int(time.time()) + 1)
        window = (t0 + args.warmup, t0 + args.warmup + args.duration)
        schedule = Schedule(t0, nodes, seqs, window)
        senders = [
            asyncio.create_task(run_node(call, i, schedule, tally)) for i, call in enumerate(calls)
        ]
        top_gpu = pb.QueryTopRequest(entity=pb.TOP_ENTITY_GPU, metric="gpu_power_watts", limit=10)
        top_node = pb.QueryTopRequest(
            entity=pb.TOP_ENTITY_NODE, metric="nic_transmit_bytes_per_second", limit=10
        )
        page = pb.ListNodesRequest(page_size=100)
        queries: dict[str, tuple[float, Callable[[], Awaitable[object]]]] = {
            "list_page_100_ms": (args.query_rate, lambda: stub.ListNodes(page, timeout=30)),
            "top_gpu_power_ms": (args.query_rate, lambda: stub.QueryTop(top_gpu, timeout=30)),
            "top_node_nic_tx_ms": (args.query_rate, lambda: stub.QueryTop(top_node, timeout=30)),
            "list_all_pages_1000_ms": (
                1 / args.full_list_every if args.full_list_every > 0 else 0.0,
                lambda: full_listing(stub, 1000),
            ),
        }
        readers = [asyncio.create_task(probe_loop(stub, schedule, args.probe_nodes, probe))]
        readers += [
            asyncio.create_task(read_loop(name, 1 / rate, call, schedule, reads))
            for name, (rate, call) in queries.items()
            if rate > 0
        ]

        # The window.
        await asyncio.sleep(max(0.0, window[0] - time.time()))
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(None, scrape, aggregator.metrics_url)
        agg_cpu0, own0, w0 = cpu_seconds(aggregator.pid), os.times(), time.time()
        spy = None
        if profile is not None:
            await asyncio.sleep(max(0.0, (args.duration - args.profile_seconds) / 2))
            spy = start_profile(aggregator.pid, args.profile_seconds, profile)
        await asyncio.sleep(max(0.0, window[1] - time.time()))
        agg_cpu1, own1, w1 = cpu_seconds(aggregator.pid), os.times(), time.time()
        after = await loop.run_in_executor(None, scrape, aggregator.metrics_url)
        agg_rss = rss_bytes(aggregator.pid)
        own_rss = rss_bytes(os.getpid())

        await asyncio.gather(*senders)
        await asyncio.gather(*readers)
        await asyncio.sleep(DRAIN_S)
        final = await loop.run_in_executor(None, scrape, aggregator.metrics_url)
        if spy is not None:
            await loop.run_in_executor(None, spy.wait)
        for call in calls:
            call.cancel()
    finally:
        for channel in [*channels, reads_channel]:
            await channel.close()

    seconds = w1 - w0
    own_cpu = (own1.user + own1.system) - (own0.user + own0.system)
    counted = metric(final, "fabric_aggregator_summaries_total")
    in_window = metric(after, "fabric_aggregator_summaries_total") - metric(
        before, "fabric_aggregator_summaries_total"
    )
    delay_name = "fabric_aggregator_summary_delay_seconds"
    hist_before, hist_after = buckets(before, delay_name), buckets(after, delay_name)
    statuses = {
        status: metric(after, "fabric_aggregator_nodes", f'{{status="{status}"}}')
        for status in ("connected", "stale", "unreachable")
    }
    return {
        "nodes": nodes,
        "code": git_describe(),
        "channels": len(channels),
        "register_s": round(register_s, 2),
        "window_s": round(seconds, 2),
        "sent": tally.sent,
        "counted": int(counted),
        "lost": tally.sent - int(counted),
        "missed": tally.missed,
        "failed": tally.failed,
        "streams_failed": dict(tally.streams_failed),
        "summaries_per_s_in_window": round(in_window / seconds, 1),
        "issue_late_ms": dist(tally.issue_late_ms),
        "written_late_ms": dist(tally.written_late_ms),
        "latency_ms": dist(probe.upper_ms),
        "probe_resolution_ms_p50": round(statistics.median(probe.resolution_ms), 2)
        if probe.resolution_ms
        else None,
        "probe_round_trip_ms": dist(probe.round_trip_ms),
        "probe_first_poll_share": round(probe.first_poll / len(probe.upper_ms), 3)
        if probe.upper_ms
        else None,
        "probe_polls": probe.polls,
        "probe_not_seen": probe.not_seen,
        "histogram_ms": {
            q: round(1e3 * bucket_quantile(hist_before, hist_after, p), 1)
            for q, p in (("p50", 0.5), ("p99", 0.99))
        },
        **{name: dist(values) for name, values in sorted(reads.items())},
        "node_status_at_window_end": statuses,
        "aggregator_cpu_percent": round(100 * (agg_cpu1 - agg_cpu0) / seconds, 1),
        "aggregator_rss_mib": round(agg_rss / 2**20, 1),
        "generator_cpu_percent": round(100 * own_cpu / seconds, 1),
        "generator_rss_mib": round(own_rss / 2**20, 1),
    }


def one_run(nodes: int, args: argparse.Namespace, profile: Path | None) -> dict[str, object]:
    with running_aggregator(args.gone_after) as aggregator:
        result = asyncio.run(one_run_async(aggregator, nodes, args, profile))
    if profile is not None and profile.exists():
        result["profile"] = summarise_profile(profile)
    return result


READ_KEYS = ("list_page_100_ms", "list_all_pages_1000_ms", "top_gpu_power_ms", "top_node_nic_tx_ms")


def median_point(runs: list[dict[str, object]]) -> dict[str, object]:
    """Medians over runs of one N for the table."""

    def med(get: object) -> float | None:
        values = [get(run) for run in runs]  # type: ignore[operator]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    point: dict[str, object] = {"nodes": runs[0]["nodes"], "runs": len(runs)}
    for key in ("p50", "p99", "max"):
        point[f"latency_ms_{key}"] = med(lambda r, k=key: r["latency_ms"][k])
    point["probe_resolution_ms_p50"] = med(lambda r: r["probe_resolution_ms_p50"])
    point["probe_round_trip_ms_p50"] = med(lambda r: r["probe_round_trip_ms"]["p50"])
    for key in ("p50", "p99"):
        point[f"histogram_ms_{key}"] = med(lambda r, k=key: r["histogram_ms"][k])
    for key in (
        "sent",
        "lost",
        "missed",
        "failed",
        "aggregator_cpu_percent",
        "aggregator_rss_mib",
        "generator_cpu_percent",
        "register_s",
        "summaries_per_s_in_window",
    ):
        point[key] = med(lambda r, k=key: r[k])
    point["issue_late_ms_p99"] = med(lambda r: r["issue_late_ms"]["p99"])
    for name in READ_KEYS:
        for key in ("p50", "p99"):
            point[f"{name}_{key}"] = med(lambda r, n=name, k=key: r.get(n, {}).get(k))
    point["meets"] = all(
        r["latency_ms"]["p99"] is not None  # type: ignore[index]
        and r["latency_ms"]["p99"] <= 1000  # type: ignore[index]
        and r["lost"] == 0
        and r["missed"] == 0
        and r["failed"] == 0
        for r in runs
    )
    return point


def print_table(points: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.duration:g} s windows after {args.warmup:g} s warm-up, "
        f"{args.streams_per_channel} streams per channel; medians over runs\n"
    )

    def pair(p: dict[str, object], name: str) -> str:
        return f"{p[f'{name}_p50']} / {p[f'{name}_p99']}"

    print(
        "| nodes | runs | latency p50 / p99 / max ms | resolution ms | histogram p50 / p99 ms "
        "| sent | lost | missed | ListNodes 100 p50 / p99 ms | full listing p50 / p99 ms "
        "| QueryTop gpu p50 / p99 ms | QueryTop node p50 / p99 ms | aggregator CPU % "
        "| RSS MiB | generator CPU % | meets |"
    )
    print("|" + "---:|" * 16)
    for p in points:
        print(
            f"| {p['nodes']} | {p['runs']} | {p['latency_ms_p50']} / {p['latency_ms_p99']} / "
            f"{p['latency_ms_max']} | {p['probe_resolution_ms_p50']} | "
            f"{p['histogram_ms_p50']} / {p['histogram_ms_p99']} | {p['sent']} | {p['lost']} | "
            f"{p['missed']} | {pair(p, 'list_page_100_ms')} | "
            f"{pair(p, 'list_all_pages_1000_ms')} | {pair(p, 'top_gpu_power_ms')} | "
            f"{pair(p, 'top_node_nic_tx_ms')} | {p['aggregator_cpu_percent']} | "
            f"{p['aggregator_rss_mib']} | {p['generator_cpu_percent']} | "
            f"{'yes' if p['meets'] else 'no'} |"
        )


def git_describe() -> str:
    """The commit measured, "+changes" when the agent package differs from it."""

    def git(*argv: str) -> str:
        run = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return run.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "agent") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nodes",
        default="1000,2000,5000,10000",
        help="comma-separated node counts, one point each",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per point (fresh aggregator)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--streams-per-channel", type=int, default=200)
    parser.add_argument("--probe-nodes", type=int, default=50)
    parser.add_argument(
        "--gone-after",
        default="60s",
        help="the aggregator's --gone-after: its liveness writes are one per node per a "
        "quarter of it",
    )
    parser.add_argument(
        "--query-rate",
        type=float,
        default=5.0,
        help="ListNodes page and each QueryTop, calls per second (0: none)",
    )
    parser.add_argument("--full-list-every", type=float, default=5.0, help="seconds (0: never)")
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="py-spy the aggregator this long at the largest N (0: no)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/aggregator_load.json")
    args = parser.parse_args()

    counts = [int(n) for n in args.nodes.split(",")]
    fd_limit = raise_fd_limit(max(counts) + 4096)
    per_run: list[dict[str, object]] = []
    points = []
    for nodes in counts:
        runs = []
        for run in range(args.runs):
            profile = None
            if args.profile_seconds > 0 and nodes == max(counts) and run == 0:
                profile = args.json.with_suffix(f".{nodes}.pyspy.txt")
            result = one_run(nodes, args, profile)
            print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
            runs.append(result)
        per_run.extend(runs)
        points.append(median_point(runs))

    meeting = [p["nodes"] for p in points if p["meets"]]
    results = {
        "code": git_describe(),
        "gone_after": args.gone_after,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "streams_per_channel": args.streams_per_channel,
        "probe_nodes": args.probe_nodes,
        "query_rate_per_s": args.query_rate,
        "full_list_every_s": args.full_list_every,
        "fd_limit": fd_limit,
        "largest_meeting": max(meeting) if meeting else None,  # type: ignore[type-var]
        "points": points,
        "per_run": per_run,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(points, args)
    print(f"\nlargest N with p99 <= 1 s and nothing lost or missed: {results['largest_meeting']}")
    for result in per_run:
        spied: Any = result.get("profile")
        if spied is not None:
            print(f"\npy-spy at {result['nodes']} nodes, {spied['samples']} samples; self %:")
            for frame, share in spied["self"][:15]:
                print(f"  {share:5.1f}  {frame}")
            print("inclusive %:")
            for frame, share in spied["inclusive"][:25]:
                print(f"  {share:5.1f}  {frame}")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
