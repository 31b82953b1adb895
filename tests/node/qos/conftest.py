"""Fixtures of the QoS tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.qos.reconciler import Reconciler
from tests.conftest import VethPair
from tests.node.qos import make


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty policy directory and a state directory (not created yet)."""
    policy_dir, state_dir = tmp_path / "policies", tmp_path / "state"
    policy_dir.mkdir()
    return policy_dir, state_dir


@pytest.fixture
def reconciler(shaped_pair: VethPair, dirs: tuple[Path, Path]) -> Iterator[Reconciler]:
    """`make(shaped_pair, dirs)`, closed after the test."""
    instance = make(shaped_pair, dirs)
    try:
        yield instance
    finally:
        instance.close()
