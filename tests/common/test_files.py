"""Reading and replacing the programs' own files: only regular files, within a limit,
replaced whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.common.files import FileTooLarge, NotRegularFile, read_regular, replace_atomically


def test_a_regular_file_within_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)

    assert read_regular(path, 10) == b"x" * 10


def test_a_larger_file_is_refused_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)

    with pytest.raises(FileTooLarge) as caught:
        read_regular(path, 10)

    assert (caught.value.size, caught.value.limit) == (11, 10)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    os.mkfifo(path)

    with pytest.raises(NotRegularFile):
        read_regular(path, 10)


def test_a_symbolic_link_is_refused_where_links_are_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)

    assert read_regular(tmp_path / "link", 10) == b"secret"
    with pytest.raises(NotRegularFile):
        read_regular(tmp_path / "link", 10, follow_symlinks=False)


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "none", 10)


def test_replacing_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    path = tmp_path / "dir" / "state"
    path.parent.mkdir()
    (path.parent / "state.tmp").symlink_to(victim)

    replace_atomically(path, b"new")

    assert path.read_bytes() == b"new"
    assert victim.read_bytes() == b"keep"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state", "state.tmp"]


def test_replacing_where_a_file_stands_for_the_directory_is_enotdir(tmp_path: Path) -> None:
    (tmp_path / "dir").write_bytes(b"")

    with pytest.raises(NotADirectoryError):
        replace_atomically(tmp_path / "dir" / "state", b"new")
