"""The path watcher: a pass is woken when a waited-for path appears or a job file
changes; on the real inotify and the real cgroup2 tree."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.common.policy.model import detect_cgroup2_root
from agent.node.jobs import JOB_FILE_PATTERN
from agent.node.watch import (
    IN_CREATE,
    IN_Q_OVERFLOW,
    Event,
    LinuxInotify,
    PathWatcher,
)
from tests.node.jobfiles import write_job


class Running:
    """A watcher on the real inotify in a thread, and whether it woke."""

    def __init__(self, missing: list[Path], directories: list[Path]) -> None:
        self.inotify = LinuxInotify()
        self.woke = threading.Event()
        self.missing = missing
        self.watcher = PathWatcher(self.inotify, self.woke.set)
        self._stop = threading.Event()
        jobs = tuple((d, lambda n: bool(JOB_FILE_PATTERN.match(n))) for d in directories)
        self._thread = threading.Thread(
            target=self.watcher.run,
            args=(self._stop, lambda: (self.missing, jobs)),
            kwargs={"poll_s": 0.05},
        )
        self._thread.start()

    def refreshed(self) -> None:
        """Wait until the watcher has re-read what is wanted (as after a pass)."""
        self.woke.clear()
        self.inotify.poke()
        threading.Event().wait(0.2)
        self.woke.clear()

    def close(self) -> None:
        self._stop.set()
        self.inotify.poke()
        self._thread.join(5)
        self.inotify.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    made: list[Running] = []
    yield made
    for item in made:
        item.close()


def test_a_missing_path_wakes_when_each_level_appears(
    tmp_path: Path, running: list[Running]
) -> None:
    target = tmp_path / "system.slice/n1_slurmstepd.scope/job_5"
    watch = Running([target], [])
    running.append(watch)
    watch.refreshed()
    (tmp_path / "unrelated").mkdir()
    assert not watch.woke.wait(0.3)

    (tmp_path / "system.slice").mkdir()
    assert watch.woke.wait(5)
    watch.refreshed()
    (tmp_path / "system.slice/n1_slurmstepd.scope").mkdir()
    assert watch.woke.wait(5)
    watch.refreshed()
    target.mkdir()
    assert watch.woke.wait(5)


def test_a_path_that_exists_already_wakes_at_once(tmp_path: Path) -> None:
    inotify = LinuxInotify()
    try:
        assert PathWatcher(inotify, lambda: None).update([tmp_path])
    finally:
        inotify.close()


def test_job_files_wake_but_temporary_files_do_not(tmp_path: Path, running: list[Running]) -> None:
    jobs = tmp_path / "jobs"
    watch = Running([], [jobs])
    running.append(watch)
    watch.refreshed()
    jobs.mkdir()  # the directory appearing is a change of its own
    assert watch.woke.wait(5)
    watch.refreshed()

    (jobs / ".slurm-job-1.json.9.tmp").write_text("{}")
    assert not watch.woke.wait(0.3)
    write_job(jobs, "1")
    assert watch.woke.wait(5)
    watch.refreshed()
    (jobs / "slurm-job-1.json").unlink()
    assert watch.woke.wait(5)


def test_a_job_cgroup_made_under_the_cgroup2_mount_wakes(running: list[Running]) -> None:
    root = detect_cgroup2_root()
    if root is None or not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup2 mount")
    scope = root / f"fabric-test-{uuid.uuid4().hex[:8]}.scope"
    job = scope / "job_5"
    watch = Running([job], [])
    running.append(watch)
    watch.refreshed()
    try:
        scope.mkdir()
        assert watch.woke.wait(5)
        watch.refreshed()
        job.mkdir()
        assert watch.woke.wait(5)
    finally:
        for path in (job, scope):
            if path.exists():
                path.rmdir()


class FakeInotify:
    def __init__(self) -> None:
        self.watches: dict[int, Path] = {}

    def add(self, path: Path, mask: int) -> int:
        wd = len(self.watches) + 1
        self.watches[wd] = path
        return wd

    def remove(self, wd: int) -> None:
        self.watches.pop(wd, None)

    def read(self, timeout_s: float) -> list[Event]:
        return []


def test_watches_follow_what_is_wanted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    fake = FakeInotify()
    watcher = PathWatcher(fake, lambda: None)
    watcher.update([tmp_path / "a/job_1", tmp_path / "a/job_2", tmp_path / "b/job_3"])
    assert watcher.watched == {tmp_path / "a", tmp_path}
    watcher.update([])
    assert watcher.watched == set() and fake.watches == {}


def test_other_names_do_not_wake_and_an_overflow_does(tmp_path: Path) -> None:
    woke: list[int] = []
    fake = FakeInotify()
    watcher = PathWatcher(fake, lambda: woke.append(1))
    watcher.update([tmp_path / "job_1"])
    (wd,) = fake.watches
    assert not watcher.handle([Event(wd, IN_CREATE, "job_2")])
    assert watcher.handle([Event(wd, IN_CREATE, "job_1")])
    assert watcher.handle([Event(-1, IN_Q_OVERFLOW, "")])
    assert len(woke) == 2
