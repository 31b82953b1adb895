"""Jobs' classes from the job files of the Slurm hooks, through the reconciler on the
fake kernel: pending until the cgroup appears, gone with the file, listed as slurm,
ended or renewed through the API, and taken at start by an agent that was down when
the prolog ran."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.node.cgroups import HYBRID
from agent.node.jobs import JobDirectory
from agent.node.qos.api_objects import (
    ENFORCED,
    FAILED,
    ORIGIN_FLEET,
    PENDING,
    RefusedError,
)
from agent.node.qos.reconciler import Reconciler
from tests.node.jobfiles import qos, write_job
from tests.node.qos import DEVICE, assignment, fake_settings
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write

SCOPE = "system.slice/n1_slurmstepd.scope"


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    return tmp_path / "jobs"


@pytest.fixture
def node(kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path, job_dir: Path) -> Reconciler:
    """A reconciler with the policy `node` (class collectives) on DEVICE, a job
    directory, and the Slurm scope in its cgroup tree."""
    write(dirs[0], DEVICE)
    (cgroups / SCOPE).mkdir(parents=True)
    settings = replace(fake_settings(dirs, cgroups), job_dir=job_dir)
    return Reconciler(settings, kernel)


def nft_table(kernel: FakeKernel) -> str:
    return json.dumps(kernel.read_nft_table())


def states(reconciler: Reconciler) -> dict[str, tuple[str, str, str]]:
    return {v.name: (v.source, v.state, v.message) for v in reconciler.policies()}


def test_a_job_is_pending_until_its_cgroup_appears_and_ends_with_its_file(
    node: Reconciler, kernel: FakeKernel, job_dir: Path, cgroups: Path
) -> None:
    cgroup = f"{SCOPE}/job_42"
    path = write_job(job_dir, "42", qos=qos(cgroup))
    node.reconcile()
    source, state, message = states(node)["slurm-job-42"]
    assert (source, state, message) == ("slurm", PENDING, f"waiting for cgroup {cgroup}")
    assert node.waiting_cgroups == {cgroups / cgroup}

    (cgroups / cgroup).mkdir()
    node.reconcile()
    assert states(node)["slurm-job-42"][1] == ENFORCED
    assert cgroup in nft_table(kernel)
    assert node.waiting_cgroups == frozenset()
    assert node.policy_counts[("slurm", ENFORCED)] == 1

    path.unlink()  # the epilog
    node.reconcile()
    assert "slurm-job-42" not in states(node)
    assert cgroup not in nft_table(kernel)


def test_an_agent_started_after_the_prolog_enforces_the_job_in_its_first_pass(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path, job_dir: Path
) -> None:
    write(dirs[0], DEVICE)
    cgroup = f"{SCOPE}/job_7"
    (cgroups / cgroup).mkdir(parents=True)
    write_job(job_dir, "7", qos=qos(cgroup))  # while no agent runs

    started = Reconciler(replace(fake_settings(dirs, cgroups), job_dir=job_dir), kernel)
    started.reconcile()

    assert states(started)["slurm-job-7"][1] == ENFORCED
    assert cgroup in nft_table(kernel)


def test_a_job_without_a_class_is_no_assignment(node: Reconciler, job_dir: Path) -> None:
    write_job(job_dir, "5", gpus=["0"])
    node.reconcile()
    assert "slurm-job-5" not in states(node)
    assert node.jobs is not None and [j.job_id for j in node.jobs.jobs()] == ["5"]


def test_the_api_may_end_a_job_assignment_by_removing_its_file(
    node: Reconciler, kernel: FakeKernel, job_dir: Path, cgroups: Path
) -> None:
    cgroup = f"{SCOPE}/job_3"
    (cgroups / cgroup).mkdir()
    path = write_job(job_dir, "3", qos=qos(cgroup))
    node.reconcile()

    with pytest.raises(RefusedError, match="Slurm job's assignment"):
        node.delete_object("slurm-job-3", origin=ORIGIN_FLEET)
    with pytest.raises(RefusedError, match="Slurm job's assignment"):
        node.apply_object(assignment("slurm-job-3", cgroup))
    assert path.exists()

    node.delete_object("slurm-job-3")
    assert not path.exists()
    assert cgroup not in nft_table(kernel)


def test_renewing_a_job_assignment_rewrites_its_expiry(node: Reconciler, job_dir: Path) -> None:
    path = write_job(job_dir, "3", qos=qos(f"{SCOPE}/job_3"), expires_at=time.time() + 60)
    node.reconcile()
    view = node.renew_lease("slurm-job-3", 7200)
    assert view.expires_at is not None and view.expires_at > time.time() + 7000
    assert json.loads(path.read_text())["expires_at"] == pytest.approx(view.expires_at)


def test_a_job_whose_lease_ran_out_loses_its_class(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path, job_dir: Path
) -> None:
    write(dirs[0], DEVICE)
    cgroup = f"{SCOPE}/job_8"
    (cgroups / cgroup).mkdir(parents=True)
    path = write_job(job_dir, "8", qos=qos(cgroup), expires_at=time.time() + 30)
    now = [time.time()]
    jobs = JobDirectory(job_dir, clock=lambda: now[0])
    node = Reconciler(replace(fake_settings(dirs, cgroups), job_dir=job_dir), kernel, jobs=jobs)
    node.reconcile()
    assert cgroup in nft_table(kernel)

    now[0] += 31
    node.reconcile()
    assert cgroup not in nft_table(kernel) and not path.exists()


def test_an_api_object_of_the_same_name_wins_and_the_job_says_so(
    node: Reconciler, job_dir: Path, cgroups: Path
) -> None:
    (cgroups / f"{SCOPE}/job_4").mkdir()
    node.reconcile()
    node.apply_object(assignment("slurm-job-4", f"{SCOPE}/job_4"), ttl_s=600)
    write_job(job_dir, "4", qos=qos(f"{SCOPE}/job_4"))
    node.reconcile()
    listed = [(v.source, v.state) for v in node.policies() if v.name == "slurm-job-4"]
    assert ("api", ENFORCED) in listed
    assert ("slurm", FAILED) in listed


def test_jobs_that_cannot_get_a_cgroup_on_a_hybrid_host_say_why_once(
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    cgroups: Path,
    job_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(dirs[0], DEVICE)
    settings = replace(fake_settings(dirs, cgroups), job_dir=job_dir, cgroup_layout=HYBRID)
    node = Reconciler(settings, kernel)
    for job in ("1", "2"):
        write_job(job_dir, job, qos=qos(f"{SCOPE}/job_{job}"))
    with caplog.at_level(logging.ERROR):
        node.reconcile()
        node.reconcile()

    _, state, message = states(node)["slurm-job-1"]
    assert state == PENDING
    assert "no Slurm cgroup v2 scope" in message and "this host is hybrid" in message
    assert caplog.text.count("Slurm jobs cannot be classified") == 1


def test_each_pass_tells_the_watcher(node: Reconciler) -> None:
    called: list[int] = []
    node.after_pass.append(lambda: called.append(1))
    node.reconcile()
    node.reconcile()
    assert called == [1, 1]
