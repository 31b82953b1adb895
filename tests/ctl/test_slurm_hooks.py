"""contrib/slurm prolog and epilog, run by sh as slurmd runs them: no PATH, only the
environment slurmd gives. Stub squeue and logger, a fake cgroup2 tree and /proc; the
job file each prolog writes is checked against the job file contract."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ROOT

HOOKS = ROOT / "contrib/slurm"
PROLOG = HOOKS / "fabric-agent-prolog.sh"
EPILOG = HOOKS / "fabric-agent-epilog.sh"
EXAMPLE = HOOKS / "slurm.conf.example"
JOB = "4242"
NODE = "node1"
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAX_LEASE_S = 30 * 86400

STUB_SQUEUE = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_DIR/squeue.argv"
printf '%s\\n' "$PATH" > "$STUB_DIR/squeue.path"
echo $$ > "$STUB_DIR/squeue.pid"
if [ -n "${STUB_SQUEUE_SLEEP:-}" ]; then
    sleep "$STUB_SQUEUE_SLEEP"
fi
printf '%s\\n' "$STUB_TIME_LIMIT"
exit "${STUB_SQUEUE_RC:-0}"
"""
STUB_LOGGER = """#!/bin/sh
printf '%s\\n' "$*" >> "$STUB_DIR/logger.log"
exit "${STUB_LOGGER_RC:-0}"
"""

# --- the job file contract (README "Slurm"); the agent's parser will replace this ---
CONTRACT_KEYS = {"version", "scheduler", "job_id", "user", "gpus", "expires_at", "lease",
                 "qos"}  # fmt: skip
QOS_KEYS = {"policy", "className", "cgroup"}
GPU_NAME = re.compile(r"[0-9]+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
    return dict(pairs)


def check_job_file(path: Path) -> dict[str, object]:
    """The job file at `path` as the contract allows it, else an AssertionError."""
    raw = path.read_bytes()
    assert len(raw) <= 16 * 1024
    document = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    assert isinstance(document, dict)
    assert set(document) <= CONTRACT_KEYS, set(document) - CONTRACT_KEYS
    assert document["version"] == 1
    assert document["scheduler"] == "slurm"
    job_id = document["job_id"]
    assert isinstance(job_id, str) and job_id.isascii() and job_id.isdigit()
    assert path.name == f"slurm-job-{job_id}.json"
    expires_at = document["expires_at"]
    assert isinstance(expires_at, int | float) and not isinstance(expires_at, bool)
    if "user" in document:
        user = document["user"]
        assert isinstance(user, str) and user.isprintable() and 0 < len(user) <= 64
    if "gpus" in document:
        gpus = document["gpus"]
        assert isinstance(gpus, list) and len(gpus) <= 64
        assert all(isinstance(gpu, str) and GPU_NAME.fullmatch(gpu) for gpu in gpus), gpus
    if "lease" in document:
        lease = document["lease"]
        assert isinstance(lease, str) and len(lease) <= 256
    if "qos" in document:
        qos = document["qos"]
        assert isinstance(qos, dict) and set(qos) == QOS_KEYS
        assert all(isinstance(value, str) and value for value in qos.values())
    return document


@dataclass
class Hooks:
    """A fake slurmd environment: stubs in `bin`, a cgroup2 tree, a /proc, the config
    file and job directory, and what the stubs recorded."""

    directory: Path
    env: dict[str, str]
    config: Path
    cgroup_root: Path
    proc: Path
    job_dir: Path

    def run(self, script: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", str(script)], env={**self.env, **env}, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip

    def configure(self, text: str) -> None:
        self.config.write_text(self.config.read_text() + text)

    @property
    def job_file(self) -> Path:
        return self.job_dir / f"slurm-job-{JOB}.json"

    def document(self) -> dict[str, object]:
        return check_job_file(self.job_file)

    def lease_s(self) -> float:
        expires_at = self.document()["expires_at"]
        assert isinstance(expires_at, int)
        return expires_at - time.time()

    @property
    def log(self) -> str:
        path = self.directory / "logger.log"
        return path.read_text() if path.exists() else ""

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.job_dir.iterdir() if p.name.startswith("."))


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def hooks(tmp_path: Path) -> Hooks:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "squeue", STUB_SQUEUE)
    _executable(bin_dir / "logger", STUB_LOGGER)
    cgroup_root = tmp_path / "cgroup"
    (cgroup_root / "system.slice" / f"{NODE}_slurmstepd.scope").mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/system.slice/slurmd.service\n")
    config = tmp_path / "slurm.conf"
    config.write_text("FABRIC_POLICY=training-node\nFABRIC_CLASS=collectives\n")
    # What slurmd gives a Prolog (no PATH), and the settings pointing at the fakes.
    env = {
        "STUB_DIR": str(tmp_path),
        "STUB_TIME_LIMIT": "02:00:00",
        "SLURM_JOB_ID": JOB,
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_JOB_GPUS": "0,1",
        "SLURMD_NODENAME": NODE,
        "FABRIC_SLURM_CONF": str(config),
        "FABRIC_JOB_DIR": str(tmp_path / "jobs"),
        "FABRIC_CGROUP_ROOT": str(cgroup_root),
        "FABRIC_PROC_ROOT": str(proc),
        "FABRIC_SQUEUE": str(bin_dir / "squeue"),
        "FABRIC_LOGGER": str(bin_dir / "logger"),
        "FABRIC_SYSLOG_SOCKET": str(tmp_path / "no-syslog"),
    }
    return Hooks(tmp_path, env, config, cgroup_root, proc, tmp_path / "jobs")


@pytest.fixture
def syslog(hooks: Hooks) -> Iterator[socket.socket]:
    """A datagram socket standing in for /dev/log."""
    path = hooks.directory / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        hooks.env["FABRIC_SYSLOG_SOCKET"] = str(path)
        yield sock


# --- the job file ---


def test_prolog_writes_the_job_file(hooks: Hooks) -> None:
    started = time.time()

    result = hooks.run(PROLOG)

    assert result.returncode == 0, result.stderr
    document = hooks.document()
    expires_at = document.pop("expires_at")
    assert document == {
        "version": 1,
        "scheduler": "slurm",
        "job_id": JOB,
        "user": "alice",
        "gpus": ["0", "1"],
        "lease": "time limit 02:00:00 (squeue) + 3600s margin",
        "qos": {
            "policy": "training-node",
            "className": "collectives",
            "cgroup": f"system.slice/{NODE}_slurmstepd.scope/job_{JOB}",
        },
    }
    assert isinstance(expires_at, int)
    assert started + 10800 - 2 <= expires_at <= time.time() + 10800 + 2
    assert (hooks.directory / "squeue.argv").read_text().split() == ["-h", "-j", JOB, "-o",
                                                                     "%l"]  # fmt: skip
    # slurmd gives no PATH: the hooks set a safe one for what they run.
    assert (hooks.directory / "squeue.path").read_text().strip() == SAFE_PATH
    assert stat.S_IMODE(hooks.job_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE(hooks.job_file.stat().st_mode) == 0o644
    assert hooks.leftovers() == []
    assert f"info: job {JOB}: wrote {hooks.job_file}: gpus 0,1, qos training-node/collectives" in (
        result.stderr
    )


def test_prolog_replaces_an_existing_job_file_whole(hooks: Hooks) -> None:
    hooks.job_dir.mkdir()
    hooks.job_file.write_text('{"version": 1, "stale": true}\n')
    inode = hooks.job_file.stat().st_ino

    assert hooks.run(PROLOG).returncode == 0

    assert "stale" not in hooks.document()
    # Renamed onto the name, not rewritten in place: a reader sees old or new, whole.
    assert hooks.job_file.stat().st_ino != inode
    assert hooks.leftovers() == []


def test_prolog_without_a_class_writes_user_and_gpus(hooks: Hooks) -> None:
    hooks.config.write_text("")
    # Not even a cgroup2 tree: without a class the prolog does not look for one.
    shutil.rmtree(hooks.cgroup_root)
    (hooks.proc / "self" / "cgroup").write_text("1:cpu:/\n0::/\n")

    result = hooks.run(PROLOG, SLURM_JOB_PARTITION="debug")

    assert result.returncode == 0
    document = hooks.document()
    assert "qos" not in document
    assert (document["user"], document["gpus"]) == ("alice", ["0", "1"])
    assert "err" not in result.stderr
    assert "no qos (no FABRIC_CLASS for partition debug)" in result.stderr


@pytest.mark.parametrize(
    ("partition", "config", "expected"),
    [
        ("gpu-a100", "FABRIC_CLASS_gpu_a100=fast\n", "fast"),
        ("gpu-a100", "FABRIC_CLASS_GPU_A100=faster\n", "faster"),
        ("debug", "FABRIC_CLASS_gpu_a100=fast\n", "collectives"),
        ('x$(touch pwned)"\n', "", "collectives"),
    ],
)
def test_prolog_class_per_partition(
    hooks: Hooks, partition: str, config: str, expected: str
) -> None:
    hooks.configure(config)

    result = hooks.run(PROLOG, SLURM_JOB_PARTITION=partition)

    assert result.returncode == 0, result.stderr
    qos = hooks.document()["qos"]
    assert isinstance(qos, dict) and qos["className"] == expected
    assert not (hooks.directory / "pwned").exists()


@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_class_without_policy(hooks: Hooks, strict: str) -> None:
    hooks.config.write_text("FABRIC_CLASS=collectives\n")

    result = hooks.run(PROLOG, FABRIC_STRICT=strict)

    assert "FABRIC_POLICY is not" in result.stderr
    if strict == "1":
        assert result.returncode == 1
        assert not hooks.job_dir.exists()
    else:
        assert result.returncode == 0
        assert "qos" not in hooks.document()


def test_example_config_sets_nothing(hooks: Hooks) -> None:
    # Shipped values would make every job log an error on a node without that policy.
    settings = [line for line in EXAMPLE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    assert settings == []
    hooks.config.write_text(EXAMPLE.read_text())

    result = hooks.run(PROLOG)

    assert result.returncode == 0
    assert "err" not in result.stderr
    assert "qos" not in hooks.document()


@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_config_that_does_not_run_is_ignored(hooks: Hooks, strict: str) -> None:
    hooks.configure("FABRIC_JOB_DIR=/nonexistent/elsewhere\nif then fi (\n")

    result = hooks.run(PROLOG, FABRIC_STRICT=strict)

    assert f"{hooks.config} ignored" in result.stderr
    if strict == "1":
        assert result.returncode == 1
        assert not hooks.job_dir.exists()
    else:
        # Not half-applied: nothing from the file, so no class, and the usual directory.
        assert result.returncode == 0, result.stderr
        assert "qos" not in hooks.document()


# --- the lease ---


@pytest.mark.parametrize(
    ("limit", "seconds"),
    [
        ("1-02:03:04", 86400 + 7384),
        ("2-00:00", 2 * 86400),
        ("3-05", 3 * 86400 + 5 * 3600),
        ("02:00:00", 7200),
        ("08:09:07", 8 * 3600 + 9 * 60 + 7),
        ("30:00", 1800),
        ("5", 300),
        ("0-00:00:09", 9),
    ],
)
def test_prolog_lease_from_time_limit(hooks: Hooks, limit: str, seconds: int) -> None:
    result = hooks.run(PROLOG, STUB_TIME_LIMIT=limit)

    assert result.returncode == 0, result.stderr
    assert abs(hooks.lease_s() - (seconds + 3600)) < 5
    assert hooks.document()["lease"] == f"time limit {limit} (squeue) + 3600s margin"


def test_prolog_lease_is_capped_at_30_days(hooks: Hooks) -> None:
    assert hooks.run(PROLOG, STUB_TIME_LIMIT="40-00:00:00").returncode == 0

    assert abs(hooks.lease_s() - MAX_LEASE_S) < 5
    assert hooks.document()["lease"] == (
        "time limit 40-00:00:00 (squeue) + 3600s margin, capped at 30 days"
    )


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ("UNLIMITED", "job has no time limit (UNLIMITED)"),
        ("NOT_SET", "time limit 'NOT_SET' from squeue not understood"),
        ("", "time limit from squeue not understood"),
        ("1:2:3:4", "time limit '1:2:3:4' from squeue not understood"),
        ('"}\n{', "time limit from squeue not understood"),
    ],
)
def test_prolog_lease_without_a_time_limit(hooks: Hooks, limit: str, reason: str) -> None:
    result = hooks.run(PROLOG, STUB_TIME_LIMIT=limit)

    assert result.returncode == 0, result.stderr
    assert abs(hooks.lease_s() - 86400) < 5
    assert hooks.document()["lease"] == f"FABRIC_LEASE_TTL 24h: {reason}"
    # By design for an unlimited job; worth a warning otherwise.
    assert ("warning" in result.stderr) == (limit != "UNLIMITED")


def test_prolog_lease_without_squeue(hooks: Hooks) -> None:
    missing = hooks.directory / "no" / "squeue"

    result = hooks.run(PROLOG, FABRIC_SQUEUE=str(missing), FABRIC_LEASE_TTL="12h")

    assert result.returncode == 0
    assert abs(hooks.lease_s() - 12 * 3600) < 5
    assert hooks.document()["lease"] == f"FABRIC_LEASE_TTL 12h: {missing} not found"
    assert f"warning: job {JOB}: {missing} not found: lease FABRIC_LEASE_TTL 12h" in (result.stderr)


def test_prolog_lease_when_squeue_fails(hooks: Hooks) -> None:
    result = hooks.run(PROLOG, STUB_SQUEUE_RC="1", STUB_TIME_LIMIT="slurm_load_jobs error")

    assert result.returncode == 0
    assert hooks.document()["lease"] == "FABRIC_LEASE_TTL 24h: squeue failed (exit 1)"


def test_prolog_does_not_wait_for_a_hung_squeue(hooks: Hooks) -> None:
    started = time.monotonic()
    try:
        result = hooks.run(PROLOG, STUB_SQUEUE_SLEEP="30", FABRIC_SQUEUE_TIMEOUT="1")
        elapsed = time.monotonic() - started
    finally:
        pid = int((hooks.directory / "squeue.pid").read_text())
        alive = _alive(pid)
        if alive:
            os.kill(pid, signal.SIGKILL)

    assert result.returncode == 0
    # The bound: FABRIC_SQUEUE_TIMEOUT plus 1 s before KILL, far below the stub's 30 s.
    assert elapsed < 10
    assert not alive
    assert abs(hooks.lease_s() - 86400) < 5
    assert hooks.document()["lease"] == "FABRIC_LEASE_TTL 24h: squeue timed out after 1s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_prolog_lease_settings(hooks: Hooks) -> None:
    hooks.configure("FABRIC_LEASE_MARGIN_S=060\nFABRIC_LEASE_TTL=2d\n")

    assert hooks.run(PROLOG, STUB_TIME_LIMIT="10:00").returncode == 0
    assert abs(hooks.lease_s() - 660) < 5
    assert hooks.document()["lease"] == "time limit 10:00 (squeue) + 60s margin"

    assert hooks.run(PROLOG, STUB_TIME_LIMIT="UNLIMITED").returncode == 0
    assert abs(hooks.lease_s() - 2 * 86400) < 5


def test_prolog_lease_from_the_job_end_time(hooks: Hooks) -> None:
    end = int(time.time()) + 5000

    assert hooks.run(PROLOG, SLURM_JOB_END_TIME=str(end)).returncode == 0

    assert hooks.document()["expires_at"] == end + 3600
    assert hooks.document()["lease"] == (f"job end time {end} (SLURM_JOB_END_TIME) + 3600s margin")
    assert not (hooks.directory / "squeue.argv").exists()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("FABRIC_LEASE_TTL", "1 week"),
        ("FABRIC_LEASE_MARGIN_S", "-5"),
        ("FABRIC_SQUEUE_TIMEOUT", "2; rm"),
        ("FABRIC_SQUEUE_TIMEOUT", "0"),
        ("FABRIC_SQUEUE_TIMEOUT", "0.00"),
    ],
)
@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_bad_setting(hooks: Hooks, setting: str, value: str, strict: str) -> None:
    result = hooks.run(PROLOG, **{setting: value, "FABRIC_STRICT": strict})

    assert f"{setting} '{value}' is not" in result.stderr
    if strict == "1":
        assert result.returncode == 1
        assert not hooks.job_dir.exists()
    else:
        assert result.returncode == 0
        assert abs(hooks.lease_s() - (7200 + 3600)) < 5


# --- the job's cgroup ---


def test_prolog_finds_the_scope_without_the_node_name(hooks: Hooks) -> None:
    shutil.rmtree(hooks.cgroup_root / "system.slice")
    (hooks.cgroup_root / "system.slice" / "slurmstepd.scope").mkdir(parents=True)

    assert hooks.run(PROLOG).returncode == 0

    qos = hooks.document()["qos"]
    assert isinstance(qos, dict)
    assert qos["cgroup"] == f"system.slice/slurmstepd.scope/job_{JOB}"


def test_prolog_prefers_the_scope_named_for_this_node(hooks: Hooks) -> None:
    (hooks.cgroup_root / "system.slice" / "slurmstepd.scope").mkdir()
    (hooks.cgroup_root / "system.slice" / "other_slurmstepd.scope").mkdir()

    assert hooks.run(PROLOG).returncode == 0

    qos = hooks.document()["qos"]
    assert isinstance(qos, dict)
    assert qos["cgroup"] == f"system.slice/{NODE}_slurmstepd.scope/job_{JOB}"


def test_prolog_finds_the_cgroup2_mount_in_mountinfo(hooks: Hooks) -> None:
    (hooks.proc / "self" / "mountinfo").write_text(
        "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n"
        "35 24 0:30 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {hooks.cgroup_root} rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
    )
    env = {**hooks.env}
    del env["FABRIC_CGROUP_ROOT"]
    hooks.env = env

    assert hooks.run(PROLOG).returncode == 0

    qos = hooks.document()["qos"]
    assert isinstance(qos, dict)
    assert qos["cgroup"] == f"system.slice/{NODE}_slurmstepd.scope/job_{JOB}"


@pytest.mark.parametrize(
    ("template", "cgroup"),
    [
        ("slurm.slice/job_%j/step_extern", f"slurm.slice/job_{JOB}/step_extern"),
        ("system.slice/%n_slurmstepd.scope/job_%j",
         f"system.slice/{NODE}_slurmstepd.scope/job_{JOB}"),
        ("x/%n/%j/%n%j", f"x/{NODE}/{JOB}/{NODE}{JOB}"),
    ],
)  # fmt: skip
def test_prolog_cgroup_template(hooks: Hooks, template: str, cgroup: str) -> None:
    hooks.configure(f"FABRIC_SLURM_CGROUP_TEMPLATE='{template}'\n")
    # A template is taken as given: no scope needs to exist.
    shutil.rmtree(hooks.cgroup_root)

    result = hooks.run(PROLOG)

    assert result.returncode == 0, result.stderr
    qos = hooks.document()["qos"]
    assert isinstance(qos, dict) and qos["cgroup"] == cgroup


@pytest.mark.parametrize(
    ("template", "node", "message"),
    [
        ("system.slice/%n_slurmstepd.scope/job_%j", "", "SLURMD_NODENAME '' is not a node name"),
        ("system.slice/%n/job_%j", "../..", "SLURMD_NODENAME '../..' is not a node name"),
        ("/system.slice/job_%j", NODE, "not a path relative to the cgroup2 mount"),
        ("system.slice/../job_%j", NODE, "not a path relative to the cgroup2 mount"),
    ],
)  # fmt: skip
def test_prolog_cgroup_template_refused(
    hooks: Hooks, template: str, node: str, message: str
) -> None:
    hooks.configure(f"FABRIC_SLURM_CGROUP_TEMPLATE='{template}'\n")

    result = hooks.run(PROLOG, SLURMD_NODENAME=node)

    assert result.returncode == 0
    assert message in result.stderr
    assert "qos" not in hooks.document()


HYBRID_CGROUP = (
    "12:memory:/system.slice/slurmd.service\n1:name=systemd:/system.slice/slurmd.service\n"
    "0::/system.slice/slurmd.service\n"
)


def test_prolog_on_a_hybrid_host_says_why_the_job_is_not_classified(hooks: Hooks) -> None:
    shutil.rmtree(hooks.cgroup_root / "system.slice")
    (hooks.proc / "self" / "cgroup").write_text(HYBRID_CGROUP)

    result = hooks.run(PROLOG)

    assert result.returncode == 0
    message = result.stderr
    assert f"err: job {JOB}: not classified by cgroup" in message
    # What it looked for, what the host is, why Slurm cannot help, what to do.
    assert f"{hooks.cgroup_root}/system.slice/{NODE}_slurmstepd.scope" in message
    assert f"{hooks.cgroup_root}/system.slice/slurmstepd.scope" in message
    assert "hybrid or cgroup v1" in message
    assert "Hybrid mode is not supported" in message
    assert "systemd.unified_cgroup_hierarchy=1" in message
    # Still written, without qos: the agent attributes the GPUs all the same.
    document = hooks.document()
    assert "qos" not in document and document["gpus"] == ["0", "1"]


def test_prolog_on_a_hybrid_host_strict_fails(hooks: Hooks) -> None:
    shutil.rmtree(hooks.cgroup_root / "system.slice")
    (hooks.proc / "self" / "cgroup").write_text(HYBRID_CGROUP)

    result = hooks.run(PROLOG, FABRIC_STRICT="1")

    assert result.returncode == 1
    assert "hybrid or cgroup v1" in result.stderr
    assert "FABRIC_STRICT=1: exit 1, no job file" in result.stderr
    assert not hooks.job_dir.exists()


def test_prolog_on_a_unified_host_without_a_slurm_scope(hooks: Hooks) -> None:
    shutil.rmtree(hooks.cgroup_root / "system.slice")

    result = hooks.run(PROLOG)

    assert result.returncode == 0
    assert "not classified by cgroup" in result.stderr
    assert "CgroupPlugin=cgroup/v2" in result.stderr
    assert "hybrid" not in result.stderr
    assert "qos" not in hooks.document()


def test_prolog_without_a_cgroup2_mount(hooks: Hooks) -> None:
    (hooks.proc / "self" / "mountinfo").write_text(
        "35 24 0:30 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory\n"
    )
    (hooks.proc / "self" / "cgroup").write_text("4:memory:/\n")
    env = {**hooks.env}
    del env["FABRIC_CGROUP_ROOT"]
    hooks.env = env

    result = hooks.run(PROLOG)

    assert result.returncode == 0
    assert "no cgroup2 filesystem is mounted" in result.stderr
    assert "systemd.unified_cgroup_hierarchy=1" in result.stderr
    assert "qos" not in hooks.document()


# --- GPUs ---


def test_prolog_gpus_from_cuda_visible_devices(hooks: Hooks) -> None:
    uuids = ["GPU-5f0e9a3c-1b2d-4e5f-8a9b-0c1d2e3f4a5b",
             "MIG-GPU-5f0e9a3c-1b2d-4e5f-8a9b-0c1d2e3f4a5b/1/0",
             "MIG-9d1c1b7e-2f3a-5b4c-9d8e-7f6a5b4c3d2e"]  # fmt: skip
    env = {**hooks.env}
    del env["SLURM_JOB_GPUS"]
    hooks.env = env

    assert hooks.run(PROLOG, CUDA_VISIBLE_DEVICES=",".join(uuids)).returncode == 0

    assert hooks.document()["gpus"] == uuids


def test_prolog_drops_bad_gpu_entries(hooks: Hooks) -> None:
    entries = '0,,gpu1,GPU-xyz,3,MIG-a b,7"],"qos":{'

    result = hooks.run(PROLOG, SLURM_JOB_GPUS=entries)

    assert result.returncode == 0
    assert hooks.document()["gpus"] == ["0", "3"]
    assert "SLURM_JOB_GPUS: dropped entries that are neither GPU indices" in result.stderr
    assert "gpu1" in result.stderr


def test_prolog_keeps_at_most_64_gpus(hooks: Hooks) -> None:
    result = hooks.run(PROLOG, SLURM_JOB_GPUS=",".join(str(i) for i in range(70)))

    assert result.returncode == 0
    assert hooks.document()["gpus"] == [str(i) for i in range(64)]
    assert "SLURM_JOB_GPUS: more than 64 GPUs, kept the first 64" in result.stderr


@pytest.mark.parametrize("value", ["", "NoDevFiles"])
def test_prolog_job_without_gpus(hooks: Hooks, value: str) -> None:
    result = hooks.run(PROLOG, SLURM_JOB_GPUS=value, CUDA_VISIBLE_DEVICES=value)

    assert result.returncode == 0
    assert "gpus" not in hooks.document()
    assert "warning" not in result.stderr


# --- hostile names ---


@pytest.mark.parametrize(
    "user",
    ['a"b', "a\\b", 'x\\"}, "qos": {"', "jürgen", "用户", "🙂" * 64, "a b", "$(touch pwned)"],
)
def test_prolog_user_names_stay_strings(hooks: Hooks, user: str) -> None:
    assert hooks.run(PROLOG, SLURM_JOB_USER=user).returncode == 0

    document = hooks.document()
    assert document["user"] == user
    assert document["qos"] == {
        "policy": "training-node", "className": "collectives",
        "cgroup": f"system.slice/{NODE}_slurmstepd.scope/job_{JOB}",
    }  # fmt: skip
    assert not (hooks.directory / "pwned").exists()


@pytest.mark.parametrize(
    "user",
    [
        b"a\nb",
        b"a\tb",
        b"\x1b[31m",
        b"a" * 65,
        "é".encode() * 65,
        b"\xff\xfe",
        b"\xed\xa0\x80",  # a UTF-16 surrogate
        "a\u00a0b".encode(),
        "a\u0085b".encode(),
        "a\u2028b".encode(),
        "a\u200bb".encode(),
        "a\ue000".encode(),  # no-break space, C1 NEL, line separator, zero width, private use
    ],
)
def test_prolog_drops_a_user_name_it_cannot_carry(hooks: Hooks, user: bytes) -> None:
    env = {**hooks.env, "SLURM_JOB_USER": user}
    result = subprocess.run(["/bin/sh", str(PROLOG)], env=env, capture_output=True,  # type: ignore[arg-type]
                            timeout=60, check=False)  # fmt: skip

    assert result.returncode == 0
    document = hooks.document()
    assert "user" not in document and "qos" in document
    assert b"SLURM_JOB_USER is not a printable name" in result.stderr


@pytest.mark.parametrize(
    ("policy", "class_name"),
    [('it"s', "a\\b"), ("schön", "クラス"), ("'single'", '\\"'), ("a{b}c", "[x]")],
)
def test_prolog_policy_and_class_names_stay_strings(
    hooks: Hooks, policy: str, class_name: str
) -> None:
    # Written to the config the shell way, each value single-quoted.
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "'\\''") + "'"

    hooks.config.write_text(f"FABRIC_POLICY={quoted(policy)}\nFABRIC_CLASS={quoted(class_name)}\n")

    assert hooks.run(PROLOG).returncode == 0

    qos = hooks.document()["qos"]
    assert isinstance(qos, dict)
    assert (qos["policy"], qos["className"]) == (policy, class_name)


@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_refuses_a_policy_name_with_control_characters(hooks: Hooks, strict: str) -> None:
    hooks.config.write_text("FABRIC_POLICY='a\nb'\nFABRIC_CLASS=collectives\n")

    result = hooks.run(PROLOG, FABRIC_STRICT=strict)

    assert "FABRIC_POLICY holds characters that are not printable" in result.stderr
    if strict == "1":
        assert result.returncode == 1 and not hooks.job_dir.exists()
    else:
        assert result.returncode == 0 and "qos" not in hooks.document()


# --- the job directory ---


def test_prolog_creates_the_job_directory(hooks: Hooks) -> None:
    job_dir = hooks.directory / "run" / "fabric-agent" / "jobs"

    assert hooks.run(PROLOG, FABRIC_JOB_DIR=str(job_dir)).returncode == 0

    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE(job_dir.parent.stat().st_mode) == 0o755
    check_job_file(job_dir / f"slurm-job-{JOB}.json")


@pytest.mark.parametrize("kind", ["symlink", "file", "world-writable"])
@pytest.mark.parametrize("strict", ["0", "1"])
def test_prolog_refuses_a_bad_job_directory(hooks: Hooks, kind: str, strict: str) -> None:
    elsewhere = hooks.directory / "elsewhere"
    elsewhere.mkdir()
    if kind == "symlink":
        hooks.job_dir.symlink_to(elsewhere)
    elif kind == "file":
        hooks.job_dir.write_text("")
    else:
        hooks.job_dir.mkdir()
        hooks.job_dir.chmod(0o777)

    result = hooks.run(PROLOG, FABRIC_STRICT=strict)

    assert result.returncode == int(strict)
    assert f"FABRIC_JOB_DIR {hooks.job_dir}" in result.stderr
    assert "no job file written" in result.stderr or "no job file)" in result.stderr
    assert list(elsewhere.iterdir()) == []
    if kind == "world-writable":
        assert list(hooks.job_dir.iterdir()) == []


def test_prolog_write_failure_leaves_no_temporary_file(hooks: Hooks) -> None:
    # The final name is taken by a directory: the rename fails.
    hooks.job_file.mkdir(parents=True)
    (hooks.job_file / "keep").write_text("")

    result = hooks.run(PROLOG)

    assert result.returncode == 0
    assert f"cannot write {hooks.job_file}" in result.stderr
    assert hooks.leftovers() == []
    assert hooks.run(PROLOG, FABRIC_STRICT="1").returncode == 1


@pytest.mark.parametrize("script", [PROLOG, EPILOG])
def test_hooks_refuse_a_bad_job_id(hooks: Hooks, script: Path) -> None:
    for job_id in ["42; rm -rf /", "../42", "", "12345678901"]:
        result = hooks.run(script, SLURM_JOB_ID=job_id)

        assert result.returncode == 0
        assert "is not a job id" in result.stderr
    assert not hooks.job_dir.exists()


def test_prolog_strict_bad_job_id_fails(hooks: Hooks) -> None:
    assert hooks.run(PROLOG, SLURM_JOB_ID="x", FABRIC_STRICT="1").returncode == 1


# --- the epilog ---


def test_epilog_removes_the_job_file(hooks: Hooks) -> None:
    assert hooks.run(PROLOG).returncode == 0
    (hooks.job_dir / f".slurm-job-{JOB}.json.999.tmp").write_text("{")
    (hooks.job_dir / "slurm-job-7.json").write_text("{}")

    result = hooks.run(EPILOG)

    assert result.returncode == 0, result.stderr
    assert not hooks.job_file.exists()
    assert hooks.leftovers() == []
    assert (hooks.job_dir / "slurm-job-7.json").exists()
    assert f"info: job {JOB}: removed {hooks.job_file}" in result.stderr


@pytest.mark.parametrize("strict", ["0", "1"])
def test_epilog_without_a_job_file(hooks: Hooks, strict: str) -> None:
    result = hooks.run(EPILOG, FABRIC_STRICT=strict)

    assert result.returncode == 0
    assert f"no job file {hooks.job_file}" in result.stderr


def test_epilog_leaves_a_symlinked_job_directory_alone(hooks: Hooks) -> None:
    elsewhere = hooks.directory / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"slurm-job-{JOB}.json").write_text("{}")
    hooks.job_dir.symlink_to(elsewhere)

    result = hooks.run(EPILOG, FABRIC_STRICT="1")

    assert result.returncode == 0
    assert "is a symbolic link" in result.stderr
    assert (elsewhere / f"slurm-job-{JOB}.json").exists()


def test_epilog_failure_exits_0(hooks: Hooks) -> None:
    # Something rm cannot remove, even as root: a directory in the file's place.
    (hooks.job_file / "x").mkdir(parents=True)

    result = hooks.run(EPILOG, FABRIC_STRICT="1")

    assert result.returncode == 0
    assert f"err: job {JOB}: cannot remove {hooks.job_file}" in result.stderr


# --- logging ---


def test_hooks_log_through_logger_when_syslog_listens(hooks: Hooks, syslog: socket.socket) -> None:
    prolog = hooks.run(PROLOG)
    epilog = hooks.run(EPILOG)

    assert prolog.returncode == epilog.returncode == 0
    lines = hooks.log.splitlines()
    socket_path = hooks.env["FABRIC_SYSLOG_SOCKET"]
    assert lines[0].startswith(
        f"-u {socket_path} -t fabric-agent-slurm -p daemon.info -- job {JOB}: wrote"
    )
    assert lines[1] == (f"-u {socket_path} -t fabric-agent-slurm -p daemon.info -- job {JOB}: "
                        f"removed {hooks.job_file}")  # fmt: skip
    # Info went to syslog only.
    assert prolog.stderr == epilog.stderr == ""


def test_hooks_log_errors_to_stderr_as_well(hooks: Hooks, syslog: socket.socket) -> None:
    result = hooks.run(PROLOG, FABRIC_SQUEUE="/nonexistent/squeue")

    assert result.returncode == 0
    assert "daemon.warning -- job 4242: /nonexistent/squeue not found" in hooks.log
    assert "warning: job 4242: /nonexistent/squeue not found" in result.stderr
    assert "fabric-agent-slurm: info" not in result.stderr


@pytest.mark.parametrize("case", ["no-socket", "no-logger", "logger-fails"])
def test_hooks_log_to_stderr_when_syslog_cannot(
    hooks: Hooks, syslog: socket.socket, case: str
) -> None:
    env = {}
    if case == "no-socket":
        env["FABRIC_SYSLOG_SOCKET"] = str(hooks.directory / "missing.sock")
    elif case == "no-logger":
        env["FABRIC_LOGGER"] = str(hooks.directory / "missing" / "logger")
    else:
        env["STUB_LOGGER_RC"] = "1"

    result = hooks.run(PROLOG, **env)

    assert result.returncode == 0
    assert f"fabric-agent-slurm: info: job {JOB}: wrote {hooks.job_file}" in result.stderr
    if case == "no-socket":
        assert hooks.log == ""


@pytest.mark.skipif(not Path("/usr/bin/logger").exists(), reason="/usr/bin/logger missing")
def test_prolog_logs_through_the_real_logger(hooks: Hooks, syslog: socket.socket) -> None:
    result = hooks.run(PROLOG, FABRIC_LOGGER="/usr/bin/logger")

    assert result.returncode == 0, result.stderr
    message = syslog.recv(65536).decode()
    # daemon.info is <30>.
    assert message.startswith("<30>")
    assert "fabric-agent-slurm" in message and f"job {JOB}: wrote" in message
    assert result.stderr == ""


# --- the scripts themselves ---


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


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_prolog_under_bash(hooks: Hooks) -> None:
    # /bin/sh is bash on RHEL.
    bash = [str(shutil.which("bash")), "--posix", str(PROLOG)]
    result = subprocess.run(bash, env={**hooks.env, "SLURM_JOB_USER": 'a"\\b'},
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert hooks.document()["user"] == 'a"\\b'


def test_every_setting_is_documented() -> None:
    text = PROLOG.read_text()
    block = text[text.index("# --- settings") : text.index("# --- end of settings ---")]
    settings = set(re.findall(r"^(FABRIC_[A-Z_]+)=", block, re.MULTILINE)) - {"FABRIC_SLURM_CONF"}
    readme = (ROOT / "README.md").read_text()
    slurm = readme[readme.index("## Slurm") : readme.index("## Fleet aggregator")]
    example = EXAMPLE.read_text()

    assert len(settings) >= 11
    for name in sorted(settings | {"FABRIC_POLICY", "FABRIC_CLASS"}):
        assert f"| `{name}` |" in slurm, name
        assert f"#{name}=" in example, name


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    return None


@pytest.fixture
def real_scope(hooks: Hooks) -> Iterator[tuple[Path, str]]:
    """A scope named like slurmd's for a node of its own, in this host's cgroup2 tree;
    the hooks read this host's /proc."""
    mount = _cgroup2_mount()
    if os.geteuid() != 0:
        pytest.skip("needs root to create a cgroup")
    if mount is None:
        pytest.skip("no cgroup2 mount")
    # systemd makes system.slice; on a host without it, as slurmd would need it made.
    made_slice = not (mount / "system.slice").exists()
    if made_slice:
        (mount / "system.slice").mkdir()
    node = f"hooks{os.getpid()}"
    scope = mount / "system.slice" / f"{node}_slurmstepd.scope"
    scope.mkdir()
    env = {**hooks.env, "SLURMD_NODENAME": node}
    del env["FABRIC_CGROUP_ROOT"], env["FABRIC_PROC_ROOT"]
    hooks.env = env
    try:
        yield scope, node
    finally:
        scope.rmdir()
        if made_slice:
            # Unless something else has started using it meanwhile.
            with contextlib.suppress(OSError):
                (mount / "system.slice").rmdir()


def test_prolog_finds_the_scope_on_this_host(hooks: Hooks, real_scope: tuple[Path, str]) -> None:
    _, node = real_scope

    result = hooks.run(PROLOG)

    assert result.returncode == 0, result.stderr
    qos = hooks.document()["qos"]
    assert isinstance(qos, dict)
    assert qos["cgroup"] == f"system.slice/{node}_slurmstepd.scope/job_{JOB}"


def test_prolog_without_a_scope_on_this_host(hooks: Hooks) -> None:
    # This host's mountinfo and /proc/self/cgroup, nothing created.
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    if (mount / "system.slice" / "slurmstepd.scope").exists():
        pytest.skip("this host runs a Slurm with system.slice/slurmstepd.scope")
    proc_cgroup = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = any(not line.startswith("0::") for line in proc_cgroup)
    env = {**hooks.env}
    del env["FABRIC_CGROUP_ROOT"], env["FABRIC_PROC_ROOT"]
    hooks.env = env

    result = hooks.run(PROLOG, SLURMD_NODENAME="hooks-none")

    assert result.returncode == 0
    assert "qos" not in hooks.document()
    assert f"scope {mount}/system.slice/hooks-none_slurmstepd.scope and " in result.stderr
    assert ("hybrid or cgroup v1" in result.stderr) == v1
