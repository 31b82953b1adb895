"""The job directory: job files parsed strictly, hostile ones set aside alone, leases
that run out, and a directory others may write not trusted."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from agent.node.jobs import (
    JOB_FILE_LIMIT,
    JobDirectory,
    JobFileError,
    parse_job,
)
from tests.node.jobfiles import job_document, qos, write_job


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs"
    directory.mkdir(mode=0o755)
    return directory


def parse(document: object, name: str = "slurm-job-7.json") -> None:
    parse_job(Path("/run/jobs") / name, json.dumps(document).encode(), 0.0)


def test_a_job_file_gives_user_gpus_lease_and_class(job_dir: Path) -> None:
    write_job(job_dir, "42", gpus=["0", "GPU-8c3b0e5e-0d7a-4a0e-9f5b-1a2b3c4d5e6f"],
              qos=qos("system.slice/n1_slurmstepd.scope/job_42"))  # fmt: skip
    (job,) = JobDirectory(job_dir).refresh()

    assert (job.name, job.user, job.scheduler) == ("slurm-job-42", "alice", "slurm")
    assert job.gpus == ("0", "GPU-8c3b0e5e-0d7a-4a0e-9f5b-1a2b3c4d5e6f")
    assert job.qos is not None and job.qos.cgroup == "system.slice/n1_slurmstepd.scope/job_42"
    assert job.assignment()["spec"] == {
        "policy": "node",
        "className": "collectives",
        "match": [{"cgroup": "system.slice/n1_slurmstepd.scope/job_42"}],
    }


@pytest.mark.parametrize(
    ("document", "name", "field"),
    [
        (job_document("7", version=2), "slurm-job-7.json", "version"),
        (job_document("7", scheduler="pbs"), "slurm-job-7.json", "scheduler"),
        (job_document("8"), "slurm-job-7.json", "job_id"),
        (job_document("7", expires_at="tomorrow"), "slurm-job-7.json", "expires_at"),
        (job_document("7", expires_at=float("inf")), "slurm-job-7.json", "expires_at"),
        (job_document("7", expires_at=True), "slurm-job-7.json", "expires_at"),
        (job_document("7", user="a\nb"), "slurm-job-7.json", "user"),
        (job_document("7", user="x" * 65), "slurm-job-7.json", "user"),
        (job_document("7", gpus="0,1"), "slurm-job-7.json", "gpus"),
        (job_document("7", gpus=["0", "../../etc"]), "slurm-job-7.json", "gpus[1]"),
        (job_document("7", gpus=[str(i) for i in range(65)]), "slurm-job-7.json", "gpus"),
        (job_document("7", extra=1), "slurm-job-7.json", "extra"),
        (
            job_document("7", qos={"policy": "node", "cgroup": "a"}),
            "slurm-job-7.json",
            "qos.className",
        ),
        (job_document("7", qos={**qos("a"), "x": 1}), "slurm-job-7.json", "qos.x"),
        (job_document("7", qos=qos("../../escape")), "slurm-job-7.json", "qos.cgroup"),
        (job_document("7", qos=qos("a", policy="Bad Name")), "slurm-job-7.json", "qos.policy"),
    ],
)
def test_a_bad_field_is_named(document: object, name: str, field: str) -> None:
    with pytest.raises(JobFileError) as raised:
        parse(document, name)
    assert raised.value.field == field
    assert "/run/jobs/slurm-job-7.json" in str(raised.value)


@pytest.mark.parametrize("data", [b"{", b"[]", b"\xff\xfe", b"null"])
def test_what_is_not_a_json_object_is_refused(data: bytes) -> None:
    with pytest.raises(JobFileError):
        parse_job(Path("slurm-job-1.json"), data, 0.0)


def test_one_bad_file_is_set_aside_and_the_other_jobs_stand(
    job_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_job(job_dir, "1")
    write_job(job_dir, "2", gpus="not a list")
    (job_dir / "slurm-job-3.json").write_bytes(b"x" * (JOB_FILE_LIMIT + 1))
    os.mkfifo(job_dir / "slurm-job-4.json")
    (job_dir / "slurm-job-5.json").symlink_to("/etc/passwd")

    with caplog.at_level(logging.ERROR):
        jobs = JobDirectory(job_dir, clock=settled).refresh()

    assert [job.job_id for job in jobs] == ["1"]
    left = sorted(p.name for p in job_dir.iterdir())
    assert left[0] == "slurm-job-1.json"
    assert sum(".corrupt-" in name for name in left) == 4
    assert "gpus: a str, not a list" in caplog.text


def settled() -> float:
    """A clock past the files' settle time."""
    return time.time() + 2


def test_a_file_caught_while_written_is_not_set_aside_and_is_taken_once_complete(
    job_dir: Path,
) -> None:
    path = job_dir / "slurm-job-6.json"
    path.write_text('{"version": 1, "sched')  # a writer that does not rename into place
    jobs = JobDirectory(job_dir)
    assert jobs.refresh() == () and path.exists()
    path.write_text(json.dumps(job_document("6")))
    assert [job.job_id for job in jobs.refresh()] == ["6"]


def test_files_of_other_names_and_dotfiles_are_ignored(job_dir: Path) -> None:
    write_job(job_dir, "1")
    (job_dir / ".slurm-job-2.json.77.tmp").write_text("{half")
    (job_dir / "notes.txt").write_text("x")
    assert [job.job_id for job in JobDirectory(job_dir).refresh()] == ["1"]
    assert (job_dir / ".slurm-job-2.json.77.tmp").exists()


def test_a_lease_that_ran_out_drops_the_job_and_its_file(
    job_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_job(job_dir, "9", expires_at=time.time() + 60)
    now = [time.time()]
    jobs = JobDirectory(job_dir, clock=lambda: now[0])
    assert len(jobs.refresh()) == 1

    now[0] += 61
    with caplog.at_level(logging.WARNING):
        assert jobs.refresh() == ()
    assert not path.exists() and jobs.expired == 1
    assert "slurm-job-9: its lease ran out" in caplog.text


def test_a_directory_others_may_write_is_not_read(
    job_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_job(job_dir, "1")
    job_dir.chmod(0o777)
    jobs = JobDirectory(job_dir)
    with caplog.at_level(logging.ERROR):
        assert jobs.refresh() == ()
        jobs.refresh()
    assert caplog.text.count("may be written by others than root") == 1
    job_dir.chmod(0o755)
    assert len(jobs.refresh()) == 1


def test_a_file_of_another_owner_is_not_trusted(job_dir: Path) -> None:
    path = write_job(job_dir, "1")
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file another owner")
    os.chown(path, 12345, 12345)
    assert JobDirectory(job_dir, owners=(0,)).refresh() == ()


def test_a_missing_directory_is_no_jobs(tmp_path: Path) -> None:
    jobs = JobDirectory(tmp_path / "absent")
    assert jobs.refresh() == () and jobs.problem is None


def test_an_unchanged_file_is_not_parsed_again(job_dir: Path) -> None:
    write_job(job_dir, "1")
    jobs = JobDirectory(job_dir)
    first = jobs.refresh()
    assert jobs.refresh()[0] is first[0]
    write_job(job_dir, "1", user="bob")
    assert jobs.refresh()[0].user == "bob"


def test_renew_rewrites_the_expiry(job_dir: Path) -> None:
    path = write_job(job_dir, "1")
    jobs = JobDirectory(job_dir)
    (job,) = jobs.refresh()
    renewed = jobs.renew(job, job.expires_at + 7200)
    assert json.loads(path.read_text())["expires_at"] == renewed.expires_at
    assert jobs.refresh()[0].expires_at == renewed.expires_at
