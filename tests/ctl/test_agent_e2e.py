"""fabricctl against a real `fabric-agent run`: telemetry from the simulated 8-GPU node,
and a QoS policy's round trip (apply with a lease, list, status, plan, delete) on a
veth in a test namespace."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.conftest import VethPair
from tests.ctl.conftest import ROOT, RealAgent, run_fabricctl
from tests.node.qos import api_policy_document


def test_telemetry_json_against_agent(sim_agent: RealAgent) -> None:
    result = run_fabricctl("--agent", sim_agent.target, "telemetry", "-o", "json")

    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert len(snapshot["gpus"]) == 8
    assert {gpu["name"] for gpu in snapshot["gpus"]} == {"NVIDIA H200"}
    assert len(snapshot["nvlinks"]) == 8 * 18
    assert [nic["device"] for nic in snapshot["nics"]] == ["lo"]


def test_telemetry_table_over_plaintext_tcp(sim_agent: RealAgent) -> None:
    result = run_fabricctl("--agent", sim_agent.tcp_target, "telemetry", "--section", "gpu")

    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "NVIDIA H200" in line]
    assert len(rows) == 8
    assert "NVLINK" not in result.stdout


def test_telemetry_shows_a_jobs_gpus_until_its_file_is_removed(
    sim_agent: RealAgent, tmp_path: Path
) -> None:
    job = tmp_path / "jobs" / "slurm-job-42.json"
    document = {"version": 1, "scheduler": "slurm", "job_id": "42", "user": "alice",
                "gpus": ["0", "GPU-6e789e6a-a1b9-65f4-2e78-2ee99573588c"],
                "expires_at": 4102444800}  # fmt: skip
    job.write_text(json.dumps(document))

    def telemetry() -> list[str]:
        args = ("--agent", sim_agent.target, "telemetry", "--section", "gpu,jobs")
        result = run_fabricctl(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    # The collector reads the directory every tick (200 ms).
    lines = _until(telemetry, lambda lines: any(line.startswith("42 ") for line in lines))
    job.unlink()
    after = _until(telemetry, lambda lines: not any(line.startswith("42 ") for line in lines))

    gpus = [line.split() for line in lines if "NVIDIA H200" in line]
    assert [row[0] for row in gpus if "42" in row] == ["0", "1"]
    assert lines[lines.index("JOBS") + 1].split() == [
        "JOB", "USER", "GPUS", "NOT-ON-NODE", "EXPIRES"
    ]  # fmt: skip
    assert lines[lines.index("JOBS") + 2].split()[:4] == ["42", "alice", "0,1", "-"]
    assert after[after.index("JOBS") + 1] == "(none)"
    assert not any(row[-2] == "42" for row in (line.split() for line in after if "H200" in line))


def _until(read: Callable[[], list[str]], done: Callable[[list[str]], bool]) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = read()
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_watch_receives_two_snapshots(sim_agent: RealAgent) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.ctl", "--agent", sim_agent.target, "telemetry", "--watch",
         "--section", "gpu", "-o", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        second = json.loads(process.stdout.readline())
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        process.kill()

    assert int(second["snapshot"]["seq"]) > int(first["snapshot"]["seq"])
    assert len(first["snapshot"]["gpus"]) == len(second["snapshot"]["gpus"]) == 8
    assert process.returncode == 0


def shaping_policy(device: str, rate: str = "300Mbit") -> dict[str, object]:
    document = api_policy_document(device, name="ctl-roundtrip")
    document["spec"]["classes"][0]["rate"] = rate
    return document


def test_policy_roundtrip_against_agent(
    netns_agent: RealAgent, shaped_pair: VethPair, tmp_path: Path
) -> None:
    agent = ("--agent", netns_agent.target)
    file = tmp_path / "policy.yaml"
    file.write_text(yaml.safe_dump(shaping_policy(shaped_pair.device)))

    applied = run_fabricctl(*agent, "policy", "apply", "-f", str(file), "--ttl", "1h")
    assert applied.returncode == 0, applied.stderr + netns_agent.log.read_text()
    assert applied.stdout.startswith("ctl-roundtrip: applied (")
    assert "lease expires" in applied.stdout.splitlines()[0]

    listed = run_fabricctl(*agent, "policy", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("ctl-roundtrip "))
    assert row.split()[1:4] == ["api", "enforced", shaped_pair.device]
    assert "(in 59m" in row or "(in 1h" in row

    listed_json = json.loads(run_fabricctl(*agent, "policy", "list", "-o", "json").stdout)
    (info,) = [p for p in listed_json["policies"] if p["name"] == "ctl-roundtrip"]
    assert info["leaseTtl"] == "3600s"

    status = run_fabricctl(*agent, "policy", "status", "ctl-roundtrip")
    assert status.returncode == 0, status.stderr
    classes = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert classes["bulk"][2] == "300.0Mbit/s" and classes["rest"][2] == "100.0Mbit/s"

    unchanged = run_fabricctl(*agent, "policy", "plan", "-f", str(file))
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    file.write_text(yaml.safe_dump(shaping_policy(shaped_pair.device, rate="400Mbit")))
    changed = run_fabricctl(*agent, "policy", "plan", "-f", str(file))
    assert changed.returncode == 1, changed.stdout + changed.stderr

    renewed = run_fabricctl(*agent, "policy", "renew", "ctl-roundtrip", "--ttl", "2h")
    assert renewed.returncode == 0, renewed.stderr

    deleted = run_fabricctl(*agent, "policy", "delete", "ctl-roundtrip")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("ctl-roundtrip: deleted (")
    after = run_fabricctl(*agent, "policy", "list", "-o", "json")
    assert "ctl-roundtrip" not in after.stdout
    again = run_fabricctl(*agent, "policy", "delete", "ctl-roundtrip")
    assert again.returncode == 2
    ignored = run_fabricctl(*agent, "policy", "delete", "ctl-roundtrip", "--ignore-not-found")
    assert ignored.returncode == 0


def test_invalid_policy_against_agent(
    netns_agent: RealAgent, shaped_pair: VethPair, tmp_path: Path
) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(shaping_policy(shaped_pair.device, rate="2Gbit")))

    result = run_fabricctl("--agent", netns_agent.target, "policy", "apply", "-f", str(file))

    assert result.returncode == 2
    assert result.stderr.startswith(f"{file}: spec.classes")
