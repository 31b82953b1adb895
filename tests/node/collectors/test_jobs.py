"""The jobs collector: jobs from a real job directory, their GPUs matched against the
simulated 8-GPU node's, exported as their own series."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.aggregator import limits
from agent.node.collectors.base import SummaryClock, Tick
from agent.node.collectors.jobs import (
    JOBS,
    SUMMARY_MAX_JOBS,
    JobSample,
    JobsCollector,
    JobSummarizer,
    attribute,
    gpu_names,
)
from agent.node.config import AgentConfig
from agent.node.exporter import ExpositionCache
from agent.node.jobs import JobDirectory
from agent.node.nvml import GpuInfo
from agent.node.runtime import Agent
from agent.node.sampler import Sampler
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from tests.conftest import simulated_sampler
from tests.fakenvml import FakeNvml

# GPUs 2 and 3 of the simulated node (tests/fakenvml/scenarios/hgx-h200-8gpu.json).
UUID_2 = "GPU-06c45d18-8009-454f-46c4-45f7811f6491"
UUID_3 = "GPU-f88bb8a8-724c-81ec-b88b-5c65d743bb94"
FAR = 4102444800  # 2100-01-01


def write_job(directory: Path, job_id: str, gpus: list[str], user: str = "alice") -> Path:
    path = directory / f"slurm-job-{job_id}.json"
    document = {
        "version": 1,
        "scheduler": "slurm",
        "job_id": job_id,
        "user": user,
        "gpus": gpus,
        "expires_at": FAR,
    }
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs"
    directory.mkdir(mode=0o755)
    return directory


@pytest.fixture
def node(fakenvml: FakeNvml, tmp_path: Path, job_dir: Path) -> Iterator[Sampler]:
    with simulated_sampler(fakenvml, tmp_path, "node", job_dir) as sampler:
        yield sampler


def scrape(sampler: Sampler, fakenvml: FakeNvml) -> list[str]:
    """The series lines (values dropped) of one tick's exposition."""
    body = ExpositionCache(sampler.collectors).update(sampler.sample(fakenvml.tick())).body
    return [
        line.rsplit(" ", 1)[0] for line in body.decode().splitlines() if not line.startswith("#")
    ]


def job_info(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("fabric_gpu_job_info{")]


def test_a_jobs_gpus_appear_by_index_and_go_with_its_file(
    node: Sampler, fakenvml: FakeNvml, job_dir: Path
) -> None:
    path = write_job(job_dir, "42", ["0", "1"])

    present = job_info(scrape(node, fakenvml))
    path.unlink()
    after = scrape(node, fakenvml)

    assert present == [
        'fabric_gpu_job_info{gpu="0",job_id="42",scheduler="slurm",user="alice",'
        'uuid="GPU-e220a839-7b1d-cdaf-a220-5ef5e89be831"}',
        'fabric_gpu_job_info{gpu="1",job_id="42",scheduler="slurm",user="alice",'
        'uuid="GPU-6e789e6a-a1b9-65f4-2e78-2ee99573588c"}',
    ]
    assert job_info(after) == []
    assert 'fabric_jobs{scheduler="slurm"}' in after


def test_gpus_named_by_uuid_match_their_index_and_one_gpu_holds_two_jobs(
    node: Sampler, fakenvml: FakeNvml, job_dir: Path
) -> None:
    write_job(job_dir, "7", [UUID_2, UUID_3.upper()], user="bob")
    write_job(job_dir, "8", ["03"], user="carol")

    snapshot = node.sample(fakenvml.tick())

    jobs = {sample.job_id: sample for sample in snapshot.samples(JOBS)}
    assert jobs["7"].gpu_indices == (2, 3)
    assert jobs["7"].gpu_uuids == (UUID_2, UUID_3)
    assert jobs["8"].gpu_indices == (3,)
    assert jobs["8"].unmatched_gpus == ()


def test_an_entry_naming_no_gpu_here_is_left_out_counted_and_logged_once(
    node: Sampler, fakenvml: FakeNvml, job_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_job(job_dir, "42", ["1", "9", "MIG-4f1b0c2e-1111-2222-3333-444455556666"])
    caplog.set_level(logging.WARNING, logger="agent.node.collectors.jobs")

    lines = [scrape(node, fakenvml) for _ in range(3)][-1]

    assert [line for line in job_info(lines)] == [
        'fabric_gpu_job_info{gpu="1",job_id="42",scheduler="slurm",user="alice",'
        'uuid="GPU-6e789e6a-a1b9-65f4-2e78-2ee99573588c"}'
    ]
    warnings = [r.getMessage() for r in caplog.records if "slurm-job-42" in r.getMessage()]
    assert len(warnings) == 1
    assert "9, MIG-4f1b0c2e" in warnings[0]
    body = ExpositionCache(node.collectors).update(node.sample(fakenvml.tick())).body.decode()
    values = {
        (s.name, s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert values["fabric_job_gpus_unmatched", "mig"] == 1
    assert values["fabric_job_gpus_unmatched", "unknown"] == 1
    assert values["fabric_jobs", None] == 1


def test_no_other_gpu_series_gains_a_label_from_jobs(
    fakenvml: FakeNvml, tmp_path: Path, job_dir: Path
) -> None:
    def gpu_label_sets(lines: list[str]) -> set[tuple[str, frozenset[str]]]:
        found = set()
        for line in lines:
            match = re.match(r"^(fabric_gpu_\w+)\{(.*)\}$", line)
            if match and match.group(1) != "fabric_gpu_job_info":
                names = frozenset(re.findall(r'(\w+)="', match.group(2)))
                found.add((match.group(1), names))
        return found

    with simulated_sampler(fakenvml, tmp_path, "node", job_dir) as sampler:
        without = scrape(sampler, fakenvml)
        write_job(job_dir, "42", ["0", "1", "2", "3"])
        write_job(job_dir, "43", ["4", "5", "6", "7"], user="bob")
        with_jobs = scrape(sampler, fakenvml)

    assert len(job_info(with_jobs)) == 8
    assert gpu_label_sets(with_jobs) == gpu_label_sets(without)
    assert (
        len([line for line in with_jobs if line.startswith("fabric_gpu_")])
        == len([line for line in without if line.startswith("fabric_gpu_")]) + 8
    )


def test_without_the_nodes_gpus_jobs_are_listed_and_nothing_is_attributed(
    job_dir: Path,
) -> None:
    write_job(job_dir, "42", ["0"])
    collector = JobsCollector(JobDirectory(job_dir), lambda: None)

    (sample,) = JOBS.select(collector.collect(Tick(1, 0.0, 0.0)))

    assert sample.gpus == ("0",)
    assert (sample.gpu_indices, sample.unmatched_gpus) == ((), ())


def test_an_untrusted_job_directory_fails_the_collector_saying_why(job_dir: Path) -> None:
    job_dir.chmod(0o777)
    collector = JobsCollector(JobDirectory(job_dir), lambda: None)

    with pytest.raises(Exception, match="may be written by others"):
        collector.collect(Tick(1, 0.0, 0.0))


def test_attribute_matches_each_gpu_once() -> None:
    gpus = [GpuInfo(i, "H200", f"GPU-{i:08x}", "", "", 18, True) for i in range(2)]

    matched, unmatched = attribute(["1", "GPU-00000001", "0", "5"], gpu_names(gpus))

    assert [gpu.index for gpu in matched] == [1, 0]
    assert unmatched == ["5"]


def test_the_summary_carries_at_most_the_aggregators_limit_of_jobs() -> None:
    samples = tuple(
        JobSample("slurm", str(n), "alice", ("0",), FAR, (0,), ("GPU-0",)) for n in range(70)
    )
    summary = NodeSummary()

    JobSummarizer().summarize(samples, summary, SummaryClock(0.0, 1.0))

    assert SUMMARY_MAX_JOBS == limits.MAX_JOBS
    assert len(summary.jobs) == SUMMARY_MAX_JOBS
    assert summary.jobs_left_out == 70 - SUMMARY_MAX_JOBS
    assert summary.jobs[0].gpu_uuids == ["GPU-0"]
    assert summary.jobs[0].expires_at.seconds == FAR
    limits.check_summary(summary)


def test_the_agents_reconciler_and_jobs_collector_share_one_job_directory(
    tmp_path: Path, job_dir: Path
) -> None:
    write_job(job_dir, "42", [])
    config = AgentConfig(
        collectors=("jobs",),
        state_dir=tmp_path / "state",
        policy_dir=tmp_path / "policies",
        job_dir=job_dir,
    )
    agent = Agent(config)
    try:
        # A tick, no reconcile pass: the reconciler sees what the collector read.
        agent.sampler.sample()
        assert agent.reconciler.jobs is not None
        assert [job.job_id for job in agent.reconciler.jobs.jobs()] == ["42"]
    finally:
        agent.close()
