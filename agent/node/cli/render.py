"""Human-readable rendering of a snapshot for `fabric-agent sample --format text`."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.node.snapshot import Snapshot


def render_text(snapshot: Snapshot) -> str:
    lines = [
        f"node {snapshot.node_name}  seq {snapshot.seq}  agent {snapshot.agent_version}",
        "collectors:",
    ]
    for status in snapshot.collectors:
        state = "ok" if status.success else f"FAILED ({status.error})"
        lines.append(
            f"  {status.name:<10} {state:<8} {status.duration_s * 1000:8.2f} ms  "
            f"{status.samples} samples"
        )
    for name, samples in sorted(snapshot.sections.items()):
        lines.append(f"{name}:")
        lines.extend(f"  {_fields(sample)}" for sample in samples)
    return "\n".join(lines)


def _fields(sample: Any) -> str:
    """`key=value` for every field that has a value, in declaration order."""
    parts = []
    for field in dataclasses.fields(sample):
        value = getattr(sample, field.name)
        if value is None or value == () or value == {}:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"{field.name}={value}")
    return " ".join(parts)
