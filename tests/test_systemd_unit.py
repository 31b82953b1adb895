"""The shipped unit files pass `systemd-analyze verify`; the annotated config files are
the programs' defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.aggregator.config import AggregatorConfig
from agent.common.config import load_model
from tests import ROOT

UNIT = ROOT / "systemd" / "fabric-agent.service"
AGGREGATOR_UNIT = ROOT / "systemd" / "fabric-aggregator.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("shipped", [UNIT, AGGREGATOR_UNIT], ids=lambda p: p.name)
def test_unit_verifies(tmp_path: Path, shipped: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's script.
    program = shipped.stem
    executable = Path(sys.executable).parent / program
    assert executable.exists(), f"{executable} missing: pip install -e ."
    text = shipped.read_text()
    assert f"ExecStart=/usr/bin/{program} " in text
    unit = tmp_path / shipped.name
    for key in ("ExecStart", "ExecStartPre"):
        text = text.replace(f"{key}=/usr/bin/{program} ", f"{key}={executable} ")
    unit.write_text(text)

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"[Uu]nknown (key|lvalue|section)|ignoring", output), output


def test_unit_is_type_notify_with_watchdog_and_reload() -> None:
    directives = [line.strip() for line in UNIT.read_text().splitlines()]

    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
    ):
        assert expected in directives


def test_aggregator_unit_is_type_notify_without_privileges() -> None:
    directives = [line.strip() for line in AGGREGATOR_UNIT.read_text().splitlines()]

    for expected in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "CapabilityBoundingSet=",
        "StateDirectory=fabric-aggregator",
    ):
        assert expected in directives


def test_shipped_aggregator_config_is_the_default() -> None:
    config = load_model(AggregatorConfig, ROOT / "systemd" / "aggregator.yaml", {})

    assert config == AggregatorConfig(replica_name=config.replica_name)
