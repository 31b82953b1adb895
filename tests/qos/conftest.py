"""Fixtures of the QoS tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty policy directory and a state directory (not created yet)."""
    policy_dir, state_dir = tmp_path / "policies", tmp_path / "state"
    policy_dir.mkdir()
    return policy_dir, state_dir
