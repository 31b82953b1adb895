"""The node agent against a hostile user or an unlucky operator: policy files swapped
under the reader, state files set aside in a restart loop, and a policy directory
filled past what a node holds. Each case costs only itself: the reader never blocks,
the disk does not fill, what is enforced stays."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.common.policy.model import PolicyError, read_policy_text
from agent.node.qos.files import FileRead, read_files
from agent.node.qos.state import STATE_FILE, StateError, load_state
from tests.node.qos import DEVICE
from tests.node.qos.test_reconciler import write

# Generous: a read that takes this long is one that waits for a FIFO's writer.
READ_TIMEOUT_S = 10.0


@contextmanager
def regular_at_check(
    monkeypatch: pytest.MonkeyPatch, swapped: Path, regular: Path
) -> Iterator[None]:
    """`swapped` looks like the regular file `regular` to stat and lstat by name: the
    file as it was when checked, before an attacker put a FIFO in its place."""
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(path, str | os.PathLike) and os.fspath(path) == str(swapped):
            return real_stat(regular)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    yield


def finishes(call: Callable[[], object], fifo: Path) -> tuple[bool, object]:
    """(whether `call` returned or raised within READ_TIMEOUT_S, what it gave). A reader
    still waiting on `fifo` is released by a writer that opens and closes it."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT_S)
    done = not thread.is_alive()
    if not done:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(READ_TIMEOUT_S)
    return done, outcome[0] if outcome else None


# --- files swapped between their check and their read -----------------------------------


def test_a_policy_file_swapped_for_a_fifo_after_its_check_is_refused_and_blocks_no_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write(tmp_path, DEVICE)
    fifo = tmp_path / "swapped.yaml"
    os.mkfifo(fifo)

    with regular_at_check(monkeypatch, fifo, good):
        done, result = finishes(lambda: read_files([fifo, good], interface_exists=bool), fifo)

    assert done, "the read waited for a writer of the FIFO"
    assert isinstance(result, FileRead), result
    assert "not a regular file" in result.broken[str(fifo)]
    assert [p.policy.metadata.name for p in result.policies] == ["node"]
    with pytest.raises(PolicyError, match="not a regular file"):
        read_policy_text(fifo)


def test_a_state_file_swapped_for_a_fifo_after_its_check_is_unusable_not_a_blocked_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = tmp_path / "regular.json"
    regular.write_text('{"version": 1, "policies": []}')
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    fifo = state_dir / STATE_FILE
    os.mkfifo(fifo)

    with regular_at_check(monkeypatch, fifo, regular):
        done, result = finishes(lambda: load_state(state_dir), fifo)

    assert done, "the agent's start waited for a writer of the FIFO"
    assert isinstance(result, StateError), result
    assert "not a regular file" in str(result)
