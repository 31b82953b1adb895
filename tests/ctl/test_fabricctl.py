"""fabricctl against a real gRPC server on a unix socket serving fake servicers:
output, JSON, requests sent and exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import json_format, timestamp_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2

from agent.common.policy.documents import object_from_document
from agent.ctl import client
from agent.ctl.main import main
from agent.ctl.output import human_duration, table
from agent.proto.fabric.v1 import qos_service_pb2, qos_service_pb2_grpc, telemetry_service_pb2
from tests.ctl.conftest import (
    POLICY,
    ROOT,
    FakeAgent,
    FakeQos,
    bad_request,
    free_port,
    mtls_server,
    plain_status,
    precondition_failed,
    run_fabricctl,
    snapshot,
)
from tests.pki import Ca

ASSIGNMENT = {
    "apiVersion": "fabric.qos/v1alpha1",
    "kind": "QosAssignment",
    "metadata": {"name": "slurm-job-42"},
    "spec": {
        "policy": "training-node",
        "className": "collectives",
        "match": [{"cgroup": "system.slice/slurmstepd.scope/job_42"}],
    },
}


def ctl(fake: FakeAgent, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--agent", fake.target, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_yaml(path: Path, *documents: object) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def policy_info(name: str, **fields: object) -> qos_service_pb2.PolicyInfo:
    return qos_service_pb2.PolicyInfo(name=name, **fields)  # type: ignore[arg-type]


# --- plain functions ---


@pytest.mark.parametrize(
    ("text", "address", "unix"),
    [
        ("unix:///run/fabric-agent/agent.sock", "unix:/run/fabric-agent/agent.sock", True),
        ("unix:/tmp/a.sock", "unix:/tmp/a.sock", True),
        ("node-1.example:9479", "node-1.example:9479", False),
        ("10.0.0.1:9479", "10.0.0.1:9479", False),
        ("[fd00::1]:9479", "[fd00::1]:9479", False),
    ],
)
def test_parse_target(text: str, address: str, unix: bool) -> None:
    assert client.parse_target(text) == client.Target(address, unix)


@pytest.mark.parametrize("text", ["unix://relative.sock", "unix:", "node-1", "host:99999", ":1"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(client.UsageError):
        client.parse_target(text)


def test_table_and_durations() -> None:
    assert table(("A", "B"), [("xyz", "1"), ("", "")]).split("\n") == ["A    B", "xyz  1", ""]
    assert human_duration(3599) == "59m59s"
    assert human_duration(90061) == "1d1h"
    assert human_duration(0) == "0s"


# --- telemetry ---


def test_telemetry_rdma_port_without_data_counters_shows_dashes_not_zeros(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = snapshot()
    # An i40iw without a PMA: port state and rate, no data or error counters.
    answer.rdma_ports.add(
        device="i40iw0", port=1, state="ACTIVE", link_layer="Ethernet", rate_bps=10**10
    )
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse(
        snapshot=answer
    )

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "--section", "rdma")

    (row,) = [line.split() for line in out.splitlines() if line.startswith("i40iw0/1 ")]
    assert code == 0
    assert row[5:] == ["-", "-", "-", "-", "-", "-"]


def test_telemetry_table(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse(
        snapshot=snapshot()
    )

    code, out, _ = ctl(fake_agent, capsys, "telemetry")

    assert code == 0
    assert out.startswith("node gpu-node-1  seq 7  agent 0.1.0")
    assert "collector rdma FAILED: boom" in out
    lines = out.splitlines()
    gpu_rows = [line.split() for line in lines if line.startswith(("0 ", "1 "))]
    assert gpu_rows[0][:6] == ["0", "NVIDIA", "H200", "50%", "10.0GiB/140.0GiB", "600W/700W"]
    assert any(line.split()[:4] == ["0", "2/2", "14.0GiB", "14.0GiB"] for line in lines)
    assert any(line.startswith("eth0 ") and "100.0Gbit/s" in line for line in lines)
    assert any(line.startswith("mlx5_0/1 ") and "InfiniBand" in line for line in lines)
    assert any(line.startswith("training-node ") and "2.5Gbit/s" in line for line in lines)
    assert [line for line in lines if line.isupper() and " " not in line] == [
        "GPU", "NVLINK", "NIC", "RDMA", "QOS", "HOST"
    ]  # fmt: skip
    (request,) = fake_agent.telemetry.requests["GetSnapshot"]
    assert list(request.sections) == []  # all sections


def test_telemetry_sections_filter(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse(
        snapshot=snapshot()
    )

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "--section", "nic,gpu")

    assert code == 0
    (request,) = fake_agent.telemetry.requests["GetSnapshot"]
    assert list(request.sections) == [telemetry_service_pb2.SECTION_GPU,
                                      telemetry_service_pb2.SECTION_NIC]  # fmt: skip
    assert list(request.section_names) == ["nic", "gpu"]
    headers = [line for line in out.splitlines() if line in ("GPU", "NVLINK", "NIC", "RDMA")]
    assert headers == ["GPU", "NIC"]


def test_telemetry_unknown_section_is_bad_input(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    # The agent knows its sections: it refuses the name, listing them.
    reason = "unknown section 'disk'; this agent has gpu, nic"
    fake_agent.telemetry.answers["GetSnapshot"] = bad_request(
        f"section_names[1]: {reason}", ("section_names[1]", reason)
    )

    code, _, err = ctl(fake_agent, capsys, "telemetry", "--section", "gpu,disk")

    assert code == 2
    assert "unknown section 'disk'; this agent has gpu, nic" in err
    (request,) = fake_agent.telemetry.requests["GetSnapshot"]
    assert list(request.section_names) == ["gpu", "disk"]


def test_telemetry_shows_the_jobs_holding_each_gpu_and_a_jobs_table(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    snap = snapshot()
    snap.section_names.extend(["gpu", "jobs"])
    snap.jobs.add(scheduler="slurm", job_id="42", user="alice", gpus=["0", "1"],
                  gpu_indices=[0, 1], gpu_uuids=["GPU-0", "GPU-1"],
                  expires_unix_seconds=4102444800.0)  # fmt: skip
    snap.jobs.add(scheduler="slurm", job_id="43", gpus=["GPU-1", "MIG-1"], gpu_indices=[1],
                  gpu_uuids=["GPU-1"], unmatched_gpus=["MIG-1"],
                  expires_unix_seconds=4102444800.0)  # fmt: skip
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse(
        snapshot=snap
    )

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "--section", "gpu,jobs")

    assert code == 0
    lines = out.splitlines()
    gpus = lines.index("GPU")
    assert lines[gpus + 1].split() == ["GPU", "NAME", "UTIL", "MEMORY", "POWER", "TEMP", "JOBS",
                                       "STATE"]  # fmt: skip
    assert [line.split()[-2:] for line in lines[gpus + 2 : gpus + 4]] == [
        ["42", "ok"],
        ["42,43", "ok"],
    ]
    jobs = lines.index("JOBS")
    assert [line.split()[:4] for line in lines[jobs + 1 :]] == [
        ["JOB", "USER", "GPUS", "NOT-ON-NODE"],
        ["42", "alice", "0,1", "-"],
        ["43", "-", "1", "MIG-1"],
    ]
    assert "2100-01-01T00:00:00Z (in " in lines[jobs + 2]


def test_telemetry_json(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    snap = snapshot()
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse(
        snapshot=snap
    )

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "-o", "json")

    assert code == 0
    assert json.loads(out) == json_format.MessageToDict(snap)


def test_telemetry_no_sample_yet_is_unreachable(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.telemetry.answers["GetSnapshot"] = plain_status(code_pb2.UNAVAILABLE, "no sample")

    code, _, err = ctl(fake_agent, capsys, "telemetry")

    assert code == 3
    assert "no sample" in err


def test_watch_json_lines_with_missed(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.telemetry.stream = [
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot(7)),
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot(11), missed=3),
    ]

    code, out, _ = ctl(
        fake_agent, capsys, "telemetry", "--watch", "--interval", "2s", "-o", "json",
        "--section", "nic",
    )  # fmt: skip

    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["snapshot"]["seq"] == "7" and "missed" not in first
    assert second["snapshot"]["seq"] == "11" and second["missed"] == "3"
    (request,) = fake_agent.telemetry.requests["WatchSnapshots"]
    assert request.interval.seconds == 2
    assert list(request.sections) == [telemetry_service_pb2.SECTION_NIC]


def test_watch_table_notes_missed_and_rates(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.telemetry.stream = [
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot(7)),
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot(9), missed=1),
    ]

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "--watch", "--section", "nic")

    assert code == 0
    first, second = out.strip().split("\n\nnode ")
    assert "missed" not in first
    assert second.startswith("gpu-node-1  seq 9") and "(missed 1 snapshot)" in second
    # 2 MB received over 2 s between the two snapshots: 8 Mbit/s.
    eth0 = next(line for line in second.splitlines() if line.startswith("eth0 "))
    assert "8.0Mbit/s" in eth0 and "16.0Mbit/s" in eth0


def test_watch_rate_of_a_reset_counter_is_what_it_counted_since(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    reset = snapshot(9)
    reset.nics[0].receive_bytes = 500_000  # the interface was re-created
    fake_agent.telemetry.stream = [
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot(7)),
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=reset),
    ]

    code, out, _ = ctl(fake_agent, capsys, "telemetry", "--watch", "--section", "nic")

    assert code == 0
    eth0 = next(line for line in out.split("\n\nnode ")[1].splitlines() if line.startswith("eth0"))
    # 500 kB over the 2 s between the snapshots: 2 Mbit/s, not negative and not "-".
    assert "2.0Mbit/s" in eth0


def test_watch_ctrl_c_exits_0(fake_agent: FakeAgent) -> None:
    fake_agent.telemetry.stream = [
        telemetry_service_pb2.WatchSnapshotsResponse(snapshot=snapshot())
    ]
    fake_agent.telemetry.hold_open = True
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.ctl", "--agent", fake_agent.target, "telemetry",
         "--watch", "-o", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert json.loads(line)["snapshot"]["seq"] == "7"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""


# --- policy apply ---


def test_apply_with_ttl(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = write_yaml(tmp_path / "p.yaml", POLICY)
    expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    fake_agent.qos.answers["ApplyPolicy"] = qos_service_pb2.ApplyPolicyResponse(
        policy=policy_info(
            "training-node",
            state=qos_service_pb2.POLICY_STATE_ENFORCED,
            lease_expire_time=expires,
        ),
        changes=["+ qdisc htb 1: on eth0", "+ class 1:2 collectives"],
    )

    code, out, _ = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file), "--ttl", "1h")

    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("training-node: applied (2 changes), lease expires ")
    assert "(in 59m" in lines[0] or "(in 1h" in lines[0]
    assert lines[1:] == ["  + qdisc htb 1: on eth0", "  + class 1:2 collectives"]
    (request,) = fake_agent.qos.requests["ApplyPolicy"]
    assert request.object == object_from_document(POLICY, "test")
    assert request.lease_ttl.seconds == 3600
    assert not request.validate_only


def test_apply_dry_run_without_ttl(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = write_yaml(tmp_path / "a.yaml", ASSIGNMENT)
    fake_agent.qos.answers["ApplyPolicy"] = qos_service_pb2.ApplyPolicyResponse(
        policy=policy_info("slurm-job-42", state=qos_service_pb2.POLICY_STATE_PENDING,
                           message="cgroup does not exist yet"),
        changes=["~ nftables table"],
    )  # fmt: skip

    code, out, _ = ctl(fake_agent, capsys, "policy", "apply", "--dry-run", "-f", str(file))

    assert code == 0
    assert out.splitlines()[0] == (
        "slurm-job-42: would apply (1 change, dry run), pending: cgroup does not exist yet"
    )
    (request,) = fake_agent.qos.requests["ApplyPolicy"]
    assert request.validate_only
    assert not request.HasField("lease_ttl")
    assert request.object.assignment.spec.class_name == "collectives"


def test_apply_invalid_argument_prints_field_violations(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = write_yaml(tmp_path / "p.yaml", POLICY)
    fake_agent.qos.answers["ApplyPolicy"] = bad_request(
        "policy training-node is invalid",
        ("spec.classes[1].rate", "must be at most the bandwidth"),
        ("spec.defaultClass", "no class named best-efort"),
    )

    code, out, err = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file))

    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        f"{file}: spec.classes[1].rate: must be at most the bandwidth",
        f"{file}: spec.defaultClass: no class named best-efort",
    ]


def test_apply_refuses_a_file_over_the_document_limits_and_sends_nothing(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    large = write_yaml(tmp_path / "large.yaml", POLICY)
    large.write_text(large.read_text() + "#" * (1 << 20) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")

    too_large = ctl(fake_agent, capsys, "policy", "apply", "-f", str(large))
    too_deep = ctl(fake_agent, capsys, "policy", "apply", "-f", str(deep))

    assert too_large[0] == too_deep[0] == 2
    assert f"{large}: a document of more than 1 MiB; at most 1 MiB" in too_large[2]
    assert f"{deep}:1:35: invalid YAML: nested deeper than 32 levels" in too_deep[2]
    assert "Traceback" not in too_deep[2]
    assert fake_agent.qos.requests.get("ApplyPolicy", []) == []


def test_apply_several_documents_stops_at_first_refusal(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    second = dict(ASSIGNMENT, metadata={"name": "slurm-job-43"})
    file = write_yaml(tmp_path / "many.yaml", ASSIGNMENT, second, POLICY)
    fake_agent.qos.answers["ApplyPolicy"] = [
        qos_service_pb2.ApplyPolicyResponse(policy=policy_info("slurm-job-42")),
        precondition_failed(
            "interface eth0 is owned by policy other", "INTERFACE", "eth0", "owned by other"
        ),
    ]

    code, out, err = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file))

    assert code == 2
    assert out.splitlines() == ["slurm-job-42: applied (0 changes)"]
    assert err.splitlines() == [
        f"{file} (document 2): interface eth0 is owned by policy other",
        "  INTERFACE eth0: owned by other",
    ]
    assert len(fake_agent.qos.requests["ApplyPolicy"]) == 2  # the third never sent


def test_apply_from_stdin_json(fake_agent: FakeAgent) -> None:
    fake_agent.qos.answers["ApplyPolicy"] = qos_service_pb2.ApplyPolicyResponse(
        policy=policy_info("slurm-job-42"), changes=["+ rule"]
    )

    result = run_fabricctl(
        "--agent", fake_agent.target, "policy", "apply", "-f", "-", "--ttl", "90m", "-o", "json",
        stdin=yaml.safe_dump(ASSIGNMENT),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"policy": {"name": "slurm-job-42"}, "changes": ["+ rule"]}
    (request,) = fake_agent.qos.requests["ApplyPolicy"]
    assert request.lease_ttl.seconds == 5400
    assert request.object.assignment.metadata.name == "slurm-job-42"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: QosPolicy\nspec: [\n", "invalid YAML"),
        ("kind: Deployment\n", "kind: must be QosPolicy or QosAssignment"),
        ("kind: QosPolicy\nspec:\n  bogus: 1\n", "bogus"),
    ],
)
def test_apply_bad_document_sends_nothing(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
    message: str,
) -> None:  # fmt: skip
    file = tmp_path / "bad.yaml"
    file.write_text(text)

    code, _, err = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file))

    assert code == 2
    # Bad YAML is fabricctl's to report; a bad document is reported as the agent's
    # validation reports a file: the file, the field, the reason.
    assert err.removeprefix("fabricctl: ").startswith(f"{file}") and message in err
    assert "ApplyPolicy" not in fake_agent.qos.requests


@pytest.mark.parametrize("ttl", ["soon", "0s"])
def test_apply_bad_ttl(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path, ttl: str
) -> None:
    file = write_yaml(tmp_path / "p.yaml", POLICY)

    code, _, err = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file), "--ttl", ttl)

    assert code == 2 and "--ttl" in err
    assert "ApplyPolicy" not in fake_agent.qos.requests


def test_apply_permission_denied_is_refused(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = write_yaml(tmp_path / "p.yaml", POLICY)
    fake_agent.qos.answers["ApplyPolicy"] = plain_status(
        code_pb2.PERMISSION_DENIED, "client fabric-x may not change QoS"
    )

    code, _, err = ctl(fake_agent, capsys, "policy", "apply", "-f", str(file))

    assert code == 2
    assert err.strip() == f"{file}: client fabric-x may not change QoS"


# --- plan ---


@pytest.mark.parametrize(("changes", "expected_code"), [([], 0), (["+ class 1:3 new"], 1)])
def test_plan_exit_codes(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    changes: list[str], expected_code: int,
) -> None:  # fmt: skip
    file = write_yaml(tmp_path / "p.yaml", POLICY)
    fake_agent.qos.answers["PlanPolicy"] = qos_service_pb2.PlanPolicyResponse(changes=changes)

    code, out, _ = ctl(fake_agent, capsys, "policy", "plan", "-f", str(file))

    assert code == expected_code
    summary = "1 change" if changes else "no changes"
    assert out.splitlines() == [f"training-node ({file}): {summary}", *(f"  {c}" for c in changes)]
    (request,) = fake_agent.qos.requests["PlanPolicy"]
    assert request.object == object_from_document(POLICY, "test")


def test_plan_error_is_2_and_plans_the_rest(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = write_yaml(tmp_path / "p.yaml", ASSIGNMENT, POLICY)
    fake_agent.qos.answers["PlanPolicy"] = [
        bad_request("invalid", ("spec.policy", "no policy named training-node")),
        qos_service_pb2.PlanPolicyResponse(changes=["+ qdisc"]),
    ]

    code, out, err = ctl(fake_agent, capsys, "policy", "plan", "-f", str(file))

    assert code == 2
    assert err.strip() == f"{file} (document 1): spec.policy: no policy named training-node"
    assert out.splitlines()[0] == f"training-node ({file} (document 2)): 1 change"


# --- list, status, delete, renew ---


def test_list_table_all_pages_and_json(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 600)
    file_policy = policy_info(
        "training-node", source=qos_service_pb2.POLICY_SOURCE_FILE,
        file="/etc/fabric-agent/policies/training-node.yaml",
        state=qos_service_pb2.POLICY_STATE_ENFORCED, device="eth0",
    )  # fmt: skip
    job = policy_info(
        "slurm-job-42", source=qos_service_pb2.POLICY_SOURCE_API,
        state=qos_service_pb2.POLICY_STATE_PENDING, message="cgroup missing",
        lease_expire_time=expires,
    )  # fmt: skip
    pages = [
        qos_service_pb2.ListPoliciesResponse(policies=[file_policy], next_page_token="p2"),
        qos_service_pb2.ListPoliciesResponse(policies=[job]),
    ]
    fake_agent.qos.answers["ListPolicies"] = list(pages)

    code, out, _ = ctl(fake_agent, capsys, "policy", "list")

    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "SOURCE", "STATE", "DEVICE", "LEASE-EXPIRES", "MESSAGE"]
    source = ["file", "/etc/fabric-agent/policies/training-node.yaml"]
    assert first.split() == ["training-node", *source, "enforced", "eth0", "-"]
    assert second.split()[:4] == ["slurm-job-42", "api", "pending", "-"]
    assert "(in 9m" in second or "(in 10m" in second
    assert second.endswith("cgroup missing")
    tokens = [r.page_token for r in fake_agent.qos.requests["ListPolicies"]]
    assert tokens == ["", "p2"]

    fake_agent.qos.answers["ListPolicies"] = list(pages)
    code, out, _ = ctl(fake_agent, capsys, "policy", "list", "-o", "json")

    assert code == 0
    listed = json.loads(out)["policies"]
    assert [p["name"] for p in listed] == ["training-node", "slurm-job-42"]
    assert listed[1]["state"] == "POLICY_STATE_PENDING"


def test_status_table(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.qos.answers["GetPolicyStatus"] = qos_service_pb2.GetPolicyStatusResponse(
        policy=policy_info(
            "training-node", source=qos_service_pb2.POLICY_SOURCE_API,
            state=qos_service_pb2.POLICY_STATE_ENFORCED, device="eth0",
            object=object_from_document(POLICY, "test"),
        ),
        classes=[
            qos_service_pb2.ClassStatus(
                name="collectives", device="eth0", minor=2, rate_bps=60_000_000_000,
                ceil_bps=100_000_000_000, sent_bytes=5 * 2**30, dropped_packets=3,
                overlimits=9, throughput_bps=1.5e9,
            ),
            qos_service_pb2.ClassStatus(name="best-effort", device="eth0", minor=3,
                                        rate_bps=10_000_000_000, ceil_bps=100_000_000_000),
        ],
    )  # fmt: skip

    code, out, _ = ctl(fake_agent, capsys, "policy", "status", "training-node")

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "policy training-node: enforced, api, on eth0"
    assert lines[1].split() == ["CLASS", "DEVICE", "RATE", "CEIL", "THROUGHPUT", "SENT",
                                "DROPS", "OVERLIMITS"]  # fmt: skip
    assert lines[2].split() == ["collectives", "eth0", "60.0Gbit/s", "100.0Gbit/s",
                                "1.5Gbit/s", "5.0GiB", "3", "9"]  # fmt: skip
    assert lines[3].split()[4] == "-"  # no throughput before two samples
    (request,) = fake_agent.qos.requests["GetPolicyStatus"]
    assert request.name == "training-node"


def test_status_not_found(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.qos.answers["GetPolicyStatus"] = plain_status(code_pb2.NOT_FOUND, "no policy x")

    code, _, err = ctl(fake_agent, capsys, "policy", "status", "x")

    assert code == 2
    assert err.strip() == "x: no policy x"


def test_delete(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.qos.answers["DeletePolicy"] = qos_service_pb2.DeletePolicyResponse(
        changes=["- rule slurm-job-42"]
    )

    code, out, _ = ctl(fake_agent, capsys, "policy", "delete", "slurm-job-42", "--dry-run")

    assert code == 0
    assert out.splitlines() == [
        "slurm-job-42: would delete (1 change, dry run)", "  - rule slurm-job-42"
    ]  # fmt: skip
    (request,) = fake_agent.qos.requests["DeletePolicy"]
    assert request.name == "slurm-job-42" and request.validate_only


def test_delete_not_found(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.qos.answers["DeletePolicy"] = plain_status(code_pb2.NOT_FOUND, "no policy gone")

    code, _, err = ctl(fake_agent, capsys, "policy", "delete", "gone")
    assert code == 2 and "no policy gone" in err

    fake_agent.qos.answers["DeletePolicy"] = plain_status(code_pb2.NOT_FOUND, "no policy gone")
    code, out, _ = ctl(fake_agent, capsys, "policy", "delete", "gone", "--ignore-not-found")
    assert code == 0 and out.strip() == "gone: not found, nothing to delete"


def test_delete_file_policy_refused(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.qos.answers["DeletePolicy"] = plain_status(
        code_pb2.FAILED_PRECONDITION, "training-node comes from a file"
    )

    code, _, err = ctl(fake_agent, capsys, "policy", "delete", "training-node",
                       "--ignore-not-found")  # fmt: skip

    assert code == 2 and "comes from a file" in err


def test_renew(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    expires = timestamp_pb2.Timestamp(seconds=int(time.time()) + 7200)
    fake_agent.qos.answers["RenewLease"] = qos_service_pb2.RenewLeaseResponse(
        policy=policy_info("slurm-job-42", lease_expire_time=expires)
    )

    code, out, _ = ctl(fake_agent, capsys, "policy", "renew", "slurm-job-42", "--ttl", "2h")

    assert code == 0
    assert out.startswith("slurm-job-42: lease renewed, expires ")
    (request,) = fake_agent.qos.requests["RenewLease"]
    assert request.lease_ttl.seconds == 7200


# --- health ---


def test_health(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(fake_agent, capsys, "health")
    assert (code, out.strip()) == (0, "agent: SERVING")

    fake_agent.health.set("fabric.v1.QosService", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, out, _ = ctl(fake_agent, capsys, "health", "--service", "fabric.v1.QosService")
    assert (code, out.strip()) == (1, "fabric.v1.QosService: NOT_SERVING")


# --- unreachable agents and connection options ---


def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    result = run_fabricctl("--agent", f"unix://{tmp_path}/nothing.sock", "policy", "list")

    assert result.returncode == 3
    assert f"agent at unix:{tmp_path}/nothing.sock is unreachable" in result.stderr


def test_closed_tcp_port_is_unreachable() -> None:
    result = run_fabricctl(
        "telemetry", "-o", "json", env={"FABRIC_AGENT": f"127.0.0.1:{free_port()}"}
    )

    assert result.returncode == 3
    assert result.stdout == ""
    assert "is unreachable" in result.stderr


def test_health_unreachable(tmp_path: Path) -> None:
    result = run_fabricctl("health", "--agent", f"unix:{tmp_path}/none.sock")

    assert result.returncode == 3


def test_deadline_is_unreachable(fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    fake_agent.telemetry.delay_s = 2.0
    fake_agent.telemetry.answers["GetSnapshot"] = telemetry_service_pb2.GetSnapshotResponse()

    code, _, err = ctl(fake_agent, capsys, "--timeout", "200ms", "telemetry")

    assert code == 3
    assert "did not answer in time" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--tls-cert", "c.pem"],
        ["--tls-ca", "ca.pem", "--tls-cert", "c.pem"],
        ["--tls-ca", "/nonexistent/ca.pem"],
        ["--timeout", "0s"],
    ],
)
def test_bad_connection_flags(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--agent", "127.0.0.1:9479", *flags, "policy", "list"])

    assert code == 2
    assert capsys.readouterr().err.startswith("fabricctl: ")


def test_options_after_the_command(
    fake_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_agent.qos.answers["ListPolicies"] = qos_service_pb2.ListPoliciesResponse()

    code = main(["policy", "list", "--agent", fake_agent.target, "-o", "json"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == {}


def test_mtls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = Ca(tmp_path, "ca")
    client_cert = ca.issue("operator")
    qos = FakeQos()
    qos.answers["ListPolicies"] = qos_service_pb2.ListPoliciesResponse(policies=[policy_info("a")])

    def add(server: grpc.Server) -> None:
        qos_service_pb2_grpc.add_QosServiceServicer_to_server(qos, server)

    with mtls_server(ca, "node-1.fabric", add) as port:
        tls = ["--tls-ca", str(ca.cert), "--tls-server-name", "node-1.fabric"]
        client_flags = ["--tls-cert", str(client_cert.cert), "--tls-key", str(client_cert.key)]
        code = main(["--agent", f"127.0.0.1:{port}", *tls, *client_flags, "policy", "list"])
        out = capsys.readouterr().out
        assert code == 0 and out.splitlines()[1].startswith("a ")
        # Without a client certificate the handshake fails: nothing answers.
        code = main(["--agent", f"127.0.0.1:{port}", "--timeout", "2s", *tls, "policy", "list"])
        assert code == 3
