"""Fixtures of the QoS tests: a reconciler on the fake kernel, its directories and its
cgroup tree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.qos.reconciler import Reconciler
from tests.node.qos import DEVICE, SPARE, fake_settings
from tests.node.qos.fake_kernel import FakeKernel


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty policy directory and a state directory (not created yet)."""
    policy_dir, state_dir = tmp_path / "policies", tmp_path / "state"
    policy_dir.mkdir()
    return policy_dir, state_dir


@pytest.fixture
def cgroups(tmp_path: Path) -> Path:
    """A cgroup2 tree of the test's own: a directory the fake kernel's reconciler takes
    as the cgroup2 mount (and where nft would look cgroups up)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    return root


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel([DEVICE, SPARE])


@pytest.fixture
def reconciler(kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path) -> Iterator[Reconciler]:
    """A reconciler on the fake kernel, closed after the test."""
    instance = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        yield instance
    finally:
        instance.close()
