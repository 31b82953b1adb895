"""Collector metrics as a scrape shows them, for assertions in collector tests."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from agent.node.exporter import TextEncoder
from agent.node.families import Family


def exposed(families: Iterable[Family]) -> dict[str, float]:
    """Every series of the families as the agent renders them for a scrape, parsed back:
    'name{label="value",...}' (labels sorted) -> value."""
    text = TextEncoder().encode(families).decode()
    return {
        series(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
