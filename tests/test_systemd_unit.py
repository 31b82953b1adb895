"""The shipped unit file passes `systemd-analyze verify`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "fabric-agent.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's script.
    executable = Path(sys.executable).parent / "fabric-agent"
    assert executable.exists(), f"{executable} missing: pip install -e ."
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/fabric-agent " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/bin/fabric-agent ", f"ExecStart={executable} "))

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
