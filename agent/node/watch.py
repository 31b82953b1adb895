"""Waking the reconciler the moment something it waits for appears.

A job's cgroup appears only after its prolog ran (Slurm 22.05 with `Contain`), and
the job may send at once: polling every reconcile interval left the first seconds of
each job unclassified. The watcher asks the reconciler which paths it waits for (the
cgroups of pending assignments and policies, the job directory), watches the deepest
existing ancestor of each with inotify, and wakes a pass when the next component of
one of them is created; changes in the job directory wake a pass too. inotify sees a
cgroup's mkdir like any directory's: it goes through the VFS.

The kernel boundary is `Inotify` (three calls); `LinuxInotify` is its ctypes binding,
so tests hand in a fake.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A parent's new child (or one renamed into place), and the watched directory going.
APPEAR = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# Any change of a directory's entries or of a file in it.
CHANGE = APPEAR | IN_DELETE | IN_MOVED_FROM | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")
# The most directories watched at once: pending cgroups share their ancestors, so this
# is far more than a node's pending jobs need.
MAX_WATCHES = 1024


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str


class Inotify(Protocol):
    def add(self, path: Path, mask: int) -> int:
        """The watch descriptor; raises OSError (ENOENT: no such directory)."""
        ...

    def remove(self, wd: int) -> None: ...

    def read(self, timeout_s: float) -> list[Event]:
        """The events that arrive within `timeout_s` ([] if none)."""
        ...


class LinuxInotify:
    """inotify(7) through libc; also wakes on `poke()` (an empty read)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._fd: int = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def add(self, path: Path, mask: int) -> int:
        wd: int = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
        return wd

    def remove(self, wd: int) -> None:
        # EINVAL: the kernel dropped it already (the directory went).
        self._libc.inotify_rm_watch(self._fd, wd)

    def poke(self) -> None:
        # BlockingIOError: a wake-up is pending already; OSError: closed, nobody waits.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def read(self, timeout_s: float) -> list[Event]:
        ready, _, _ = select.select([self._fd, self._wake_r], [], [], timeout_s)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if self._fd not in ready:
            return []
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            raw = data[offset : offset + length].split(b"\0", 1)[0]
            offset += length
            events.append(Event(wd, mask, os.fsdecode(raw)))
        return events

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)


# Directories whose changes matter, each with the test of which entry names matter.
Directories = tuple[tuple[Path, Callable[[str], bool]], ...]


class PathWatcher:
    """Calls `wake` when a wanted path appears or a watched directory changes."""

    def __init__(self, inotify: Inotify, wake: Callable[[], None]) -> None:
        self._inotify = inotify
        self._wake = wake
        # wd -> (directory, the child names that matter there; None: any change).
        self._by_wd: dict[int, tuple[Path, Callable[[str], bool]]] = {}
        self._by_dir: dict[Path, int] = {}
        self._refused: set[Path] = set()

    @property
    def watched(self) -> set[Path]:
        return set(self._by_dir)

    def update(self, missing: Iterable[Path], directories: Directories = ()) -> bool:
        """Watch what is needed for `missing` and `directories` now, and nothing else.
        True when one of `missing` exists already (the caller wakes at once)."""
        wanted: dict[Path, Callable[[str], bool]] = {}
        appeared = False
        children: dict[Path, set[str]] = {}
        for path in missing:
            found = _deepest_existing(path)
            if found is None:
                continue
            ancestor, child = found
            if child is None:
                appeared = True
                continue
            children.setdefault(ancestor, set()).add(child)
        for ancestor, names in children.items():
            wanted[ancestor] = names.__contains__
        for directory, matters in directories:
            if directory.is_dir():
                wanted[directory] = matters
            else:
                found = _deepest_existing(directory)
                if found is not None and found[1] is not None:
                    names = children.setdefault(found[0], set())
                    names.add(found[1])
                    wanted[found[0]] = names.__contains__
        for directory in set(self._by_dir) - set(wanted):
            self._inotify.remove(self._by_dir.pop(directory))
        self._by_wd = {wd: v for wd, v in self._by_wd.items() if v[0] in wanted}
        for directory, matters in sorted(wanted.items())[:MAX_WATCHES]:
            wd = self._by_dir.get(directory)
            if wd is None:
                try:
                    wd = self._inotify.add(directory, CHANGE)
                except OSError as exc:
                    if exc.errno != errno.ENOENT and directory not in self._refused:
                        log.warning("cannot watch %s (%s): found by the next pass", directory, exc)
                        self._refused.add(directory)
                    continue
                self._refused.discard(directory)
                self._by_dir[directory] = wd
            self._by_wd[wd] = (directory, matters)
        return appeared

    def handle(self, events: Iterable[Event]) -> bool:
        """Wake (and return True) when an event concerns what is wanted."""
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self._wake()  # events were lost: look
                return True
            watched = self._by_wd.get(event.wd)
            if watched is None:
                continue
            directory, matters = watched
            if event.mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                self._by_dir.pop(directory, None)
                self._by_wd.pop(event.wd, None)
                continue
            if matters(event.name):
                self._wake()
                return True
        return False

    def run(
        self,
        stop: threading.Event,
        wanted: Callable[[], tuple[Iterable[Path], Directories]],
        poll_s: float = 1.0,
    ) -> None:
        """Until `stop`: refresh the watches (after each read), read events, wake."""
        while not stop.is_set():
            missing, directories = wanted()
            if self.update(missing, directories):
                self._wake()
            self.handle(self._inotify.read(poll_s))


def _deepest_existing(path: Path) -> tuple[Path, str | None] | None:
    """The deepest existing directory on `path` and the name of the next component
    below it (None when `path` itself exists); None when nothing of it exists."""
    current = path
    child: str | None = None
    while True:
        try:
            if current.is_dir():
                return current, child
        except OSError:
            pass
        if current.parent == current:
            return None
        child = current.name
        current = current.parent
