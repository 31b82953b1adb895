"""Namespaces for the kernel QoS tests: a veth pair (tests/conftest.py) whose near end the
agent shapes, skipped where the kernel has no HTB."""

from __future__ import annotations

import pytest

from agent.qos.tc import TcCapabilities, detect_capabilities
from tests.conftest import VethPair, netns_unavailable


@pytest.fixture(scope="session")
def tc_capabilities() -> TcCapabilities:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return detect_capabilities()


@pytest.fixture
def shaped_pair(veth_pair: VethPair, tc_capabilities: TcCapabilities) -> VethPair:
    """`veth_pair`, when this kernel can shape with HTB and classify with u32."""
    if not tc_capabilities.htb:
        pytest.skip("kernel has no htb qdisc")
    if not tc_capabilities.u32:
        pytest.skip("kernel has no u32 classifier")
    return veth_pair
