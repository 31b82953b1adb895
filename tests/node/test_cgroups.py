"""What an assignment waiting for a Slurm job's cgroup says on hosts where that cgroup
cannot appear."""

from __future__ import annotations

from pathlib import Path

from agent.node.cgroups import (
    HYBRID,
    LEGACY,
    NONE,
    UNIFIED,
    cgroup_layout,
    slurm_scope_problem,
    waiting_reason,
)

CGROUP2 = "35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
UNIFIED_MOUNT = "36 25 0:30 / /sys/fs/cgroup/unified rw shared:9 - cgroup2 cgroup2 rw\n"
V1 = "37 25 0:31 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n"
PROC = "22 1 0:5 / /proc rw - proc proc rw\n"


def layout_of(tmp_path: Path, text: str) -> str:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    return cgroup_layout(mountinfo)


def test_the_layout_comes_from_the_mount_table(tmp_path: Path) -> None:
    assert layout_of(tmp_path, PROC + CGROUP2) == UNIFIED
    assert layout_of(tmp_path, PROC + UNIFIED_MOUNT + V1) == HYBRID
    assert layout_of(tmp_path, PROC + V1) == LEGACY
    assert layout_of(tmp_path, PROC) == NONE
    assert cgroup_layout(tmp_path / "absent") == NONE


def test_a_hybrid_host_without_a_slurm_scope_says_why(tmp_path: Path) -> None:
    (tmp_path / "system.slice").mkdir()
    problem = slurm_scope_problem(tmp_path, "system.slice/n1_slurmstepd.scope/job_5", HYBRID)
    assert problem is not None
    assert "no Slurm cgroup v2 scope system.slice/n1_slurmstepd.scope" in problem
    assert "this host is hybrid" in problem and "refuses hybrid hosts" in problem
    assert "systemd.unified_cgroup_hierarchy=1" in problem


def test_a_scope_of_another_name_points_at_the_template(tmp_path: Path) -> None:
    (tmp_path / "system.slice/n1_slurmstepd.scope").mkdir(parents=True)
    problem = slurm_scope_problem(tmp_path, "system.slice/slurmstepd.scope/job_5", UNIFIED)
    assert problem is not None
    assert "slurmd made system.slice/n1_slurmstepd.scope" in problem
    assert "template" in problem


def test_a_unified_host_without_the_scope_names_the_plugin(tmp_path: Path) -> None:
    problem = slurm_scope_problem(tmp_path, "system.slice/slurmstepd.scope/job_5", UNIFIED)
    assert problem is not None and "CgroupPlugin=cgroup/v2" in problem


def test_a_job_waiting_in_an_existing_scope_just_waits(tmp_path: Path) -> None:
    (tmp_path / "system.slice/slurmstepd.scope").mkdir(parents=True)
    cgroup = "system.slice/slurmstepd.scope/job_5"
    assert slurm_scope_problem(tmp_path, cgroup, HYBRID) is None
    assert waiting_reason(tmp_path, [cgroup], HYBRID) == f"waiting for cgroup {cgroup}"
    # Not Slurm's: nothing to explain.
    assert slurm_scope_problem(tmp_path, "kubepods.slice/pod1", HYBRID) is None


def test_no_cgroup2_mount_says_so() -> None:
    problem = slurm_scope_problem(None, "system.slice/slurmstepd.scope/job_5", LEGACY)
    assert problem is not None and "no cgroup2 file system is mounted" in problem
