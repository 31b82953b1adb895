"""Fixtures of the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.api.qos_node import Node, qos_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """The file policy `node` on DEVICE, the spare interface for API policies, and the
    QoS side of an agent serving QosService on its unix socket (tests.node.api.qos_node)."""
    with qos_node(tmp_path) as running:
        yield running
