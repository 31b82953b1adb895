"""The `fabric-agent` command: exit codes and messages a person sees."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ROOT
from tests.conftest import free_port


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_sample_once_json() -> None:
    result = agent("sample", "--once", "--format", "json", "--collectors", "host")

    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["collectors"][0]["name"] == "host"
    assert snapshot["collectors"][0]["success"] is True
    assert snapshot["sections"]["host"][0]["memory_total_bytes"] > 0


def test_sample_once_text_and_prometheus() -> None:
    text = agent("sample", "--once", "--collectors", "host")
    prom = agent("sample", "--once", "--format", "prometheus", "--collectors", "host")

    assert text.returncode == 0 and "host" in text.stdout and "ok" in text.stdout
    assert prom.returncode == 0
    assert 'fabric_collector_success{collector="host"} 1.0' in prom.stdout


def test_sample_once_attributes_gpus_to_jobs_without_a_reconciler(
    tmp_path: Path, fakenvml_library: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o755)
    (jobs / "slurm-job-42.json").write_text(
        json.dumps({"version": 1, "scheduler": "slurm", "job_id": "42", "user": "alice",
                    "gpus": ["1"], "expires_at": 4102444800})
    )  # fmt: skip

    result = agent(
        "sample", "--once", "--format", "prometheus", "--collectors", "gpu,jobs",
        "--nvml-library", str(fakenvml_library), "--job-dir", str(jobs),
        env={"FAKE_NVML_SCENARIO": str(ROOT / "tests/fakenvml/scenarios/hgx-h200-8gpu.json")},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    info = [line for line in result.stdout.splitlines() if line.startswith("fabric_gpu_job_info")]
    assert info == [
        'fabric_gpu_job_info{gpu="1",job_id="42",scheduler="slurm",user="alice",'
        'uuid="GPU-6e789e6a-a1b9-65f4-2e78-2ee99573588c"} 1'
    ]


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("interval: 1s\nmetrics_listn: 127.0.0.1:1\n")

    result = agent("run", "--config", str(config))

    assert result.returncode == 2
    assert f"{config}: metrics_listn: unknown option" in result.stderr


def test_bad_flag_exits_2() -> None:
    result = agent("run", "--interval", "forever")
    assert result.returncode == 2
    assert "command line: interval: 'forever' is not a duration" in result.stderr


def test_unknown_collector_exits_2() -> None:
    result = agent("sample", "--once", "--collectors", "host,gpu-magic")
    assert result.returncode == 2
    assert "collectors: unknown collector 'gpu-magic'" in result.stderr


def test_a_config_naming_the_gpu_collector_nvml_still_runs_it(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("collectors: [nvml, host, gpu]\n")

    result = agent("sample", "--once", "--format", "json", "--config", str(config))

    assert result.returncode == 0, result.stderr
    names = [status["name"] for status in json.loads(result.stdout)["collectors"]]
    assert names == ["gpu", "host"]
    assert result.stderr.count("collector name 'nvml' is now 'gpu'") == 1


def test_port_in_use_exits_1(busy_port: int, tmp_path: Path) -> None:
    result = agent(
        "run",
        "--metrics-listen",
        f"127.0.0.1:{busy_port}",
        "--state-dir",
        str(tmp_path),
        "--grpc-socket",
        str(tmp_path / "agent.sock"),
        "--grpc-listen",
        "127.0.0.1:0",
        "--collectors",
        "host",
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{busy_port} for metrics" in result.stderr
    assert "in use" in result.stderr


def test_run_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "state"),
            "--grpc-socket",
            str(tmp_path / "agent.sock"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--collectors",
            "host",
            "--interval",
            "200ms",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read()
            except OSError:
                time.sleep(0.1)
        assert b'fabric_collector_success{collector="host"} 1.0' in body
        assert (tmp_path / "state").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "metrics at http://127.0.0.1" in stderr


def test_every_config_option_is_a_flag() -> None:
    from agent.node.cli.main import build_parser
    from agent.node.config import AgentConfig

    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {option for action in run._actions for option in action.option_strings}

    missing = [f for f in AgentConfig.model_fields if "--" + f.replace("_", "-") not in flags]
    assert missing == []
