"""The jobs running on this node, as the scheduler's hooks announce them.

The Slurm prolog writes one JSON file per job into the job directory
(`/run/fabric-agent/jobs`, the agent's `job_dir`) and the epilog removes it. The hooks
never call the agent: a job whose prolog ran while the agent was down, hung or busy is
known as soon as the agent reads the directory (at start, and whenever it changes), and
no hook waits on the agent. The file says who runs the job, on which GPUs, until when
(its lease: the job's time limit plus a margin, for the epilog that never runs), and
optionally the QoS class its cgroup joins. /run is cleared at boot, like the jobs.

Every file is hostile input: only regular files owned by root (or the agent's user) in a
directory nobody else may write are read, each at most JOB_FILE_LIMIT bytes, at most
MAX_JOB_FILES of them; a file that does not parse is set aside
(`<name>.corrupt-<time>`) and logged, and every other job stands. docs/slurm.md
describes the format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common.errors import FabricError
from agent.common.files import FileTooLarge, NotRegularFile, read_regular, replace_atomically
from agent.common.policy.model import PolicyError, QosAssignment, parse_document

if TYPE_CHECKING:
    from agent.node.collectors.base import SharedResources

log = logging.getLogger(__name__)

JOB_FILE_VERSION = 1
# A job file is a few hundred bytes; the limit leaves room for long names and 64 GPUs.
JOB_FILE_LIMIT = 16 * 1024
# More jobs than a node runs at once (Slurm's default MaxJobCount is 10,000 per
# cluster; a node with oversubscription runs hundreds).
MAX_JOB_FILES = 4096
MAX_GPUS = 64
MAX_USER_CHARS = 64
MAX_LEASE_CHARS = 256
# Job ids are 32-bit in Slurm; 20 digits bound any scheduler's.
JOB_FILE_PATTERN = re.compile(r"^slurm-job-([0-9]{1,20})\.json$")
GPU_PATTERN = re.compile(r"^(?:[0-9]{1,4}|(?:GPU|MIG)-[0-9A-Za-z/-]{1,80})$")
KEYS = {"version", "scheduler", "job_id", "user", "gpus", "expires_at", "lease", "qos"}
QOS_KEYS = {"policy", "className", "cgroup"}
# A file that does not parse is set aside only once it has not changed for this long:
# one caught while a writer that does not rename into place is still writing it is
# read again when it is complete (its close wakes the watcher).
JOB_FILE_SETTLE_S = 1.0
# Files set aside per name kept for the operator; older ones are removed.
KEEP_SET_ASIDE = 3


class JobFileError(FabricError):
    """A job file that cannot be used: which file, which field, why."""

    def __init__(self, path: Path, field: str, reason: str) -> None:
        self.path = path
        self.field = field
        super().__init__(f"{path}: {field}: {reason}" if field else f"{path}: {reason}")


@dataclass(frozen=True)
class JobQos:
    """The class a job's cgroup joins."""

    policy: str
    class_name: str
    cgroup: str


@dataclass(frozen=True)
class Job:
    """One job on this node, as its job file says."""

    scheduler: str
    job_id: str
    path: Path
    expires_at: float
    # When the file was written (its modification time).
    written_at: float
    user: str = ""
    gpus: tuple[str, ...] = ()
    lease: str = ""
    qos: JobQos | None = None

    @property
    def name(self) -> str:
        """The job's QoS assignment name, and its file's stem."""
        return f"{self.scheduler}-job-{self.job_id}"

    def assignment(self) -> dict[str, Any]:
        """The QosAssignment document (YAML names) the job's `qos` amounts to."""
        assert self.qos is not None
        return assignment_document(self.name, self.qos)


def assignment_document(name: str, qos: JobQos) -> dict[str, Any]:
    return {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosAssignment",
        "metadata": {"name": name},
        "spec": {
            "policy": qos.policy,
            "className": qos.class_name,
            "match": [{"cgroup": qos.cgroup}],
        },
    }


def parse_job(path: Path, data: bytes, written_at: float) -> Job:
    """The job in file `path` (its bytes `data`); raises JobFileError naming the field."""
    match = JOB_FILE_PATTERN.match(path.name)
    if match is None:
        raise JobFileError(path, "", "the name is not slurm-job-<id>.json")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobFileError(path, "", f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JobFileError(path, "", f"a {type(document).__name__}, not an object")
    unknown = sorted(set(document) - KEYS)
    if unknown:
        raise JobFileError(path, unknown[0], "unknown field")
    if document.get("version") != JOB_FILE_VERSION:
        reason = f"{document.get('version')!r}; this agent reads version {JOB_FILE_VERSION}"
        raise JobFileError(path, "version", reason)
    if document.get("scheduler") != "slurm":
        raise JobFileError(path, "scheduler", f"{document.get('scheduler')!r}, not 'slurm'")
    job_id = document.get("job_id")
    if job_id != match.group(1):
        raise JobFileError(path, "job_id", f"{job_id!r} is not the file's job {match.group(1)}")
    expires_at = document.get("expires_at")
    if (
        not isinstance(expires_at, int | float)
        or isinstance(expires_at, bool)
        or not math.isfinite(expires_at)
        or expires_at <= 0
    ):
        raise JobFileError(path, "expires_at", f"{expires_at!r} is not a Unix time")
    user = _text(path, document, "user", MAX_USER_CHARS)
    lease = _text(path, document, "lease", MAX_LEASE_CHARS)
    gpus = _gpus(path, document.get("gpus", []))
    qos = _qos(path, f"slurm-job-{job_id}", document.get("qos"))
    return Job("slurm", job_id, path, float(expires_at), written_at, user, gpus, lease, qos)


def _text(path: Path, document: Mapping[str, Any], key: str, limit: int) -> str:
    value = document.get(key, "")
    if not isinstance(value, str):
        raise JobFileError(path, key, f"a {type(value).__name__}, not a string")
    if len(value) > limit:
        raise JobFileError(path, key, f"{len(value)} characters; at most {limit}")
    if not value.isprintable():
        raise JobFileError(path, key, "holds control characters")
    return value


def _gpus(path: Path, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise JobFileError(path, "gpus", f"a {type(value).__name__}, not a list")
    if len(value) > MAX_GPUS:
        raise JobFileError(path, "gpus", f"{len(value)} entries; at most {MAX_GPUS}")
    for index, gpu in enumerate(value):
        if not isinstance(gpu, str) or not GPU_PATTERN.match(gpu):
            reason = f"{gpu!r} is neither a GPU index nor a GPU or MIG UUID"
            raise JobFileError(path, f"gpus[{index}]", reason)
    return tuple(dict.fromkeys(value))


def _qos(path: Path, name: str, value: object) -> JobQos | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise JobFileError(path, "qos", f"a {type(value).__name__}, not an object")
    unknown = sorted(set(value) - QOS_KEYS)
    if unknown:
        raise JobFileError(path, f"qos.{unknown[0]}", "unknown field")
    for key in sorted(QOS_KEYS):
        if not isinstance(value.get(key), str):
            raise JobFileError(path, f"qos.{key}", f"{value.get(key)!r} is not a string")
    qos = JobQos(value["policy"], value["className"], value["cgroup"])
    # The assignment's own validation: names, and a cgroup path that stays in the tree.
    try:
        parse_document(assignment_document(name, qos), str(path))
    except PolicyError as exc:
        problem = exc.violations[0]
        field = {"spec.policy": "qos.policy", "spec.className": "qos.className"}.get(
            problem.path, "qos.cgroup"
        )
        raise JobFileError(path, field, problem.reason) from None
    return qos


def job_model(job: Job) -> QosAssignment:
    model = parse_document(job.assignment(), str(job.path))
    assert isinstance(model, QosAssignment)
    return model


@dataclass(frozen=True)
class _Cached:
    key: tuple[int, int, int]
    job: Job


class JobDirectory:
    """The job directory, re-read when it changes. Thread-safe: the reconciler and the
    collectors read it."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        owners: tuple[int, ...] | None = None,
    ) -> None:
        """`owners`: the user ids whose files are trusted (root and the agent's)."""
        self.directory = directory
        self._clock = clock
        self._owners = owners if owners is not None else tuple({0, os.geteuid()})
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        self._jobs: tuple[Job, ...] = ()
        # What is wrong now (subject -> text), as last logged.
        self._reported: dict[str, str] = {}
        self.expired = 0
        self.set_aside = 0
        self.problem: str | None = None

    def jobs(self) -> tuple[Job, ...]:
        """The jobs as of the last refresh, by job id."""
        return self._jobs

    def refresh(self) -> tuple[Job, ...]:
        """Re-read what changed; drop jobs whose lease ran out (removing their files)."""
        with self._lock:
            problems: dict[str, str] = {}
            jobs = self._read(problems)
            now = self._clock()
            live = []
            for job in jobs:
                if job.expires_at <= now:
                    self._expire(job)
                else:
                    live.append(job)
            self._jobs = tuple(sorted(live, key=lambda j: (len(j.job_id), j.job_id)))
            self._log_changes(problems)
            return self._jobs

    def next_expiry(self) -> float | None:
        times = [job.expires_at for job in self._jobs]
        return min(times) if times else None

    def find(self, name: str) -> Job | None:
        for job in self._jobs:
            if job.name == name:
                return job
        return None

    def remove(self, job: Job) -> None:
        """Remove a job's file (an operator deleting its assignment)."""
        with self._lock:
            job.path.unlink(missing_ok=True)
            self._cache.pop(job.path.name, None)
            self._jobs = tuple(j for j in self._jobs if j.path != job.path)

    def renew(self, job: Job, expires_at: float) -> Job:
        """Rewrite a job's file with a new expiry; the renewed job."""
        with self._lock:
            data = json.loads(read_regular(job.path, JOB_FILE_LIMIT, follow_symlinks=False))
            data["expires_at"] = expires_at
            data["lease"] = f"renewed through the API at {_utc(self._clock())}"
            replace_atomically(job.path, json.dumps(data).encode())
            renewed = replace(job, expires_at=expires_at, lease=data["lease"])
            self._cache.pop(job.path.name, None)
            self._jobs = tuple(renewed if j.path == job.path else j for j in self._jobs)
            return renewed

    # --- reading ---

    def _read(self, problems: dict[str, str]) -> list[Job]:
        self.problem = self._check_directory()
        if self.problem is not None:
            problems["directory"] = self.problem
            self._cache.clear()
            return []
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.directory)
                if JOB_FILE_PATTERN.match(entry.name)
            )
        except FileNotFoundError:
            self._cache.clear()
            return []
        except OSError as exc:
            problems["directory"] = f"job directory {self.directory}: {exc}"
            return [cached.job for cached in self._cache.values()]
        if len(names) > MAX_JOB_FILES:
            problems["count"] = (
                f"job directory {self.directory} holds {len(names)} job files; the "
                f"{MAX_JOB_FILES} lowest job ids are read, the rest left out"
            )
            names = sorted(names, key=lambda n: (len(n), n))[:MAX_JOB_FILES]
        self._cache = {n: c for n, c in self._cache.items() if n in set(names)}
        jobs = []
        for name in names:
            job = self._job(self.directory / name, problems)
            if job is not None:
                jobs.append(job)
        return jobs

    def _check_directory(self) -> str | None:
        """Why the directory may not be trusted; None when it may (or is missing)."""
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"job directory {self.directory}: {exc}"
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            return f"job directory {self.directory} is not a directory (a link or a file): not read"
        if info.st_uid not in self._owners or info.st_mode & 0o022:
            return (
                f"job directory {self.directory} may be written by others than root "
                f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}): not read, "
                "since whoever writes it chooses jobs' classes"
            )
        return None

    def _job(self, path: Path, problems: dict[str, str]) -> Job | None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None  # removed since the listing: the epilog ran
        except OSError as exc:
            problems[path.name] = f"job file {path}: {exc}"
            return None
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._cache.get(path.name)
        if cached is not None and cached.key == key:
            return cached.job
        try:
            if info.st_uid not in self._owners:
                raise JobFileError(path, "", f"owned by uid {info.st_uid}, not root")
            try:
                data = read_regular(path, JOB_FILE_LIMIT, follow_symlinks=False)
            except (NotRegularFile, FileTooLarge) as exc:
                raise JobFileError(path, "", str(exc)) from None
            job = parse_job(path, data, info.st_mtime)
        except JobFileError as exc:
            if self._clock() - info.st_mtime < JOB_FILE_SETTLE_S:
                log.debug("%s; read again once it settles", exc)
                return None
            self._set_aside(path, str(exc))
            return None
        except OSError as exc:
            problems[path.name] = f"job file {path}: {exc}"
            return None
        self._cache[path.name] = _Cached(key, job)
        return job

    def _expire(self, job: Job) -> None:
        self.expired += 1
        self._cache.pop(job.path.name, None)
        log.warning(
            "job %s: its lease ran out at %s (%s) and no epilog removed it: dropping the job",
            job.name,
            _utc(job.expires_at),
            job.lease or "no reason given",
        )
        try:
            job.path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("job %s: cannot remove %s: %s", job.name, job.path, exc)

    def _set_aside(self, path: Path, reason: str) -> None:
        """Rename an unusable job file out of the way, keeping the newest few per name."""
        self.set_aside += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("%s; cannot set it aside (%s): the job is left out", reason, exc)
            return
        log.error("%s; set aside as %s: the job is left out", reason, target.name)
        aside = sorted(path.parent.glob(f"{path.name}.corrupt-*"))
        for old in aside[: max(len(aside) - KEEP_SET_ASIDE, 0)]:
            old.unlink(missing_ok=True)

    def _log_changes(self, problems: Mapping[str, str]) -> None:
        for key, text in sorted(problems.items()):
            if self._reported.get(key) != text:
                log.error("%s", text)
        for key in sorted(self._reported.keys() - problems.keys()):
            log.info("%s: the problem is gone", self._reported[key])
        self._reported = dict(problems)


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Where the process's job directory lives in the shared resources.
JOB_DIRECTORY_KEY = "jobs.directory"


def shared_job_directory(shared: SharedResources, directory: Path) -> JobDirectory:
    """The process's one job directory, created by whichever needs it first: the
    reconciler and the jobs collector read the same files once and agree on the jobs."""
    return shared.get(JOB_DIRECTORY_KEY, lambda: JobDirectory(directory), lambda _: None)
