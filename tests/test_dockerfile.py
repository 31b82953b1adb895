"""The Dockerfile installs what the agent and fabricctl need and says what it serves
(no docker engine here: the file is read, and its health check command is run)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def last_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def test_runtime_stage_installs_the_package_and_kernel_tools() -> None:
    runs = " ".join(rest for keyword, rest in last_stage() if keyword == "RUN")

    assert "iproute2" in runs and "libnftables1" in runs
    assert "pip install" in runs and "/wheels/*.whl" in runs
    # Both console scripts of the one package are there and start.
    assert "fabric-agent --version" in runs and "fabricctl --version" in runs


def test_pyproject_declares_both_console_scripts() -> None:
    text = (ROOT / "pyproject.toml").read_text()

    assert 'fabric-agent = "agent.node.cli.main:main"' in text
    assert 'fabricctl = "agent.ctl.main:main"' in text


def test_exposes_metrics_and_api_ports() -> None:
    exposed = {
        port for keyword, rest in last_stage() if keyword == "EXPOSE" for port in rest.split()
    }

    assert exposed == {"9478", "9479"}


def test_entrypoint_runs_the_agent_with_the_shipped_config() -> None:
    (entrypoint,) = [rest for keyword, rest in last_stage() if keyword == "ENTRYPOINT"]

    assert entrypoint == '["fabric-agent", "run", "--config", "/etc/fabric-agent/agent.yaml"]'
    assert ("COPY", "systemd/agent.yaml /etc/fabric-agent/agent.yaml") in last_stage()


def test_healthcheck_uses_fabricctl_health_and_never_exits_2(tmp_path: Path) -> None:
    (healthcheck,) = [rest for keyword, rest in last_stage() if keyword == "HEALTHCHECK"]
    command = healthcheck.split(" CMD ", 1)[1]
    argv = [part.strip().strip('"') for part in command.strip("[]").split('", "')]
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith("fabricctl ")
    assert "health" in shlex.split(argv[2])

    # The same shell line, with fabricctl from this checkout and no agent listening:
    # fabricctl exits 3 (unreachable), the health check 1 (Docker reserves 2).
    script = argv[2].replace(
        "fabricctl ",
        f"{shlex.quote(sys.executable)} -m agent.ctl --agent unix:{tmp_path}/none.sock ",
        1,
    )
    result = subprocess.run(
        ["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr


def test_volumes_keep_state_and_share_the_socket() -> None:
    volumes = " ".join(rest for keyword, rest in last_stage() if keyword == "VOLUME")

    assert "/var/lib/fabric-agent" in volumes
    assert "/run/fabric-agent" in volumes
