"""`fabricctl --aggregator TARGET nodes|node|top|events` and `policy apply|delete` with
`--aggregator`: the fleet view and policy fan-out of the central aggregator through
fabric.aggregator.v1.AggregatorService.

A fleet policy call answers with every matching node's state as data: a node that is
pending or unreachable gets the policy when it reports or reconnects, so only a node
that FAILED it (or a refused call) makes the exit code 2. The RPC functions raise
grpc.RpcError for `main` to report with `describe_failure` below, except where a
document is named in the message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import DecodeError

from agent.common.exits import ExitCode
from agent.common.labels import label_pair
from agent.ctl.client import (
    RpcFailure,
    Target,
    UsageError,
    failure_from_error,
)
from agent.ctl.client import describe_failure as describe_peer_failure
from agent.ctl.output import (
    ago,
    expiry,
    human_bps,
    or_dash,
    percent,
    table,
    to_json,
    utc_stamp,
)
from agent.ctl.policy import Document
from agent.ctl.telemetry import render_snapshot
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc
from agent.proto.fabric.v1 import telemetry_service_pb2

# Where the aggregator listens unless configured otherwise; fleet commands have no
# default target (a workstation rarely runs the aggregator), these are for help texts.
DEFAULT_PORT = 9480
DEFAULT_SOCKET = "unix:///run/fabric-aggregator/aggregator.sock"
# Nodes per ListNodes page: the aggregator's own limit may be lower; pages are followed.
PAGE_SIZE = 500
# `policy apply --wait`: how long the aggregator waits for the nodes' reports.
DEFAULT_WAIT = "10s"

NODE_STATUSES: dict[str, pb.NodeStatus.ValueType] = {
    "connected": pb.NODE_STATUS_CONNECTED,
    "stale": pb.NODE_STATUS_STALE,
    "unreachable": pb.NODE_STATUS_UNREACHABLE,
}
EVENT_KINDS: dict[str, pb.EventKind.ValueType] = {
    "registered": pb.EVENT_KIND_NODE_REGISTERED,
    "stale": pb.EVENT_KIND_NODE_STALE,
    "gone": pb.EVENT_KIND_NODE_GONE,
    "nvlink-down": pb.EVENT_KIND_NVLINK_DOWN,
    "xid": pb.EVENT_KIND_XID,
    "gpu-lost": pb.EVENT_KIND_GPU_LOST,
    "drift": pb.EVENT_KIND_DRIFT,
    "policy-status": pb.EVENT_KIND_POLICY_STATUS,
}
TOP_ENTITIES: dict[str, pb.TopEntity.ValueType] = {
    "node": pb.TOP_ENTITY_NODE,
    "gpu": pb.TOP_ENTITY_GPU,
    "nvlink": pb.TOP_ENTITY_NVLINK,
    "nic": pb.TOP_ENTITY_NIC,
}
# Summary order of per-node policy states; `removed` reads better after a delete.
_POLICY_STATES: dict[pb.NodePolicyState.ValueType, str] = {
    pb.NODE_POLICY_STATE_APPLIED: "applied",
    pb.NODE_POLICY_STATE_FAILED: "failed",
    pb.NODE_POLICY_STATE_PENDING: "pending",
    pb.NODE_POLICY_STATE_UNREACHABLE: "unreachable",
}

_E = TypeVar("_E", bound=int)


# --- flags ---


def parse_selector(values: Sequence[str] | None, flag: str = "--selector") -> dict[str, str]:
    """`pool=training,rack=a1`, repeatable: the pairs of every value merged; raises
    UsageError naming `flag` for a pair that is not a label (agent/common/labels.py) with
    a value, or a key given twice."""
    selector: dict[str, str] = {}
    for value in values or ():
        for pair in value.split(","):
            if "=" not in pair:
                raise UsageError(
                    f"{flag}: {pair.strip()!r} is not key=value (e.g. {flag} pool=training)"
                )
            try:
                key, label = label_pair(pair)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc} (e.g. {flag} pool=training)") from None
            if not label:
                # A label may be empty, but `key=` on a command line is a value left out.
                raise UsageError(f"{flag}: {pair.strip()!r}: give the value (e.g. {key}=x)")
            if selector.get(key, label) != label:
                raise UsageError(f"{flag}: {key} given as both {selector[key]!r} and {label!r}")
            selector[key] = label
    return selector


def parse_names(values: Sequence[str] | None, choices: Mapping[str, _E], flag: str) -> list[_E]:
    """Names from repeated or comma-separated flag values, in order, once each."""
    names: list[str] = []
    for value in values or ():
        names.extend(part.strip().lower() for part in value.split(",") if part.strip())
    unknown = sorted(set(names) - choices.keys())
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
    return [choices[name] for name in dict.fromkeys(names)]


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


# --- errors ---


def describe_failure(failure: RpcFailure, where: str, target: Target) -> list[str]:
    """Lines for stderr, as client.describe_failure has them, the aggregator named."""
    return describe_peer_failure(failure, where, target, peer="aggregator")


def _report(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _stub(channel: grpc.Channel) -> aggregator_service_pb2_grpc.AggregatorServiceStub:
    return aggregator_service_pb2_grpc.AggregatorServiceStub(channel)


def _not_found(exc: grpc.RpcError) -> bool:
    return isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND


# --- nodes, node ---


def list_nodes(
    channel: grpc.Channel,
    *,
    selector: Mapping[str, str],
    statuses: Sequence[pb.NodeStatus.ValueType],
    output: str,
    timeout_s: float,
) -> int:
    """Every matching node, all pages; a table or one ListNodesResponse as JSON."""
    stub = _stub(channel)
    nodes: list[pb.Node] = []
    token = ""
    while True:
        request = pb.ListNodesRequest(
            selector=selector, statuses=statuses, page_size=PAGE_SIZE, page_token=token
        )
        response = stub.ListNodes(request, timeout=timeout_s)
        nodes.extend(response.nodes)
        token = response.next_page_token
        if not token:
            break
    if output == "json":
        print(to_json(pb.ListNodesResponse(nodes=nodes)))
        return ExitCode.OK
    if not nodes:
        print("no nodes")
        return ExitCode.OK
    rows = [
        (
            node.name,
            _status(node.status),
            _last_seen(node),
            _gpus(node),
            _jobs(node),
            or_dash(node.agent_version),
            _labels(node.labels),
        )
        for node in nodes
    ]
    print(table(("NAME", "STATUS", "LAST-SEEN", "GPUS", "JOBS", "VERSION", "LABELS"), rows))
    return ExitCode.OK


def node(channel: grpc.Channel, name: str, *, snapshot: bool, output: str, timeout_s: float) -> int:
    """One node's liveness and latest summary; with `snapshot`, its agent's snapshot as
    `fabricctl telemetry` prints it. A snapshot the aggregator could not have is
    reported on stderr and leaves the exit code 0: the node's state is still news.
    JSON is one object: `node`, and the decoded `snapshot` and `snapshotError` when
    asked for (not the response's raw bytes)."""
    request = pb.GetNodeRequest(name=name, full_snapshot=snapshot)
    try:
        response = _stub(channel).GetNode(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        if not _not_found(exc):
            raise
        failure = failure_from_error(exc)
        print(f"{name}: no such node in the fleet ({failure.message})", file=sys.stderr)
        return ExitCode.INVALID
    decoded, error = _snapshot(response) if snapshot else (None, "")
    if error:
        print(f"{name}: no snapshot: {error}", file=sys.stderr)
    if output == "json":
        document: dict[str, object] = {"node": json_format.MessageToDict(response.node)}
        if decoded is not None:
            document["snapshot"] = json_format.MessageToDict(decoded.snapshot)
        if error:
            document["snapshotError"] = error
        print(json.dumps(document, indent=2))
        return ExitCode.OK
    print(render_node(response.node))
    if decoded is not None:
        print()
        print(render_snapshot(decoded.snapshot))
    return ExitCode.OK


def _snapshot(
    response: pb.GetNodeResponse,
) -> tuple[telemetry_service_pb2.GetSnapshotResponse | None, str]:
    """The snapshot the agent sent through the aggregator, or why there is none."""
    if response.snapshot_error:
        return None, response.snapshot_error
    if not response.snapshot:
        return None, "the aggregator sent none"
    decoded = telemetry_service_pb2.GetSnapshotResponse()
    try:
        decoded.ParseFromString(response.snapshot)
    except DecodeError as exc:
        return None, f"not a fabric.v1.GetSnapshotResponse: {exc}"
    return decoded, ""


def render_node(node: pb.Node) -> str:
    """A header, labels and capabilities, then the latest summary's GPU, NIC and QoS
    class tables (rates as the summary's interval measured them)."""
    lines = [
        f"node {node.name}  {_status(node.status)}  last seen {_last_seen(node)}  "
        f"agent {or_dash(node.agent_version)}",
        f"labels: {_labels(node.labels)}",
        f"capabilities: {','.join(node.capabilities) or '-'}",
    ]
    if node.kept_policies:
        lines.append(
            f"kept from a previous store: {','.join(node.kept_policies)} "
            "(fabricctl release-kept lets them go)"
        )
    if not node.HasField("summary"):
        lines.append("no summary yet")
        return "\n".join(lines)
    summary = node.summary
    sampled = (
        ago(summary.sampled_at.ToNanoseconds() / 1e9) if summary.HasField("sampled_at") else "-"
    )
    interval = summary.interval.ToNanoseconds() / 1e9
    lines.append(f"summary: seq {summary.seq}, sampled {sampled}, interval {interval:g}s")
    if summary.HasField("reconcile"):
        passes = " ".join(f"{k}={v}" for k, v in sorted(summary.reconcile.passes.items()))
        lines.append(
            f"reconcile: passes {passes or '-'}, "
            f"drift corrections {summary.reconcile.drift_corrections}"
        )
    for title, rendered in (
        ("GPU", _gpu_table(summary.gpus, summary.jobs)),
        ("JOBS", _job_table(summary)),
        ("NIC", _nic_table(summary.nics)),
        ("QOS", _qos_table(summary.qos_classes)),
    ):
        lines.extend(("", title, rendered))
    return "\n".join(lines)


def _gpu_table(gpus: Sequence[pb.GpuSummary], jobs: Sequence[pb.JobSummary] = ()) -> str:
    if not gpus:
        return "(none)"
    holders: dict[int, list[str]] = {}
    for job in jobs:
        for index in job.gpu_indices:
            holders.setdefault(index, []).append(job.job_id)
    rows = [
        (
            str(gpu.index),
            percent(gpu.utilization_ratio) if gpu.HasField("utilization_ratio") else "-",
            f"{gpu.power_watts:.0f}W" if gpu.HasField("power_watts") else "-",
            human_bps(gpu.nvlink_transmit_bytes_per_second * 8),
            human_bps(gpu.nvlink_receive_bytes_per_second * 8),
            str(gpu.nvlink_links),
            ",".join(str(link) for link in gpu.nvlink_links_down) or "-",
            str(gpu.nvlink_errors),
            ",".join(f"{x.xid}x{x.count}" for x in gpu.new_xids) or "-",
            ",".join(holders.get(gpu.index, [])) or "-",
            "LOST" if gpu.lost else "ok",
        )
        for gpu in gpus
    ]
    header = ("GPU", "UTIL", "POWER", "NVLINK-TX", "NVLINK-RX", "LINKS", "LINKS-DOWN",
              "ERRORS", "XIDS", "JOBS", "STATE")  # fmt: skip
    return table(header, rows)


def _job_table(summary: pb.NodeSummary) -> str:
    """The node's jobs, their users, the GPUs they hold and their lease expiry; a line
    counts those the summary had no room for."""
    if not summary.jobs:
        return "(none)"
    rows = [
        (
            job.job_id,
            or_dash(job.user),
            ",".join(str(index) for index in job.gpu_indices) or "-",
            expiry(job.expires_at.ToNanoseconds() / 1e9) if job.HasField("expires_at") else "-",
        )
        for job in summary.jobs
    ]
    rendered = table(("JOB", "USER", "GPUS", "EXPIRES"), rows)
    if summary.jobs_left_out:
        rendered += f"\n({summary.jobs_left_out} more jobs, not in the summary)"
    return rendered


def _nic_table(nics: Sequence[pb.NicSummary]) -> str:
    if not nics:
        return "(none)"
    rows = [
        (
            nic.device,
            or_dash(nic.operstate),
            human_bps(nic.receive_bytes_per_second * 8),
            human_bps(nic.transmit_bytes_per_second * 8),
            str(nic.errors),
            str(nic.drops),
        )
        for nic in nics
    ]
    return table(("NIC", "STATE", "RX-RATE", "TX-RATE", "ERRORS", "DROPS"), rows)


def _qos_table(classes: Sequence[pb.QosClassSummary]) -> str:
    if not classes:
        return "(none)"
    rows = [
        (cls.policy, cls.class_name, cls.device, human_bps(cls.sent_bits_per_second),
         str(cls.drops))
        for cls in classes
    ]  # fmt: skip
    return table(("POLICY", "CLASS", "DEVICE", "THROUGHPUT", "DROPS"), rows)


def _status(status: pb.NodeStatus.ValueType) -> str:
    return pb.NodeStatus.Name(status).removeprefix("NODE_STATUS_").lower() if status else "-"


def _last_seen(node: pb.Node) -> str:
    return ago(node.last_seen.ToNanoseconds() / 1e9) if node.HasField("last_seen") else "-"


def _jobs(node: pb.Node) -> str:
    if not node.HasField("summary"):
        return "-"
    return str(len(node.summary.jobs) + node.summary.jobs_left_out)


def _gpus(node: pb.Node) -> str:
    if not node.HasField("summary"):
        return "-"
    gpus = node.summary.gpus
    lost = sum(1 for gpu in gpus if gpu.lost)
    return f"{len(gpus)} ({lost} lost)" if lost else str(len(gpus))


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


# --- top ---


def top(
    channel: grpc.Channel,
    metric: str,
    *,
    entity: pb.TopEntity.ValueType,
    limit: int,
    window_s: float | None,
    selector: Mapping[str, str],
    output: str,
    timeout_s: float,
) -> int:
    """The top `limit` entities by `metric`; the aggregator refuses unknown metrics."""
    if limit <= 0:
        raise UsageError("--limit must be positive")
    if window_s is not None and window_s <= 0:
        raise UsageError("--window must be positive")
    request = pb.QueryTopRequest(entity=entity, metric=metric, limit=limit, selector=selector)
    if window_s is not None:
        request.window.CopyFrom(_duration(window_s))
    response = _stub(channel).QueryTop(request, timeout=timeout_s)
    if output == "json":
        print(to_json(response))
        return ExitCode.OK
    if not response.entries:
        print(f"no {metric} values")
        return ExitCode.OK
    rows = [
        (entry.node, or_dash(entry.entity), metric_value(metric, entry.value))
        for entry in response.entries
    ]
    print(table(("NODE", "ENTITY", "VALUE"), rows))
    return ExitCode.OK


def metric_value(metric: str, value: float) -> str:
    """A value in the unit its metric's name says: rates in bits per second as network
    rates are quoted, ratios in percent, counts exact."""
    if metric.endswith("_bytes_per_second"):
        return human_bps(value * 8)
    if metric.endswith("_ratio"):
        return percent(value)
    if metric.endswith("_watts"):
        return f"{value:.0f}W"
    return f"{value:.0f}"


# --- events ---


def events(
    channel: grpc.Channel,
    *,
    kinds: Sequence[pb.EventKind.ValueType],
    selector: Mapping[str, str],
    output: str,
) -> int:
    """Print fleet events as they happen until the stream ends or Ctrl-C (exit 0);
    raises grpc.RpcError."""
    request = pb.WatchEventsRequest(kinds=kinds, selector=selector)
    stream = _stub(channel).WatchEvents(request)
    try:
        for response in stream:
            if output == "json":
                print(to_json(response, one_line=True), flush=True)
                continue
            if response.missed:
                plural = "" if response.missed == 1 else "s"
                print(f"(missed {response.missed} event{plural})", flush=True)
            if response.HasField("event"):
                print(event_line(response.event), flush=True)
    except KeyboardInterrupt:
        stream.cancel()
    return ExitCode.OK


def event_line(event: pb.Event) -> str:
    """`TIME  KIND  NODE  SUBJECT  MESSAGE`, two spaces apart."""
    when = utc_stamp(event.time.ToNanoseconds() / 1e9) if event.HasField("time") else "-"
    fields = (when, _kind(event.kind), or_dash(event.node), or_dash(event.subject), event.message)
    return "  ".join(fields).rstrip()


def _kind(kind: pb.EventKind.ValueType) -> str:
    names = {value: name for name, value in EVENT_KINDS.items()}
    return names.get(kind) or pb.EventKind.Name(kind).removeprefix("EVENT_KIND_").lower()


# --- policy apply, delete ---


def apply(
    channel: grpc.Channel,
    documents: Sequence[Document],
    *,
    target: Target,
    selector: Mapping[str, str],
    wait_s: float,
    dry_run: bool,
    output: str,
    timeout_s: float,
) -> int:
    """Assign each document to the nodes matching `selector`, in order; a refused call
    stops the rest with its exit code, a node that failed one makes the exit code 2
    once all are sent."""
    if not selector:
        raise UsageError(
            "policy apply with --aggregator needs --selector key=value: the nodes to apply to"
        )
    _check_wait(wait_s)
    stub = _stub(channel)
    failed = False
    for document in documents:
        request = pb.ApplyPolicyRequest(
            object=document.object,
            selector=selector,
            validate_only=dry_run,
            wait=_duration(wait_s),
        )
        try:
            # The aggregator answers after up to `wait` collecting the nodes' reports.
            response = stub.ApplyPolicy(request, timeout=timeout_s + wait_s)
        except grpc.RpcError as exc:
            failure = failure_from_error(exc)
            _report(describe_failure(failure, document.where, target))
            return failure.exit_code
        failed = failed or _any_failed(response.nodes)
        if output == "json":
            print(to_json(response, one_line=True), flush=True)
            continue
        matching = f"nodes matching {_labels(selector)}"
        if dry_run:
            print(f"{document.name}: valid, would be assigned to {matching} (dry run)")
        else:
            print(f"{document.name}: assigned to {matching}, revision {response.revision}")
        _print_nodes(response.nodes, applied="applied")
    return ExitCode.INVALID if failed else ExitCode.OK


def delete(
    channel: grpc.Channel,
    name: str,
    *,
    wait_s: float,
    ignore_not_found: bool,
    output: str,
    timeout_s: float,
) -> int:
    """Remove a fleet policy from every node it was assigned to, waiting up to `wait_s`
    for their reports; exit 2 when a node failed to remove it, or for a policy the
    aggregator does not know (unless ignore_not_found)."""
    _check_wait(wait_s)
    request = pb.DeletePolicyRequest(name=name, wait=_duration(wait_s))
    try:
        # As for apply, the deadline covers the wait.
        response = _stub(channel).DeletePolicy(request, timeout=timeout_s + wait_s)
    except grpc.RpcError as exc:
        if not (ignore_not_found and _not_found(exc)):
            raise
        if output == "json":
            print(to_json(pb.DeletePolicyResponse()))
        else:
            print(f"{name}: not found, nothing to delete")
        return ExitCode.OK
    if output == "json":
        print(to_json(response))
    else:
        print(f"{name}: deleted from the fleet")
        _print_nodes(response.nodes, applied="removed")
    return ExitCode.INVALID if _any_failed(response.nodes) else ExitCode.OK


def release_kept(channel: grpc.Channel, *, output: str, timeout_s: float) -> int:
    """Tell the aggregator that agents may drop the fleet policies they kept from
    another store; the nodes keeping some, as the aggregator knows them."""
    response = _stub(channel).ReleaseKeptPolicies(
        pb.ReleaseKeptPoliciesRequest(), timeout=timeout_s
    )
    if output == "json":
        print(to_json(response))
    else:
        print("kept fleet policies released: agents drop what this store does not assign")
        _print_nodes(response.nodes, applied="dropped")
    return ExitCode.OK


def _check_wait(wait_s: float) -> None:
    if wait_s < 0:
        raise UsageError("--wait must not be negative")


def _any_failed(nodes: Iterable[pb.NodePolicyStatus]) -> bool:
    return any(status.state == pb.NODE_POLICY_STATE_FAILED for status in nodes)


def _print_nodes(nodes: Sequence[pb.NodePolicyStatus], *, applied: str) -> None:
    """NODE STATE MESSAGE per node, then `3 applied, 1 pending, 1 unreachable`."""
    if not nodes:
        print("no nodes")
        return
    names = {**_POLICY_STATES, pb.NODE_POLICY_STATE_APPLIED: applied}
    rows = [(s.node, names.get(s.state, "-"), or_dash(s.message)) for s in nodes]
    print(table(("NODE", "STATE", "MESSAGE"), rows))
    counts = {state: sum(1 for s in nodes if s.state == state) for state in names}
    parts = [f"{count} {names[state]}" for state, count in counts.items() if count]
    unknown = len(nodes) - sum(counts.values())
    if unknown:
        parts.append(f"{unknown} without a state")
    print(", ".join(parts))
