"""Files the programs read and write on their own disk (policies, configuration, state),
treated as hostile: only a regular file is read, never more of it than a limit, and a
file is replaced whole or not at all."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


class NotRegularFile(Exception):
    """The path names a FIFO, a device, a directory or (where links are not followed) a
    symbolic link."""


class FileTooLarge(Exception):
    """The file holds more than `limit` bytes: `size` as it was opened, None when it grew
    past the limit while it was read."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(f"{size if size is not None else 'more than'} bytes; at most {limit}")
        self.size = size
        self.limit = limit


def read_regular(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them. Raises NotRegularFile,
    FileTooLarge, or the OSError of the open or read (FileNotFoundError: no such file).

    What is checked is the file as opened, not its name, which may be replaced between
    a stat and an open; O_NONBLOCK: opening a FIFO does not wait for a writer."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFile(f"{path}: a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{path}: not a regular file")
        if info.st_size > limit:
            raise FileTooLarge(info.st_size, limit)
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(None, limit)
    return data


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a new temporary file (never one an attacker planted),
    fsync, rename, and an fsync of the directory, so a crash leaves the old file or the
    new one. Makes the directory when missing; ENOTDIR when a file stands in its place."""
    directory = path.parent
    if directory.exists() and not directory.is_dir():
        # mkdir would say EEXIST, which names the wrong problem.
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable once the directory entry is.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
