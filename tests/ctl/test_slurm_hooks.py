"""contrib/slurm prolog and epilog, run by sh with stub fabricctl, squeue and logger
in PATH; and once with the real fabricctl against a real agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.common.policy.documents import object_from_document
from tests.conftest import VethPair
from tests.ctl.conftest import ROOT, RealAgent, run_fabricctl

HOOKS = ROOT / "contrib/slurm"
PROLOG = HOOKS / "fabric-agent-prolog.sh"
EPILOG = HOOKS / "fabric-agent-epilog.sh"
JOB = "4242"

STUB_FABRICCTL = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_DIR/fabricctl.argv"
cat > "$STUB_DIR/fabricctl.stdin"
printf '%s\\n' "${STUB_FABRICCTL_OUTPUT:-slurm-job: applied (1 change)}"
exit "${STUB_FABRICCTL_RC:-0}"
"""
STUB_SQUEUE = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_DIR/squeue.argv"
printf '%s\\n' "$STUB_TIME_LIMIT"
"""
STUB_LOGGER = """#!/bin/sh
printf '%s\\n' "$*" >> "$STUB_DIR/logger.log"
"""


@dataclass
class Hooks:
    """A fake slurmd environment: stubs in `bin`, the config file, what they recorded."""

    directory: Path
    env: dict[str, str]
    config: Path

    def run(self, script: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(script)], env={**self.env, **env}, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip

    def without_squeue(self) -> None:
        (self.directory / "bin/squeue").unlink()

    @property
    def argv(self) -> list[str]:
        path = self.directory / "fabricctl.argv"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def document(self) -> dict[str, object]:
        loaded = yaml.safe_load((self.directory / "fabricctl.stdin").read_text())
        assert isinstance(loaded, dict)
        return loaded

    @property
    def log(self) -> str:
        path = self.directory / "logger.log"
        return path.read_text() if path.exists() else ""

    def ttl(self) -> str:
        argv = self.argv
        return argv[argv.index("--ttl") + 1]


@pytest.fixture
def hooks(tmp_path: Path) -> Hooks:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("fabricctl", STUB_FABRICCTL), ("squeue", STUB_SQUEUE),
                       ("logger", STUB_LOGGER)):  # fmt: skip
        stub = bin_dir / name
        stub.write_text(text)
        stub.chmod(0o755)
    config = tmp_path / "slurm.conf"
    config.write_text(
        "FABRIC_POLICY=training-node\nFABRIC_CLASS=collectives\n"
        "FABRIC_AGENT=unix:///run/test/agent.sock\n"
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_DIR": str(tmp_path),
        "STUB_TIME_LIMIT": "02:00:00",
        "SLURM_JOB_ID": JOB,
        "SLURM_JOB_PARTITION": "gpu",
        "FABRIC_SLURM_CONF": str(config),
    }
    return Hooks(tmp_path, env, config)


def test_prolog_applies_an_assignment_for_the_job_cgroup(hooks: Hooks) -> None:
    result = hooks.run(PROLOG)

    assert result.returncode == 0, result.stderr
    assert hooks.argv == ["--agent", "unix:///run/test/agent.sock", "--timeout", "10s",
                          "policy", "apply", "-f", "-", "--ttl", "10800s"]  # fmt: skip
    document = hooks.document
    assert document == {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosAssignment",
        "metadata": {"name": f"slurm-job-{JOB}"},
        "spec": {
            "policy": "training-node",
            "className": "collectives",
            "match": [{"cgroup": f"system.slice/slurmstepd.scope/job_{JOB}"}],
        },
    }
    # The agent's own conversion accepts it.
    assert object_from_document(document, "test").assignment.spec.class_name == "collectives"
    squeue_argv = (hooks.directory / "squeue.argv").read_text().split()
    assert squeue_argv == ["-h", "-j", JOB, "-o", "%l"]
    assert f"job {JOB}: system.slice/slurmstepd.scope/job_{JOB} in training-node/collectives" in (
        hooks.log
    )


@pytest.mark.parametrize(
    ("limit", "ttl"),
    [
        ("1-02:03:04", f"{86400 + 7384 + 3600}s"),
        ("2-00:00", f"{2 * 86400 + 3600}s"),
        ("02:00:00", f"{7200 + 3600}s"),
        ("08:09:07", f"{8 * 3600 + 9 * 60 + 7 + 3600}s"),
        ("30:00", f"{1800 + 3600}s"),
        ("5", f"{300 + 3600}s"),
        ("40-00:00:00", "2592000s"),  # the agent's 30-day ceiling
        ("UNLIMITED", "24h"),
        ("NOT_SET", "24h"),
        ("", "24h"),
    ],
)
def test_prolog_lease_from_time_limit(hooks: Hooks, limit: str, ttl: str) -> None:
    result = hooks.run(PROLOG, STUB_TIME_LIMIT=limit)

    assert result.returncode == 0, result.stderr
    assert hooks.ttl() == ttl


def test_prolog_lease_without_squeue_and_margin(hooks: Hooks) -> None:
    hooks.without_squeue()
    hooks.config.write_text(hooks.config.read_text() + "FABRIC_LEASE_TTL=12h\n")

    assert hooks.run(PROLOG).returncode == 0
    assert hooks.ttl() == "12h"

    hooks.config.write_text(hooks.config.read_text() + "FABRIC_LEASE_MARGIN_S=60\n")
    (hooks.directory / "bin/squeue").write_text(STUB_SQUEUE)
    (hooks.directory / "bin/squeue").chmod(0o755)
    assert hooks.run(PROLOG, STUB_TIME_LIMIT="10:00").returncode == 0
    assert hooks.ttl() == "660s"


@pytest.mark.parametrize(
    ("partition", "config", "expected"),
    [
        ("gpu-a100", "FABRIC_CLASS_gpu_a100=fast\n", "fast"),
        ("gpu-a100", "FABRIC_CLASS_GPU_A100=faster\n", "faster"),
        ("debug", "FABRIC_CLASS_gpu_a100=fast\n", "collectives"),
    ],
)
def test_prolog_class_per_partition(
    hooks: Hooks, partition: str, config: str, expected: str
) -> None:
    hooks.config.write_text(hooks.config.read_text() + config)

    result = hooks.run(PROLOG, SLURM_JOB_PARTITION=partition)

    assert result.returncode == 0, result.stderr
    spec = hooks.document["spec"]
    assert isinstance(spec, dict) and spec["className"] == expected


def test_prolog_without_a_class_assigns_nothing(hooks: Hooks) -> None:
    hooks.config.write_text("FABRIC_POLICY=training-node\nFABRIC_CLASS_gpu=fast\n")

    result = hooks.run(PROLOG, SLURM_JOB_PARTITION="debug")

    assert result.returncode == 0
    assert hooks.argv == []
    assert "no FABRIC_CLASS for partition debug" in hooks.log


def test_prolog_cgroup_template(hooks: Hooks) -> None:
    template = "FABRIC_SLURM_CGROUP_TEMPLATE=slurm.slice/job_%j/step_extern\n"
    hooks.config.write_text(hooks.config.read_text() + template)

    assert hooks.run(PROLOG).returncode == 0
    assert hooks.document["spec"] == {
        "policy": "training-node",
        "className": "collectives",
        "match": [{"cgroup": f"slurm.slice/job_{JOB}/step_extern"}],
    }


def test_prolog_quotes_yaml_values(hooks: Hooks) -> None:
    hooks.config.write_text("FABRIC_POLICY=\"it's: #odd\"\nFABRIC_CLASS='a b'\n")

    assert hooks.run(PROLOG).returncode == 0
    spec = hooks.document["spec"]
    assert isinstance(spec, dict)
    assert (spec["policy"], spec["className"]) == ("it's: #odd", "a b")


def test_prolog_failure_never_fails_the_job(hooks: Hooks) -> None:
    result = hooks.run(
        PROLOG, STUB_FABRICCTL_RC="3",
        STUB_FABRICCTL_OUTPUT="fabricctl: agent at unix:/run/x is unreachable",
    )  # fmt: skip

    assert result.returncode == 0
    assert f"job {JOB}: cannot assign" in hooks.log
    assert "is unreachable" in hooks.log


def test_prolog_strict_fails(hooks: Hooks) -> None:
    result = hooks.run(PROLOG, STUB_FABRICCTL_RC="2", FABRIC_STRICT="1")

    assert result.returncode == 1
    assert "cannot assign" in hooks.log


@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_without_policy(hooks: Hooks, strict: str) -> None:
    hooks.config.write_text("FABRIC_CLASS=collectives\n")

    result = hooks.run(PROLOG, FABRIC_STRICT=strict)

    assert result.returncode == int(strict)
    assert "FABRIC_POLICY is not" in hooks.log
    assert hooks.argv == []


@pytest.mark.parametrize("script", [PROLOG, EPILOG])
def test_hooks_refuse_a_bad_job_id(hooks: Hooks, script: Path) -> None:
    result = hooks.run(script, SLURM_JOB_ID="42; rm -rf /")

    assert result.returncode == 0
    assert hooks.argv == []
    assert "is not a job id" in hooks.log


def test_epilog_deletes_the_assignment(hooks: Hooks) -> None:
    result = hooks.run(EPILOG, STUB_FABRICCTL_OUTPUT=f"slurm-job-{JOB}: deleted (1 change)")

    assert result.returncode == 0, result.stderr
    assert hooks.argv == ["--agent", "unix:///run/test/agent.sock", "--timeout", "10s",
                          "policy", "delete", f"slurm-job-{JOB}", "--ignore-not-found"]  # fmt: skip
    assert f"job {JOB}: slurm-job-{JOB}: deleted" in hooks.log


def test_epilog_failure_exits_0(hooks: Hooks) -> None:
    result = hooks.run(EPILOG, STUB_FABRICCTL_RC="3", FABRIC_STRICT="1")

    assert result.returncode == 0
    assert f"cannot delete slurm-job-{JOB}" in hooks.log


def test_hooks_share_one_settings_block() -> None:
    def settings(script: Path) -> str:
        text = script.read_text()
        return text[text.index("# --- settings") : text.index("# --- end of settings ---")]

    assert settings(PROLOG) == settings(EPILOG)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_hooks_are_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "-s", "sh", str(PROLOG), str(EPILOG)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout


def test_prolog_and_epilog_against_agent(
    netns_agent: RealAgent, shaped_pair: VethPair, tmp_path: Path
) -> None:
    fabricctl = Path(sys.executable).parent / "fabricctl"
    if not fabricctl.exists():
        pytest.skip(f"{fabricctl} missing: pip install -e .")
    policy = {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosPolicy",
        "metadata": {"name": "node"},
        "spec": {
            "interface": shaped_pair.device, "direction": "egress", "bandwidth": "1Gbit",
            "defaultClass": "rest",
            "classes": [{"name": "jobs", "priority": 1, "rate": "500Mbit"},
                        {"name": "rest", "priority": 7, "rate": "100Mbit"}],
        },
    }  # fmt: skip
    applied = run_fabricctl("--agent", netns_agent.target, "policy", "apply", "-f", "-",
                            stdin=yaml.safe_dump(policy))  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    config = tmp_path / "slurm.conf"
    config.write_text(
        f"FABRIC_POLICY=node\nFABRIC_CLASS=jobs\nFABRIC_AGENT={netns_agent.target}\n"
        f"FABRICCTL={fabricctl}\n"
    )
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": JOB, "FABRIC_SLURM_CONF": str(config),
           "FABRIC_STRICT": "1"}  # fmt: skip

    prolog = subprocess.run(["sh", str(PROLOG)], env=env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    listed = json.loads(
        run_fabricctl("--agent", netns_agent.target, "policy", "list", "-o", "json").stdout
    )
    epilog = subprocess.run(["sh", str(EPILOG)], env=env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    after = json.loads(
        run_fabricctl("--agent", netns_agent.target, "policy", "list", "-o", "json").stdout
    )

    assert prolog.returncode == 0, prolog.stderr + netns_agent.log.read_text()
    (job,) = [p for p in listed["policies"] if p["name"] == f"slurm-job-{JOB}"]
    assert job["source"] == "POLICY_SOURCE_API"
    assert job["object"]["assignment"]["spec"]["className"] == "jobs"
    # No job cgroup exists here: the assignment waits for it.
    assert job["state"] in ("POLICY_STATE_PENDING", "POLICY_STATE_ENFORCED")
    assert "leaseExpireTime" in job
    assert epilog.returncode == 0
    assert f"slurm-job-{JOB}" not in [p["name"] for p in after.get("policies", [])]
