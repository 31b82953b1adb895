"""What the aggregator accepts from one agent: every bound on a registration and a
summary, in one place (docs/api.md has the table), and the registration rate limiter.

The bounds are far above what a real node sends (the largest has 8-16 GPUs, a few
dozen NICs, a few hundred QoS classes) and far below what would let one peer grow the
aggregator's memory or store without limit. A registration over a bound is refused
(INVALID_ARGUMENT naming the field and the limit); a summary over a bound, or with a
value that is not finite or out of range, is dropped and counted
(`fabric_aggregator_summaries_dropped{reason}`): the node's previous summary stays, and
a node that only sends such summaries turns stale, which is what an operator sees.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field

from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb

# --- registration ---

# Labels per node, and their keys and values together in bytes: selectors need a few
# (pool, rack, zone, generation), and every label is kept in memory and in the store.
MAX_LABELS = 64
MAX_LABEL_BYTES = 8 * 1024
MAX_AGENT_VERSION_BYTES = 64
MAX_CAPABILITIES = 32
MAX_CAPABILITY_BYTES = 64
# The summary interval an agent may register: summaries kept stale/gone judgement within
# minutes (an interval of 1e9 s would keep a silent node "connected" forever).
MIN_SUMMARY_INTERVAL_S, MAX_SUMMARY_INTERVAL_S = 0.1, 300.0

# --- summaries ---

MAX_GPUS = 256
MAX_NICS = 512
MAX_QOS_CLASSES = 4096
# Per GPU: links (NVLink 5 has 18 per GPU), XID kinds in one interval.
MAX_LINKS_PER_GPU = 64
MAX_XIDS_PER_GPU = 64
MAX_RECONCILE_RESULTS = 16
# Jobs per node summary (the agent sends the lowest job ids and counts the rest), and GPUs
# per job: a job holds at most the node's GPUs.
MAX_JOBS = 64
MAX_GPUS_PER_JOB = MAX_GPUS
# Any string of a summary (a GPU's UUID, a NIC's device, a class's policy and name).
MAX_SUMMARY_STRING_BYTES = 256
# Values: a GPU draws a few kW at most; 10^13 bytes/s is 80 Tbit/s, beyond any link.
MAX_POWER_WATTS = 100_000.0
MAX_BYTES_PER_SECOND = 1e13
MAX_BITS_PER_SECOND = 8e13

# --- policy reports ---

# A report names a fleet policy: a DNS label, as agent/common/policy/model.py has it.
POLICY_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# A report's message (why a policy failed) is kept per policy and node and carried in
# events: longer ones are cut to this many bytes.
MAX_REPORT_MESSAGE_BYTES = 4096

# --- the fleet ---

# Nodes one aggregator keeps (connected, stale or gone): each costs its labels and one
# summary. A new name past this is refused (RESOURCE_EXHAUSTED).
DEFAULT_MAX_NODES = 20_000
# Registrations (stream opens) per second: from one peer address, and in all. A fleet
# of 10,000 agents reconnecting after an aggregator restart spreads over their 1-60 s
# backoff; the overall burst lets a fleet of that size in within seconds.
DEFAULT_REGISTRATIONS_PER_PEER_S = 5.0
REGISTRATION_BURST_PER_PEER = 20
DEFAULT_REGISTRATIONS_PER_S = 500.0
REGISTRATION_BURST = 2_000
# Agent streams open but not registered yet (each waits up to REGISTER_TIMEOUT_S for
# its first message, tens of KiB each): from one peer address, and in all on one
# listener. A real agent registers at once, so these are only reached by streams opened
# and left silent.
MAX_UNREGISTERED_PER_PEER = 32
MAX_UNREGISTERED = 1024
# ListNodes answers stay under this many bytes per page, whatever page_size asks: the
# default gRPC client limit is 4 MiB.
MAX_PAGE_BYTES = 3 * 1024 * 1024
# Per node: windowed top-N keeps error deltas for an hour; at most this many entries.
MAX_DELTA_ENTRIES_PER_NODE = 20_000


class LimitError(ValueError):
    """An input over a bound (`kind` "too_large") or with a value that cannot be true
    ("invalid"): `field` and the reason name the limit."""

    def __init__(self, field: str, reason: str, kind: str = "too_large") -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.kind = kind


def _count(field: str, items: Sized, limit: int) -> None:
    if len(items) > limit:
        raise LimitError(field, f"{len(items)} entries, at most {limit}")


def _text(field: str, value: str, limit: int) -> None:
    size = len(value.encode())
    if size > limit:
        raise LimitError(field, f"{size} bytes, at most {limit}")
    if not value.isprintable():
        raise LimitError(field, f"{value[:40]!r}: holds a non-printable character")


def check_labels_size(field: str, labels: Mapping[str, str]) -> None:
    """At most MAX_LABELS labels of MAX_LABEL_BYTES in all (the grammar is checked by
    agent/common/labels.py)."""
    _count(field, labels, MAX_LABELS)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if size > MAX_LABEL_BYTES:
        raise LimitError(field, f"{size} bytes of keys and values, at most {MAX_LABEL_BYTES}")


def check_register(register: pb.Register) -> None:
    """LimitError for a registration over a bound."""
    check_labels_size("register.labels", register.labels)
    _text("register.agent_version", register.agent_version, MAX_AGENT_VERSION_BYTES)
    _count("register.capabilities", register.capabilities, MAX_CAPABILITIES)
    for capability in register.capabilities:
        _text("register.capabilities", capability, MAX_CAPABILITY_BYTES)
    if register.gpu_count > MAX_GPUS:
        raise LimitError("register.gpu_count", f"{register.gpu_count}, at most {MAX_GPUS}")
    interval_s = register.summary_interval.ToNanoseconds() / 1e9
    if interval_s and not MIN_SUMMARY_INTERVAL_S <= interval_s <= MAX_SUMMARY_INTERVAL_S:
        raise LimitError(
            "register.summary_interval",
            f"{interval_s:g}s, want unset or {MIN_SUMMARY_INTERVAL_S:g}s to "
            f"{MAX_SUMMARY_INTERVAL_S:g}s",
        )


def _value(field: str, value: float, high: float) -> None:
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise LimitError(field, f"{value!r}: want a finite value from 0 to {high:g}", "invalid")


def check_summary(summary: pb.NodeSummary) -> None:
    """LimitError for a summary over a bound or with a value that cannot be true."""
    _count("summary.gpus", summary.gpus, MAX_GPUS)
    _count("summary.nics", summary.nics, MAX_NICS)
    _count("summary.qos_classes", summary.qos_classes, MAX_QOS_CLASSES)
    _count("summary.reconcile.passes", summary.reconcile.passes, MAX_RECONCILE_RESULTS)
    for key in summary.reconcile.passes:
        _text("summary.reconcile.passes", key, MAX_SUMMARY_STRING_BYTES)
    for i, gpu in enumerate(summary.gpus):
        where = f"summary.gpus[{i}]"
        _text(f"{where}.uuid", gpu.uuid, MAX_SUMMARY_STRING_BYTES)
        _count(f"{where}.nvlink_links_down", gpu.nvlink_links_down, MAX_LINKS_PER_GPU)
        _count(f"{where}.nvlink_link_errors", gpu.nvlink_link_errors, MAX_LINKS_PER_GPU)
        _count(f"{where}.new_xids", gpu.new_xids, MAX_XIDS_PER_GPU)
        if gpu.HasField("utilization_ratio"):
            _value(f"{where}.utilization_ratio", gpu.utilization_ratio, 1.0)
        if gpu.HasField("power_watts"):
            _value(f"{where}.power_watts", gpu.power_watts, MAX_POWER_WATTS)
        for name in ("nvlink_transmit_bytes_per_second", "nvlink_receive_bytes_per_second"):
            _value(f"{where}.{name}", getattr(gpu, name), MAX_BYTES_PER_SECOND)
    for i, nic in enumerate(summary.nics):
        where = f"summary.nics[{i}]"
        _text(f"{where}.device", nic.device, MAX_SUMMARY_STRING_BYTES)
        _text(f"{where}.operstate", nic.operstate, MAX_SUMMARY_STRING_BYTES)
        for name in ("receive_bytes_per_second", "transmit_bytes_per_second"):
            _value(f"{where}.{name}", getattr(nic, name), MAX_BYTES_PER_SECOND)
    for i, cls in enumerate(summary.qos_classes):
        where = f"summary.qos_classes[{i}]"
        for name in ("policy", "class_name", "device"):
            _text(f"{where}.{name}", getattr(cls, name), MAX_SUMMARY_STRING_BYTES)
        _value(f"{where}.sent_bits_per_second", cls.sent_bits_per_second, MAX_BITS_PER_SECOND)
    _count("summary.jobs", summary.jobs, MAX_JOBS)
    for i, job in enumerate(summary.jobs):
        where = f"summary.jobs[{i}]"
        for name in ("scheduler", "job_id", "user"):
            _text(f"{where}.{name}", getattr(job, name), MAX_SUMMARY_STRING_BYTES)
        _count(f"{where}.gpu_indices", job.gpu_indices, MAX_GPUS_PER_JOB)
        _count(f"{where}.gpu_uuids", job.gpu_uuids, MAX_GPUS_PER_JOB)
        for uuid in job.gpu_uuids:
            _text(f"{where}.gpu_uuids", uuid, MAX_SUMMARY_STRING_BYTES)


def check_report(report: pb.PolicyReport) -> None:
    """LimitError ("invalid") for a report that names no possible fleet policy; a
    message over MAX_REPORT_MESSAGE_BYTES is cut in place."""
    if not POLICY_NAME.match(report.name):
        raise LimitError(
            "policy_report.name", f"{report.name[:40]!r}: not a fleet policy name", "invalid"
        )
    if len(report.message.encode()) > MAX_REPORT_MESSAGE_BYTES:
        cut = report.message.encode()[:MAX_REPORT_MESSAGE_BYTES]
        report.message = cut.decode(errors="ignore") + " (cut)"


# --- streams not registered yet ---


@dataclass
class UnregisteredStreams:
    """Counts of streams waiting for their registration, per peer address and in all."""

    per_peer: int = MAX_UNREGISTERED_PER_PEER
    total: int = MAX_UNREGISTERED
    _peers: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    def admit(self, peer: str) -> str | None:
        """None when one more may wait (and counts it: `release` it); else why not."""
        held = self._peers.get(peer, 0)
        if held >= self.per_peer:
            return f"{held} streams from {peer} wait for their registration: register at once"
        if self._total >= self.total:
            return f"{self._total} streams wait for their registration: retry later"
        self._peers[peer] = held + 1
        self._total += 1
        return None

    def release(self, peer: str) -> None:
        self._total -= 1
        left = self._peers[peer] - 1
        if left:
            self._peers[peer] = left
        else:
            del self._peers[peer]


# --- registration rate ---


@dataclass
class _Bucket:
    tokens: float
    at_s: float


@dataclass
class RateLimiter:
    """Token buckets: `rate_s` a second, bursts of `burst`, per key and in all. Keys idle
    long enough to have refilled are forgotten, so the map stays as small as the set of
    recently busy peers."""

    per_key_rate_s: float
    per_key_burst: int
    total_rate_s: float
    total_burst: int
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, _Bucket] = field(default_factory=dict)
    _total: _Bucket | None = None

    def refusal(self, key: str) -> str | None:
        """None when one more is allowed now (and counts it); else why not."""
        now = self.clock()
        total = self._total or _Bucket(float(self.total_burst), now)
        self._total = total
        bucket = self._keys.get(key) or _Bucket(float(self.per_key_burst), now)
        _refill(total, now, self.total_rate_s, self.total_burst)
        _refill(bucket, now, self.per_key_rate_s, self.per_key_burst)
        self._keys[key] = bucket
        self._forget_idle(now)
        if bucket.tokens < 1:
            return (
                f"more than {self.per_key_rate_s:g} registrations a second from {key} "
                f"(bursts of {self.per_key_burst}): retry later"
            )
        if total.tokens < 1:
            return (
                f"more than {self.total_rate_s:g} registrations a second in all "
                f"(bursts of {self.total_burst}): retry later"
            )
        bucket.tokens -= 1
        total.tokens -= 1
        return None

    def _forget_idle(self, now: float) -> None:
        if len(self._keys) < 1024:
            return
        full_after_s = self.per_key_burst / self.per_key_rate_s
        idle: Iterable[str] = [k for k, b in self._keys.items() if now - b.at_s > full_after_s]
        for key in list(idle):
            del self._keys[key]


def _refill(bucket: _Bucket, now: float, rate_s: float, burst: int) -> None:
    bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at_s) * rate_s)
    bucket.at_s = now


def peer_address(peer: str) -> str:
    """A gRPC peer string without its port: `ipv4:10.0.0.5:41234` -> `ipv4:10.0.0.5`,
    `ipv6:[::1]:5000` -> `ipv6:[::1]`; unix peers as they are."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer
