"""fabricctl's fleet commands against a real gRPC server on 127.0.0.1 serving a fake
AggregatorService: tables, JSON, requests sent and exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2

from agent.common.policy.documents import object_from_document
from agent.ctl import fleet
from agent.ctl.client import UsageError
from agent.ctl.main import main
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc
from agent.proto.fabric.v1 import telemetry_service_pb2
from tests.conftest import free_port
from tests.ctl.conftest import (
    POLICY,
    ROOT,
    _Recorder,
    mtls_server,
    plain_status,
    precondition_failed,
    snapshot,
)
from tests.pki import Ca


class FakeAggregator(aggregator_service_pb2_grpc.AggregatorServiceServicer, _Recorder):
    """Unary answers as set; WatchEvents streams `events`, then ends, or with
    `hold_open` waits until the client goes away."""

    def __init__(self) -> None:
        _Recorder.__init__(self)
        self.target = ""
        self.events: list[pb.WatchEventsResponse] = []
        self.hold_open = False

    def Connect(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "agents are not part of these tests")

    def ListNodes(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("ListNodes", request, context)

    def GetNode(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("GetNode", request, context)

    def QueryTop(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("QueryTop", request, context)

    def ApplyPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("ApplyPolicy", request, context)

    def DeletePolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.answer("DeletePolicy", request, context)

    def WatchEvents(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEventsResponse]:
        self.requests.setdefault("WatchEvents", []).append(request)
        yield from self.events
        while self.hold_open and context.is_active():
            threading.Event().wait(0.05)


@pytest.fixture(autouse=True)
def no_targets_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FABRIC_AGGREGATOR", raising=False)
    monkeypatch.delenv("FABRIC_AGENT", raising=False)


@pytest.fixture
def aggregator() -> Iterator[FakeAggregator]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    fake = FakeAggregator()
    aggregator_service_pb2_grpc.add_AggregatorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.stop(0).wait()


def ctl(
    fake: FakeAggregator, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = main(["--aggregator", fake.target, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def seconds_ago(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round((time.time() - seconds) * 1e9))
    return stamp


def gpu_node(name: str, **labels: str) -> pb.Node:
    """A connected node seen 2 s ago with two GPUs (one lost, one down link), a NIC, and
    three jobs, one in the summary (on GPU 0)."""
    summary = pb.NodeSummary(seq=42, sampled_at=seconds_ago(2))
    summary.interval.FromSeconds(1)
    summary.gpus.add(
        index=0, uuid="GPU-0", utilization_ratio=0.75, power_watts=612.4,
        nvlink_transmit_bytes_per_second=25e9, nvlink_receive_bytes_per_second=12.5e9,
        nvlink_links=18, nvlink_links_down=[3, 7], nvlink_errors=5,
        new_xids=[pb.XidDelta(xid=79, count=2)],
    )  # fmt: skip
    summary.gpus.add(index=1, uuid="GPU-1", lost=True, nvlink_links=18)
    summary.nics.add(
        device="eth0", operstate="up", receive_bytes_per_second=1.25e9,
        transmit_bytes_per_second=2.5e9, errors=1, drops=4,
    )  # fmt: skip
    summary.reconcile.passes["success"] = 3
    summary.reconcile.drift_corrections = 1
    job = summary.jobs.add(
        scheduler="slurm", job_id="42", user="alice", gpu_indices=[0], gpu_uuids=["GPU-0"]
    )
    job.expires_at.FromSeconds(4102444800)
    summary.jobs_left_out = 2
    return pb.Node(
        name=name, labels=labels, status=pb.NODE_STATUS_CONNECTED, last_seen=seconds_ago(2),
        agent_version="0.1.0", capabilities=["gpu", "nvlink", "qos-enforce"], summary=summary,
    )  # fmt: skip


def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return path


def node_status(node: str, state: pb.NodePolicyState.ValueType, message: str = "") -> Any:
    return pb.NodePolicyStatus(node=node, state=state, message=message)


# --- plain functions ---


def test_parse_selector_merges_repeated_flags() -> None:
    assert fleet.parse_selector(["pool=training, rack=a1", "zone=z", "pool=training"]) == {
        "pool": "training", "rack": "a1", "zone": "z"
    }  # fmt: skip
    assert fleet.parse_selector(None) == {}


@pytest.mark.parametrize("values", [["pool"], ["=x"], ["a="], ["a=b=c"], ["a=b,"], ["a=b", "a=c"]])
def test_parse_selector_refuses(values: list[str]) -> None:
    with pytest.raises(UsageError, match="--selector"):
        fleet.parse_selector(values)


def test_metric_values_in_their_units() -> None:
    assert fleet.metric_value("nic_transmit_bytes_per_second", 2.5e9) == "20.0Gbit/s"
    assert fleet.metric_value("gpu_utilization_ratio", 0.875) == "88%"
    assert fleet.metric_value("gpu_power_watts", 612.4) == "612W"
    assert fleet.metric_value("nvlink_errors", 1234.0) == "1234"


# --- nodes ---


def test_nodes_follows_every_page(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = pb.Node(name="gpu-node-2", status=pb.NODE_STATUS_STALE, last_seen=seconds_ago(90))
    aggregator.answers["ListNodes"] = [
        pb.ListNodesResponse(
            nodes=[gpu_node("gpu-node-1", pool="training", rack="a1")], next_page_token="p2"
        ),
        pb.ListNodesResponse(nodes=[stale]),
    ]

    code, out, _ = ctl(aggregator, capsys, "nodes")

    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "LAST-SEEN", "GPUS", "JOBS", "VERSION", "LABELS"]
    assert first.split()[:2] == ["gpu-node-1", "connected"]
    assert first.split()[3:] == ["ago", "2", "(1", "lost)", "3", "0.1.0", "pool=training,rack=a1"]
    assert second.split()[:4] == ["gpu-node-2", "stale", "1m30s", "ago"]
    assert second.split()[4:] == ["-", "-", "-", "-"]
    first_request, second_request = aggregator.requests["ListNodes"]
    assert (first_request.page_token, second_request.page_token) == ("", "p2")
    assert first_request.page_size == second_request.page_size == 500


def test_nodes_filters_reach_the_request(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.answers["ListNodes"] = pb.ListNodesResponse()

    code, out, _ = ctl(
        aggregator, capsys, "nodes", "--selector", "pool=training,rack=a1", "--selector",
        "zone=z", "--status", "stale", "--status", "unreachable,stale",
    )  # fmt: skip

    assert code == 0
    assert out.strip() == "no nodes"
    (request,) = aggregator.requests["ListNodes"]
    assert dict(request.selector) == {"pool": "training", "rack": "a1", "zone": "z"}
    assert list(request.statuses) == [pb.NODE_STATUS_STALE, pb.NODE_STATUS_UNREACHABLE]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--status", "gone"], "--status: unknown gone"), (["--selector", "pool"], "--selector")],
)
def test_nodes_bad_filters_send_nothing(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], flags: list[str],
    message: str,
) -> None:  # fmt: skip
    code, _, err = ctl(aggregator, capsys, "nodes", *flags)

    assert code == 2
    assert err.startswith(f"fabricctl: {message}")
    assert "ListNodes" not in aggregator.requests


def test_nodes_json(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["ListNodes"] = [
        pb.ListNodesResponse(nodes=[gpu_node("gpu-node-1")], next_page_token="p2"),
        pb.ListNodesResponse(nodes=[gpu_node("gpu-node-2")]),
    ]

    code, out, _ = ctl(aggregator, capsys, "nodes", "-o", "json")

    assert code == 0
    listed = json.loads(out)
    assert [node["name"] for node in listed["nodes"]] == ["gpu-node-1", "gpu-node-2"]
    assert "nextPageToken" not in listed


def test_nodes_target_from_environment(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRIC_AGGREGATOR", aggregator.target)
    aggregator.answers["ListNodes"] = pb.ListNodesResponse(nodes=[gpu_node("gpu-node-1")])

    code = main(["nodes"])

    assert code == 0
    assert "gpu-node-1" in capsys.readouterr().out


def test_nodes_without_aggregator_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["nodes"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fabricctl: nodes needs the aggregator: --aggregator HOST:PORT")
    assert "9480" in err


def test_bad_aggregator_target_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--aggregator", "fleet-aggregator", "nodes"])

    assert code == 2
    assert capsys.readouterr().err.startswith("fabricctl: --aggregator 'fleet-aggregator': ")


def test_closed_port_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"

    code = main(["--aggregator", target, "nodes", "-o", "json"])

    assert code == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"fabricctl: aggregator at {target} is unreachable" in captured.err


# --- node ---


def test_node_table(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["GetNode"] = pb.GetNodeResponse(node=gpu_node("gpu-node-1", pool="a"))

    code, out, err = ctl(aggregator, capsys, "node", "gpu-node-1")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("node gpu-node-1  connected  last seen ")
    assert lines[0].endswith(" ago  agent 0.1.0")
    assert lines[1:3] == ["labels: pool=a", "capabilities: gpu,nvlink,qos-enforce"]
    assert lines[4] == "reconcile: passes success=3, drift corrections 1"
    gpu_header = lines.index("GPU") + 1
    assert lines[gpu_header].split() == [
        "GPU", "UTIL", "POWER", "NVLINK-TX", "NVLINK-RX", "LINKS", "LINKS-DOWN", "ERRORS", "XIDS",
        "JOBS", "STATE",
    ]  # fmt: skip
    assert lines[gpu_header + 1].split() == [
        "0", "75%", "612W", "200.0Gbit/s", "100.0Gbit/s", "18", "3,7", "5", "79x2", "42", "ok"
    ]  # fmt: skip
    assert lines[gpu_header + 2].split() == ["1", "-", "-", "0bit/s", "0bit/s", "18", "-", "0",
                                             "-", "-", "LOST"]  # fmt: skip
    jobs = lines.index("JOBS")
    assert lines[jobs + 1].split() == ["JOB", "USER", "GPUS", "EXPIRES"]
    assert lines[jobs + 2].split()[:4] == ["42", "alice", "0", "2100-01-01T00:00:00Z"]
    assert lines[jobs + 3] == "(2 more jobs, not in the summary)"
    nic = lines[lines.index("NIC") + 2].split()
    assert nic == ["eth0", "up", "10.0Gbit/s", "20.0Gbit/s", "1", "4"]
    (request,) = aggregator.requests["GetNode"]
    assert request.name == "gpu-node-1" and not request.full_snapshot


def test_node_with_snapshot(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    agent_answer = telemetry_service_pb2.GetSnapshotResponse(snapshot=snapshot())
    aggregator.answers["GetNode"] = pb.GetNodeResponse(
        node=gpu_node("gpu-node-1"), snapshot=agent_answer.SerializeToString()
    )

    code, out, err = ctl(aggregator, capsys, "node", "gpu-node-1", "--snapshot")

    assert (code, err) == (0, "")
    assert out.startswith("node gpu-node-1  connected")
    assert "\n\nnode gpu-node-1  seq 7  agent 0.1.0" in out
    assert "collector rdma FAILED: boom" in out
    assert any(line.startswith("mlx5_0/1 ") for line in out.splitlines())
    (request,) = aggregator.requests["GetNode"]
    assert request.full_snapshot


def test_node_snapshot_error_goes_to_stderr(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.answers["GetNode"] = pb.GetNodeResponse(
        node=gpu_node("gpu-node-1"), snapshot_error="agent did not answer within 5s"
    )

    code, out, err = ctl(aggregator, capsys, "node", "gpu-node-1", "--snapshot")

    assert code == 0
    assert out.startswith("node gpu-node-1  connected")
    assert err.strip() == "gpu-node-1: no snapshot: agent did not answer within 5s"


def test_node_json_decodes_the_snapshot(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    agent_answer = telemetry_service_pb2.GetSnapshotResponse(snapshot=snapshot())
    aggregator.answers["GetNode"] = pb.GetNodeResponse(
        node=gpu_node("gpu-node-1"), snapshot=agent_answer.SerializeToString()
    )

    code, out, _ = ctl(aggregator, capsys, "node", "gpu-node-1", "--snapshot", "-o", "json")

    assert code == 0
    document = json.loads(out)
    assert document["node"]["name"] == "gpu-node-1"
    assert document["node"]["status"] == "NODE_STATUS_CONNECTED"
    assert document["snapshot"]["nodeName"] == "gpu-node-1"
    assert document["snapshot"]["seq"] == "7"


def test_node_not_found(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["GetNode"] = plain_status(code_pb2.NOT_FOUND, "no node gpu-node-9")

    code, out, err = ctl(aggregator, capsys, "node", "gpu-node-9")

    assert (code, out) == (2, "")
    assert err.strip() == "gpu-node-9: no such node in the fleet (no node gpu-node-9)"


# --- top ---


def test_top_table_and_request(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.answers["QueryTop"] = pb.QueryTopResponse(
        entries=[
            pb.TopEntry(node="gpu-node-3", entity="5", value=42),
            pb.TopEntry(node="gpu-node-1", entity="0", value=7),
        ]
    )

    code, out, _ = ctl(
        aggregator, capsys, "top", "nvlink_errors", "--entity", "gpu", "--limit", "2",
        "--window", "10m", "--selector", "pool=training",
    )  # fmt: skip

    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["NODE", "ENTITY", "VALUE"], ["gpu-node-3", "5", "42"], ["gpu-node-1", "0", "7"]
    ]  # fmt: skip
    (request,) = aggregator.requests["QueryTop"]
    assert (request.metric, request.entity, request.limit) == ("nvlink_errors",
                                                               pb.TOP_ENTITY_GPU, 2)  # fmt: skip
    assert request.window.seconds == 600
    assert dict(request.selector) == {"pool": "training"}


def test_top_defaults(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["QueryTop"] = pb.QueryTopResponse(
        entries=[pb.TopEntry(node="gpu-node-1", value=2.5e9)]
    )

    code, out, _ = ctl(aggregator, capsys, "top", "nic_transmit_bytes_per_second")

    assert code == 0
    assert out.splitlines()[1].split() == ["gpu-node-1", "-", "20.0Gbit/s"]
    (request,) = aggregator.requests["QueryTop"]
    assert (request.entity, request.limit) == (pb.TOP_ENTITY_NODE, 10)
    assert not request.HasField("window")


def test_top_unknown_metric_is_bad_input(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.answers["QueryTop"] = plain_status(
        code_pb2.INVALID_ARGUMENT, "unknown metric 'gpu_temp' for TOP_ENTITY_NODE"
    )

    code, out, err = ctl(aggregator, capsys, "top", "gpu_temp")

    assert (code, out) == (2, "")
    assert err.strip() == "fabricctl: unknown metric 'gpu_temp' for TOP_ENTITY_NODE"


def test_top_json(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["QueryTop"] = pb.QueryTopResponse(
        entries=[pb.TopEntry(node="gpu-node-1", entity="eth0", value=3)]
    )

    code, out, _ = ctl(aggregator, capsys, "top", "nic_errors", "--entity", "nic", "-o", "json")

    assert code == 0
    assert json.loads(out) == {"entries": [{"node": "gpu-node-1", "entity": "eth0", "value": 3.0}]}


# --- events ---


def event(kind: pb.EventKind.ValueType, node: str, subject: str, message: str) -> pb.Event:
    return pb.Event(
        kind=kind, node=node, subject=subject, message=message,
        time=timestamp_pb2.Timestamp(seconds=1_748_779_200),
    )  # fmt: skip


def test_events_stream_with_missed(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.events = [
        pb.WatchEventsResponse(
            event=event(pb.EVENT_KIND_NVLINK_DOWN, "gpu-node-1", "gpu 3 link 7", "link down")
        ),
        pb.WatchEventsResponse(
            event=event(pb.EVENT_KIND_NODE_STALE, "gpu-node-2", "", "no summary for 30s"),
            missed=3,
        ),
    ]

    code, out, _ = ctl(
        aggregator, capsys, "events", "--kind", "nvlink-down,stale", "--kind", "xid",
        "--selector", "pool=training",
    )  # fmt: skip

    assert code == 0
    assert out.splitlines() == [
        "2025-06-01T12:00:00Z  nvlink-down  gpu-node-1  gpu 3 link 7  link down",
        "(missed 3 events)",
        "2025-06-01T12:00:00Z  stale  gpu-node-2  -  no summary for 30s",
    ]
    (request,) = aggregator.requests["WatchEvents"]
    assert list(request.kinds) == [pb.EVENT_KIND_NVLINK_DOWN, pb.EVENT_KIND_NODE_STALE,
                                   pb.EVENT_KIND_XID]  # fmt: skip
    assert dict(request.selector) == {"pool": "training"}


def test_events_json_lines(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.events = [
        pb.WatchEventsResponse(event=event(pb.EVENT_KIND_XID, "gpu-node-1", "gpu 2", "xid 79")),
        pb.WatchEventsResponse(
            event=event(pb.EVENT_KIND_GPU_LOST, "gpu-node-1", "gpu 2", "lost"), missed=1
        ),
    ]

    code, out, _ = ctl(aggregator, capsys, "events", "-o", "json")

    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["event"]["kind"] == "EVENT_KIND_XID" and "missed" not in first
    assert second["event"]["kind"] == "EVENT_KIND_GPU_LOST" and second["missed"] == "1"
    (request,) = aggregator.requests["WatchEvents"]
    assert list(request.kinds) == [] and dict(request.selector) == {}


def test_events_unknown_kind_is_bad_input(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ctl(aggregator, capsys, "events", "--kind", "xid,reboot")

    assert code == 2 and "--kind: unknown reboot" in err
    assert "WatchEvents" not in aggregator.requests


def test_events_ctrl_c_exits_0(aggregator: FakeAggregator) -> None:
    aggregator.events = [
        pb.WatchEventsResponse(event=event(pb.EVENT_KIND_DRIFT, "gpu-node-1", "eth0", "fixed"))
    ]
    aggregator.hold_open = True
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.ctl", "--aggregator", aggregator.target, "events"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().split()[1:3] == ["drift", "gpu-node-1"]
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


# --- policy apply, delete ---


def test_apply_pending_and_unreachable_are_data(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = pb.ApplyPolicyResponse(
        revision=7,
        nodes=[
            node_status("gpu-node-1", pb.NODE_POLICY_STATE_APPLIED),
            node_status("gpu-node-2", pb.NODE_POLICY_STATE_APPLIED),
            node_status("gpu-node-3", pb.NODE_POLICY_STATE_APPLIED),
            node_status("gpu-node-4", pb.NODE_POLICY_STATE_PENDING, "no report within 30s"),
            node_status("gpu-node-5", pb.NODE_POLICY_STATE_UNREACHABLE, "stale"),
        ],
    )

    code, out, err = ctl(
        aggregator, capsys, "policy", "apply", "-f", str(file), "--selector", "pool=training",
        "--wait", "30s",
    )  # fmt: skip

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "training-node: assigned to nodes matching pool=training, revision 7"
    assert lines[1].split() == ["NODE", "STATE", "MESSAGE"]
    assert lines[2].split() == ["gpu-node-1", "applied", "-"]
    assert lines[5].split() == ["gpu-node-4", "pending", "no", "report", "within", "30s"]
    assert lines[6].split() == ["gpu-node-5", "unreachable", "stale"]
    assert lines[7] == "3 applied, 1 pending, 1 unreachable"
    (request,) = aggregator.requests["ApplyPolicy"]
    assert request.object == object_from_document(POLICY, "test")
    assert request.object.policy.metadata.name == "training-node"
    assert dict(request.selector) == {"pool": "training"}
    assert request.wait.seconds == 30
    assert not request.validate_only


def test_apply_dry_run_default_wait(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = pb.ApplyPolicyResponse(
        nodes=[node_status("gpu-node-1", pb.NODE_POLICY_STATE_PENDING)]
    )

    code, out, _ = ctl(aggregator, capsys, "policy", "apply", "-f", str(file), "--dry-run",
                       "--selector", "pool=training,rack=a1")  # fmt: skip

    assert code == 0
    assert out.splitlines()[0] == (
        "training-node: valid, would be assigned to nodes matching pool=training,rack=a1 (dry run)"
    )
    (request,) = aggregator.requests["ApplyPolicy"]
    assert request.validate_only
    assert request.wait.seconds == 10


def test_apply_one_failed_node_is_exit_2(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = pb.ApplyPolicyResponse(
        revision=8,
        nodes=[
            node_status("gpu-node-1", pb.NODE_POLICY_STATE_APPLIED),
            node_status("gpu-node-2", pb.NODE_POLICY_STATE_FAILED, "no interface eth0"),
        ],
    )

    code, out, _ = ctl(aggregator, capsys, "policy", "apply", "-f", str(file), "--selector",
                       "pool=training")  # fmt: skip

    assert code == 2
    lines = out.splitlines()
    assert lines[3].split() == ["gpu-node-2", "failed", "no", "interface", "eth0"]
    assert lines[4] == "1 applied, 1 failed"


def test_apply_json_line_per_document(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = pb.ApplyPolicyResponse(
        revision=9, nodes=[node_status("gpu-node-1", pb.NODE_POLICY_STATE_APPLIED)]
    )

    code, out, _ = ctl(aggregator, capsys, "policy", "apply", "-f", str(file), "--selector",
                       "pool=training", "-o", "json")  # fmt: skip

    assert code == 0
    assert json.loads(out) == {
        "revision": "9", "nodes": [{"node": "gpu-node-1", "state": "NODE_POLICY_STATE_APPLIED"}]
    }  # fmt: skip


def test_apply_refused_names_the_document(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = precondition_failed(
        "policy training-node conflicts", "POLICY", "training-node", "interface eth0 is taken"
    )

    code, out, err = ctl(aggregator, capsys, "policy", "apply", "-f", str(file), "--selector",
                         "pool=training")  # fmt: skip

    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"{file}: policy training-node conflicts",
        "  POLICY training-node: interface eth0 is taken",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["apply", "--ttl", "1h", "--selector", "pool=a"], "--ttl is not available"),
        (["apply"], "needs --selector"),
        (["apply", "--selector", "pool"], "--selector: 'pool' is not key=value"),
        (["apply", "--selector", "pool=a", "--wait", "soon"], "--wait"),
        (["list"], "policy list is not available with --aggregator"),
        (["status", "x"], "policy status is not available with --aggregator"),
        (["plan"], "policy plan is not available with --aggregator"),
        (["renew", "x"], "policy renew is not available with --aggregator"),
        (["delete", "x", "--dry-run"], "--dry-run is not available"),
    ],
)
def test_policy_refused_with_aggregator_sends_nothing(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    args: list[str], message: str,
) -> None:  # fmt: skip
    files = ["-f", str(policy_file(tmp_path))] if args[0] in ("apply", "plan") else []

    code, _, err = ctl(aggregator, capsys, "policy", *args, *files)

    assert code == 2
    assert err.startswith("fabricctl: ") and message in err
    assert aggregator.requests == {}


def test_selector_without_aggregator_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)

    code = main(["policy", "apply", "-f", str(file), "--selector", "pool=training"])

    assert code == 2
    assert capsys.readouterr().err.strip() == "fabricctl: --selector needs --aggregator"


def test_delete_reports_per_node(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator.answers["DeletePolicy"] = pb.DeletePolicyResponse(
        nodes=[
            node_status("gpu-node-1", pb.NODE_POLICY_STATE_APPLIED),
            node_status("gpu-node-2", pb.NODE_POLICY_STATE_UNREACHABLE),
        ]
    )

    code, out, _ = ctl(aggregator, capsys, "policy", "delete", "training-node", "--wait", "5s")

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "training-node: deleted from the fleet"
    assert lines[2].split() == ["gpu-node-1", "removed", "-"]
    assert lines[-1] == "1 removed, 1 unreachable"
    (request,) = aggregator.requests["DeletePolicy"]
    assert request.name == "training-node" and request.wait.seconds == 5


def test_delete_not_found(aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    aggregator.answers["DeletePolicy"] = [
        plain_status(code_pb2.NOT_FOUND, "no fleet policy gone"),
        plain_status(code_pb2.NOT_FOUND, "no fleet policy gone"),
    ]

    code, _, err = ctl(aggregator, capsys, "policy", "delete", "gone")
    assert code == 2 and err.strip() == "gone: no fleet policy gone"

    code, out, _ = ctl(aggregator, capsys, "policy", "delete", "gone", "--ignore-not-found")
    assert code == 0 and out.strip() == "gone: not found, nothing to delete"


def test_environment_never_makes_policy_fleet_wide(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("FABRIC_AGGREGATOR", aggregator.target)
    file = policy_file(tmp_path)

    code = main(["policy", "apply", "-f", str(file), "--selector", "pool=training"])

    assert code == 2
    assert "FABRIC_AGGREGATOR does not make policy commands fleet-wide" in (capsys.readouterr().err)
    assert aggregator.requests == {}


def test_bad_aggregator_environment_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRIC_AGGREGATOR", "fleet-aggregator")

    code = main(["top", "xids"])

    assert code == 2
    assert capsys.readouterr().err.startswith("fabricctl: $FABRIC_AGGREGATOR 'fleet-aggregator'")


def test_tls_flags_apply_to_the_aggregator(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--aggregator", "unix:///run/a.sock", "--tls-ca", "ca.pem", "nodes"])

    assert code == 2
    assert "--tls-* apply to HOST:PORT targets" in capsys.readouterr().err


def test_permission_denied_hints_at_the_aggregator(
    aggregator: FakeAggregator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = policy_file(tmp_path)
    aggregator.answers["ApplyPolicy"] = plain_status(
        code_pb2.PERMISSION_DENIED, "client ops may not change fleet policies"
    )

    code, _, err = ctl(aggregator, capsys, "policy", "apply", "-f", str(file), "--selector",
                       "pool=training")  # fmt: skip

    assert code == 2
    assert err.splitlines() == [
        f"{file}: client ops may not change fleet policies",
        "  (changes over TCP need mTLS (--tls-ca, --tls-cert, --tls-key) with a client "
        "identity the aggregator allows)",
    ]


def test_mtls_to_the_aggregator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = Ca(tmp_path, "ca")
    client_cert = ca.issue("operator")
    fake = FakeAggregator()
    fake.answers["ListNodes"] = pb.ListNodesResponse(nodes=[gpu_node("gpu-node-1")])

    def add(server: grpc.Server) -> None:
        aggregator_service_pb2_grpc.add_AggregatorServiceServicer_to_server(fake, server)

    with mtls_server(ca, "aggregator.fabric", add) as port:
        tls = ["--tls-ca", str(ca.cert), "--tls-server-name", "aggregator.fabric",
               "--tls-cert", str(client_cert.cert), "--tls-key", str(client_cert.key)]  # fmt: skip
        code = main(["--aggregator", f"127.0.0.1:{port}", *tls, "nodes"])
        assert code == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("gpu-node-1 ")
