"""The jobs on this node and the GPUs they hold: the `jobs` section, from the job
directory the scheduler's hooks write (agent.node.jobs).

Its source is the job directory, so it is a collector of its own rather than part of
the GPU collector: it reports the jobs on a node without GPUs, and the GPU collector
stays about NVML. It matches each job's GPU entries (indices or UUIDs, as Slurm names
them) against the GPUs of the process's NVML session, if a collector opened one; the
attribution is its own series (`fabric_gpu_job_info`), never labels on the GPU series,
which would multiply them by jobs. An entry that names no GPU of this node (a MIG
instance: the agent does not enumerate MIG devices; a wrong index) is left out, counted
and logged once per job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.node.collectors.base import (
    CollectorContext,
    Section,
    SnapshotField,
    SummaryClock,
    Tick,
    register,
)
from agent.node.errors import CollectorError
from agent.node.families import Family, GaugeFamily
from agent.node.jobs import Job, JobDirectory, shared_job_directory
from agent.node.nvml import NVML_KEY, GpuInfo, NvmlSession
from agent.proto.fabric.aggregator.v1.aggregator_service_pb2 import NodeSummary
from agent.proto.fabric.v1 import telemetry_pb2

log = logging.getLogger(__name__)

# Jobs per fleet summary, the lowest job ids; the rest are counted. The aggregator
# refuses more (agent/aggregator/limits.py MAX_JOBS).
SUMMARY_MAX_JOBS = 64
SCHEDULERS = ("slurm",)


@dataclass(frozen=True, slots=True)
class JobSample:
    """One job on the node at one tick, and the node's GPUs its file names."""

    scheduler: str
    job_id: str
    user: str
    # As the job file names them: indices or GPU-/MIG- UUIDs.
    gpus: tuple[str, ...]
    expires_unix_seconds: float
    # The node's GPUs those entries name (index and UUID of each, in the same order).
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    # Entries naming no GPU of this node; empty while the node's GPUs are unknown.
    unmatched_gpus: tuple[str, ...] = ()


class JobSummarizer:
    """The jobs and their GPUs in the fleet summary, at most SUMMARY_MAX_JOBS."""

    def summarize(
        self, samples: tuple[JobSample, ...], summary: NodeSummary, clock: SummaryClock
    ) -> None:
        for sample in samples[:SUMMARY_MAX_JOBS]:
            job = summary.jobs.add(
                scheduler=sample.scheduler,
                job_id=sample.job_id,
                user=sample.user,
                gpu_indices=sample.gpu_indices,
                gpu_uuids=sample.gpu_uuids,
            )
            job.expires_at.FromNanoseconds(round(sample.expires_unix_seconds * 1e9))
        summary.jobs_left_out = max(len(samples) - SUMMARY_MAX_JOBS, 0)


@dataclass(frozen=True, slots=True)
class JobCountSample:
    """The jobs of one scheduler and their GPU entries naming no GPU of this node, every
    tick: a node without jobs reports 0, not nothing."""

    scheduler: str
    jobs: int
    # Unmatched entries naming a MIG instance, and any other.
    unmatched_mig: int
    unmatched_unknown: int


JOBS = Section(
    "jobs",
    JobSample,
    snapshot_field=SnapshotField("jobs", telemetry_pb2.JobSample),
    summarizer=JobSummarizer,
)
# Counts only: the API and the summary have the jobs themselves.
JOB_COUNTS = Section("job_counts", JobCountSample, exported=False)


def gpu_names(inventory: Sequence[GpuInfo]) -> dict[str, GpuInfo]:
    """The node's GPUs by the names a job file may use: index and (lower-case) UUID."""
    by_name: dict[str, GpuInfo] = {}
    for gpu in inventory:
        by_name[str(gpu.index)] = gpu
        by_name[gpu.uuid.lower()] = gpu
    return by_name


def attribute(
    gpus: Sequence[str], by_name: Mapping[str, GpuInfo]
) -> tuple[list[GpuInfo], list[str]]:
    """The node's GPUs (`gpu_names`) the entries name, each once, and the entries that
    name none."""
    matched: dict[int, GpuInfo] = {}
    unmatched: list[str] = []
    for entry in gpus:
        # "07" is GPU 7; UUIDs are hex, whatever case a tool printed them in.
        key = str(int(entry)) if entry.isdigit() else entry.lower()
        found = by_name.get(key)
        if found is None:
            unmatched.append(entry)
        else:
            matched.setdefault(found.index, found)
    return list(matched.values()), unmatched


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the jobs collector takes from the configuration."""

    job_dir: Path


# The node's GPUs; None while unknown (no GPU collector, NVML not available).
Inventory = Callable[[], Sequence[GpuInfo] | None]


class JobsCollector:
    name = "jobs"
    sections = (JOBS, JOB_COUNTS)

    def __init__(self, directory: JobDirectory, inventory: Inventory) -> None:
        self._directory = directory
        self._inventory = inventory
        # Job name -> the entries last logged as naming no GPU of this node.
        self._reported: dict[str, tuple[str, ...]] = {}

    def collect(self, tick: Tick) -> tuple[JobSample | JobCountSample, ...]:
        # The reconciler refreshes the same directory every pass; a refresh re-reads only
        # files whose inode, size or mtime changed, and `fabric-agent sample` has no
        # reconciler.
        jobs = self._directory.refresh()
        if self._directory.problem is not None:
            raise CollectorError(self._directory.problem)
        inventory = self._inventory()
        by_name = None if inventory is None else gpu_names(inventory)
        samples = tuple(self._sample(job, by_name) for job in jobs)
        self._log_unmatched(samples)
        return (*samples, *counts(samples))

    def _sample(self, job: Job, by_name: Mapping[str, GpuInfo] | None) -> JobSample:
        sample = JobSample(job.scheduler, job.job_id, job.user, job.gpus, job.expires_at)
        if by_name is None or not job.gpus:
            return sample
        matched, unmatched = attribute(job.gpus, by_name)
        return JobSample(
            sample.scheduler,
            sample.job_id,
            sample.user,
            sample.gpus,
            sample.expires_unix_seconds,
            gpu_indices=tuple(gpu.index for gpu in matched),
            gpu_uuids=tuple(gpu.uuid for gpu in matched),
            unmatched_gpus=tuple(unmatched),
        )

    def _log_unmatched(self, samples: Sequence[JobSample]) -> None:
        reported: dict[str, tuple[str, ...]] = {}
        for sample in samples:
            name = f"{sample.scheduler}-job-{sample.job_id}"
            if not sample.unmatched_gpus:
                continue
            reported[name] = sample.unmatched_gpus
            if self._reported.get(name) != sample.unmatched_gpus:
                mig = any(entry.startswith("MIG-") for entry in sample.unmatched_gpus)
                log.warning(
                    "job %s: GPU(s) %s name no GPU of this node (%s): left out of "
                    "fabric_gpu_job_info",
                    name,
                    ", ".join(sample.unmatched_gpus),
                    "MIG instances are not enumerated" if mig else "no such index or UUID",
                )
        self._reported = reported

    def metrics(self, samples: Sequence[JobSample | JobCountSample]) -> Iterable[Family]:
        return render(JOBS.select(samples), JOB_COUNTS.select(samples))

    def close(self) -> None:
        """The job directory is shared; nothing to release."""


def counts(samples: Sequence[JobSample]) -> tuple[JobCountSample, ...]:
    """Each scheduler's jobs and unmatched GPU entries."""
    result = []
    for scheduler in SCHEDULERS:
        mine = [s for s in samples if s.scheduler == scheduler]
        unmatched = [entry for s in mine for entry in s.unmatched_gpus]
        mig = sum(1 for entry in unmatched if entry.startswith("MIG-"))
        result.append(JobCountSample(scheduler, len(mine), mig, len(unmatched) - mig))
    return tuple(result)


def render(samples: Sequence[JobSample], job_counts: Sequence[JobCountSample] = ()) -> list[Family]:
    jobs = GaugeFamily(
        "fabric_jobs", "Jobs on the node, as the job directory has them.", labels=["scheduler"]
    )
    info = GaugeFamily(
        "fabric_gpu_job_info",
        "A job holding the GPU (value 1), one series per GPU and job.",
        labels=["gpu", "uuid", "scheduler", "job_id", "user"],
    )
    unmatched = GaugeFamily(
        "fabric_job_gpus_unmatched",
        "Job GPU entries naming no GPU of this node, left out of fabric_gpu_job_info "
        "(mig: MIG instances are not enumerated).",
        labels=["scheduler", "reason"],
    )
    for s in samples:
        for index, uuid in zip(s.gpu_indices, s.gpu_uuids, strict=True):
            info.add_metric([str(index), uuid, s.scheduler, s.job_id, s.user], 1)
    for count in job_counts:
        jobs.add_metric([count.scheduler], count.jobs)
        unmatched.add_metric([count.scheduler, "mig"], count.unmatched_mig)
        unmatched.add_metric([count.scheduler, "unknown"], count.unmatched_unknown)
    return [jobs, info, unmatched]


def nvml_inventory(context: CollectorContext[JobOptions]) -> Sequence[GpuInfo] | None:
    """The GPUs of the NVML session a GPU or NVLink collector opened; None without one or
    while NVML is not available (that collector reports why)."""
    session = context.shared.find(NVML_KEY)
    if not isinstance(session, NvmlSession):
        return None
    try:
        return session.gpus()
    except CollectorError:
        return None


@register(JobsCollector, options=JobOptions)
def create(context: CollectorContext[JobOptions]) -> JobsCollector:
    directory = shared_job_directory(context.shared, context.options.job_dir)
    return JobsCollector(directory, lambda: nvml_inventory(context))
