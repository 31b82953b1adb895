"""The test cluster runs real jobs, and the facts about Slurm 22.05 the product relies on:
where a job's processes sit in cgroup v2, what a Prolog gets (environment, no PATH, no job
cgroup yet), where its output goes, and that a failing Prolog drains the node."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import NODE_NAME, PARTITION, SlurmCluster, cgroup2_mount, is_hybrid


def hook(path: Path, body: str) -> Path:
    """An executable /bin/sh script; Slurm runs it with no PATH, so commands are absolute."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def read_env(path: Path) -> dict[str, str]:
    """`env -0` output as a dictionary."""
    pairs = (entry.split("=", 1) for entry in path.read_text().split("\0") if entry)
    return {key: value for key, value in pairs}


def wait_for_file(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout_s}s"
        time.sleep(0.05)


def unified_line(text: str) -> str:
    """The cgroup2 path in a /proc/<pid>/cgroup text."""
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def test_the_cgroup2_mount_and_a_hybrid_host_are_recognised(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n"
        "32 30 0:28 / /sys/fs/cgroup/memory rw shared:6 - cgroup cgroup rw,memory\n"
    )
    hybrid, unified = tmp_path / "hybrid", tmp_path / "unified"
    hybrid.write_text("4:memory:/x\n0::/\n")
    unified.write_text("0::/user.slice\n")

    assert cgroup2_mount(mountinfo) == Path("/sys/fs/cgroup/unified")
    assert is_hybrid(hybrid)
    assert not is_hybrid(unified)


def test_a_batch_job_runs_in_its_job_cgroup(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "cgroup"
    job_id = slurm.submit(f"/bin/cat /proc/self/cgroup > {out}\n/usr/bin/env -0 > {out}.env\n")

    slurm.wait_job_state(job_id, "COMPLETED")

    assert slurm.job_cgroup(job_id) == f"system.slice/{NODE_NAME}_slurmstepd.scope/job_{job_id}"
    assert unified_line(out.read_text()) == (
        f"/system.slice/{NODE_NAME}_slurmstepd.scope/job_{job_id}/step_batch/user/task_special"
    )
    # The job has none of the test scaffolding: no preload, the host's own view of cgroups
    # (on a hybrid host, the v1 lines the preload hides from slurmd).
    assert "LD_PRELOAD" not in read_env(Path(f"{out}.env"))
    host_lines = len(Path("/proc/self/cgroup").read_text().splitlines())
    assert len(out.read_text().splitlines()) == host_lines


def test_srun_runs_a_step_in_the_job_cgroup(slurm: SlurmCluster) -> None:
    output = slurm.run("srun", "--time=1", "--gres=gpu:1", "/bin/sh", "-c",
                       'echo "$SLURM_JOB_ID $CUDA_VISIBLE_DEVICES"; /bin/cat /proc/self/cgroup',
                       timeout_s=60)  # fmt: skip

    first, _, cgroups = output.partition("\n")
    job_id, gpus = first.split(" ")
    assert gpus == "0"
    # task_special, not task_0: no Constrain* option is on, so task/cgroup leaves the
    # tasks where slurmstepd started them. Everything of the job is under job_<id>.
    assert unified_line(cgroups) == (
        f"/system.slice/{NODE_NAME}_slurmstepd.scope/job_{job_id}/step_0/user/task_special"
    )


@pytest.mark.skipif(not is_hybrid(), reason="the preload exists for hybrid cgroup hosts only")
def test_slurmstepd_has_the_preload_and_the_job_does_not(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    job_id = slurm.submit(f"/usr/bin/touch {started}\nexec /bin/sleep 60\n")
    wait_for_file(started)
    job_cgroup = slurm.job_cgroup_path(job_id)

    stepd_pids = (job_cgroup / "step_batch" / "slurm" / "cgroup.procs").read_text().split()
    task_pids = (job_cgroup / "step_batch" / "user" / "task_special" / "cgroup.procs").read_text()

    assert stepd_pids
    for pid in stepd_pids:
        assert "slurmstepd" in os.readlink(f"/proc/{pid}/exe")  # Debian: slurmstepd-wlm
        assert "cgroup_v2_only.so" in Path(f"/proc/{pid}/maps").read_text()
    for pid in task_pids.split():
        assert "cgroup_v2_only.so" not in Path(f"/proc/{pid}/maps").read_text()
        assert b"LD_PRELOAD=" not in Path(f"/proc/{pid}/environ").read_bytes()


def test_the_prolog_gets_the_job_but_no_path_and_no_time_limit(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    env_file = tmp_path / "prolog.env"
    prolog = hook(tmp_path / "prolog", f"/usr/bin/env -0 > {env_file}\n")

    with slurm.hooks(prolog=prolog):
        job_id = slurm.submit("exit 0\n", time_limit="7", gres="gpu:2")
        slurm.wait_job_state(job_id, "COMPLETED")

    env = read_env(env_file)
    assert "PATH" not in env
    assert "LD_PRELOAD" not in env
    assert env["SLURM_JOB_ID"] == job_id
    assert env["SLURM_SCRIPT_CONTEXT"] == "prolog_slurmd"
    assert env["SLURMD_NODENAME"] == NODE_NAME
    assert env["SLURM_JOB_USER"] == "root"
    assert env["SLURM_JOB_PARTITION"] == PARTITION
    assert env["SLURM_JOB_GPUS"] == "0,1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["SLURM_CONF"] == str(slurm.conf)
    # 22.05 hands the prolog neither the time limit nor an end time: the hook asks Slurm.
    assert "SLURM_JOB_END_TIME" not in env
    assert not [key for key in env if "TIME" in key or "LIMIT" in key]


def test_the_prolog_can_ask_slurm_for_the_time_limit(slurm: SlurmCluster, tmp_path: Path) -> None:
    answer = tmp_path / "limit"
    squeue = hook(tmp_path / "prolog", f'/usr/bin/squeue -h -j "$SLURM_JOB_ID" -o %l > {answer}\n')

    with slurm.hooks(prolog=squeue):
        job_id = slurm.submit("exit 0\n", time_limit="1:30:00")
        slurm.wait_job_state(job_id, "COMPLETED")

    assert answer.read_text().strip() == "1:30:00"


def test_the_job_cgroup_appears_after_the_prolog(slurm: SlurmCluster, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    scope = slurm.scope
    prolog = hook(
        tmp_path / "prolog",
        f'if [ -e {scope}/job_"$SLURM_JOB_ID" ]; then echo present; else echo absent; fi'
        f" > {seen}.prolog\n",
    )

    with slurm.hooks(prolog=prolog):
        job_id = slurm.submit(
            f'if [ -e {scope}/job_"$SLURM_JOB_ID" ]; then echo present; else echo absent; fi'
            f" > {seen}.job\n"
        )
        slurm.wait_job_state(job_id, "COMPLETED")

    assert Path(f"{seen}.prolog").read_text().strip() == "absent"
    assert Path(f"{seen}.job").read_text().strip() == "present"


def test_slurmd_logs_the_prologs_output(slurm: SlurmCluster, tmp_path: Path) -> None:
    prolog = hook(tmp_path / "prolog", 'echo "to stderr $SLURM_JOB_ID" >&2\necho to stdout\n')
    offset = slurm.log_offset(slurm.slurmd_log)

    with slurm.hooks(prolog=prolog):
        job_id = slurm.submit("exit 0\n")
        slurm.wait_job_state(job_id, "COMPLETED")

    # At SlurmdDebug=debug2 and above, stdout and stderr together, after the exit code.
    log = slurm.log_since(slurm.slurmd_log, offset)
    assert f"prolog success rc:0 output:to stderr {job_id}\nto stdout" in log


def test_a_failing_prolog_drains_the_node_until_resumed(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    prolog = hook(tmp_path / "prolog", 'echo "refusing $SLURM_JOB_ID" >&2\nexit 3\n')
    offset = slurm.log_offset(slurm.slurmd_log)

    with slurm.hooks(prolog=prolog):
        job_id = slurm.submit("exit 0\n")
        job = slurm.wait_job(
            job_id,
            lambda job: (
                job.state == "PENDING" and job.fields.get("Reason") == "launch_failed_requeued_held"
            ),
            "held after a failed launch",
        )

    assert "DRAIN" in slurm.node_state()
    assert job.fields["Restarts"] == "1"
    assert f"refusing {job_id}" in slurm.log_since(slurm.slurmd_log, offset)
    slurm.run("scancel", job_id)
    slurm.wait_no_jobs()
    slurm.resume()
    assert slurm.node_state() == "IDLE"


def test_the_epilog_runs_after_the_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    ran = tmp_path / "epilog.env"
    epilog = hook(tmp_path / "epilog", f"/usr/bin/env -0 > {ran}\n")

    with slurm.hooks(epilog=epilog):
        job_id = slurm.submit("exit 0\n", gres="gpu:1")
        slurm.wait_job_state(job_id, "COMPLETED")
        slurm.wait_no_jobs()

    env = read_env(ran)
    assert env["SLURM_JOB_ID"] == job_id
    assert env["SLURM_SCRIPT_CONTEXT"] == "epilog_slurmd"
    assert env["SLURM_JOB_GPUS"] == "0"


def test_reset_returns_a_drained_busy_node_to_idle(slurm: SlurmCluster, tmp_path: Path) -> None:
    failing = hook(tmp_path / "prolog", "exit 1\n")
    slurm.set_hooks(prolog=failing)
    held = slurm.submit("exit 0\n")
    slurm.wait_job(held, lambda job: "held" in job.fields.get("Reason", ""), "held")
    slurm.set_hooks()
    slurm.run("scontrol", "update", f"nodename={NODE_NAME}", "state=resume")
    slurm.wait_node_idle()
    running = slurm.submit("exec /bin/sleep 300\n")
    slurm.wait_job_state(running, "RUNNING")
    slurm.set_hooks(prolog=failing)
    slurm.run("scontrol", "update", f"nodename={NODE_NAME}", "state=drain", "reason=test")

    slurm.reset()

    assert slurm.node_state() == "IDLE"
    assert slurm.job_ids() == []
    assert not (slurm.root / "hooks" / "prolog.target").exists()
