"""The package's rooms: the node agent (`agent.node`), the fleet aggregator
(`agent.aggregator`) and fabricctl (`agent.ctl`) share only `agent.common` and the
generated `agent.proto`. The aggregator and fabricctl never load the node's hardware
stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT

PACKAGE = ROOT / "agent"
ROLES = ("node", "aggregator", "ctl", "common", "proto")
# What each room may import from the package besides itself.
ALLOWED = {
    "node": {"common", "proto"},
    "aggregator": {"common", "proto"},
    "ctl": {"common", "proto"},
    "common": {"proto"},
    "proto": set(),
}
HARDWARE_MODULES = ("pynvml", "pyroute2", "psutil", "nftables", "agent.node")


def role_of(module: str) -> str | None:
    """The room of a dotted module name under `agent`; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else None


def imports_of(path: Path) -> list[str]:
    """The absolute `agent...` modules a source file imports, at any depth."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return [name for name in found if name == "agent" or name.startswith("agent.")]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_every_module_lives_in_a_room() -> None:
    loose = [
        module_name(path)
        for path in PACKAGE.glob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    ]
    assert loose == [], "modules belong in agent/node, agent/aggregator, agent/ctl or agent/common"


def test_no_room_imports_another_rooms_code() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        role = role_of(module)
        if role is None:
            continue  # agent/__init__.py, agent/__main__.py
        for imported in imports_of(path):
            target = role_of(imported)
            if target is None or target == role or target in ALLOWED[role]:
                continue
            violations.append(f"{module} imports {imported}")
    assert violations == []


@pytest.mark.parametrize("entry", ["agent.aggregator.main", "agent.ctl.main"])
def test_entry_module_loads_no_hardware_stack(entry: str) -> None:
    script = (
        f"import sys, {entry}\n"
        f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in {HARDWARE_MODULES!r} "
        f"or m.startswith('agent.node')))"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert result.stdout.split() == []
