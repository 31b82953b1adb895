"""The preload that lets Slurm's cgroup/v2 plugin run on a hybrid test host
(cgroup_v2_only.c): a process with it sees only the `0::` line of /proc/*/cgroup, whichever
way it opens the file, and every other file as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm.cluster import SHIM_SOURCE

# Opens the files the ways Slurm and libc might: openat (slurmd), open, fopen.
READER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

static void dump_fd(int fd) {
    char c;
    while (read(fd, &c, 1) == 1) putchar(c);
    close(fd);
}

int main(int argc, char **argv) {
    FILE *f;
    int c;
    (void)argc;
    dump_fd(openat(AT_FDCWD, argv[1], O_RDONLY));
    puts("--");
    dump_fd(open(argv[1], O_RDONLY));
    puts("--");
    f = fopen(argv[1], "r");
    while ((c = fgetc(f)) != EOF) putchar(c);
    fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (make test installs it)")
    work = tmp_path_factory.mktemp("shim")
    shim, reader = work / "shim.so", work / "reader"
    (work / "reader.c").write_text(READER)
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
                    str(shim), str(SHIM_SOURCE), "-ldl"], check=True)  # fmt: skip
    subprocess.run(["gcc", "-O2", "-o", str(reader), str(work / "reader.c")], check=True)
    return shim, reader


def read_with(built: tuple[Path, Path], path: str, preload: bool) -> list[str]:
    shim, reader = built
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if preload:
        env["LD_PRELOAD"] = str(shim)
    result = subprocess.run(
        [str(reader), path], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split("--\n")


@pytest.mark.parametrize("path", ["/proc/self/cgroup", "/proc/thread-self/cgroup", "pid"])
def test_only_the_unified_line_is_seen(built: tuple[Path, Path], path: str) -> None:
    if path == "pid":
        path = f"/proc/{os.getpid()}/cgroup"
    real = Path(path).read_text()
    unified = "".join(line + "\n" for line in real.splitlines() if line.startswith("0::"))

    views = read_with(built, path, preload=True)

    assert views == [unified, unified, unified]


def test_other_files_pass_through(built: tuple[Path, Path]) -> None:
    with_preload = read_with(built, "/proc/self/mountinfo", preload=True)

    assert with_preload == read_with(built, "/proc/self/mountinfo", preload=False)
    assert " - cgroup2 " in with_preload[0]
