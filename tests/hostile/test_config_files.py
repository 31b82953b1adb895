"""A hostile or broken configuration file of the agent or the aggregator is refused with
its file and reason, before it is parsed whole: the same limits as a policy document
(size, nesting, values) hold, and no RecursionError or memory blow-up comes out of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.aggregator.config import AggregatorConfig
from agent.common.config import load_model
from agent.common.errors import ConfigError
from agent.common.exits import ExitCode
from agent.node.config import load_config
from tests import ROOT

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)

HOSTILE = {
    "nested-20000-deep": ("labels: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper"),
    "alias-bomb": (ALIAS_BOMB, "more than 20000 values"),
    "over-1-MiB": ("# " + "x" * (1 << 20) + "\n", "over 1 MiB"),
    "not-utf-8": ("labels: \xff\n", "not UTF-8"),
    "two-documents": ("log_level: info\n---\nlog_level: debug\n", "several YAML documents"),
}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    return path


@pytest.mark.parametrize(("text", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_agent_config_is_refused_naming_the_file(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = _write(tmp_path / "agent.yaml", text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, {})

    assert caught.value.source == str(path)
    assert reason in caught.value.reason


@pytest.mark.parametrize(("text", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_aggregator_config_is_refused_naming_the_file(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = _write(tmp_path / "aggregator.yaml", text)

    with pytest.raises(ConfigError) as caught:
        load_model(AggregatorConfig, path, {})

    assert caught.value.source == str(path)
    assert reason in caught.value.reason


def test_the_agent_exits_with_the_config_error_and_no_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path / "agent.yaml", HOSTILE["nested-20000-deep"][0])

    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == ExitCode.INVALID, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}: labels" in result.stderr and "nested deeper than 32 levels" in result.stderr
