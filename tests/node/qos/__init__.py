"""Tests of agent/qos: `make()` builds a reconciler on a test namespace;
`api_policy_document()` is the policy API tests apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.common.policy.model import detect_cgroup2_root
from agent.node.qos.reconciler import QosSettings, Reconciler
from tests.conftest import VethPair


def make(pair: VethPair, dirs: tuple[Path, Path]) -> Reconciler:
    """A reconciler on `pair`'s first namespace with (policy dir, state dir) `dirs`."""
    policy_dir, state_dir = dirs
    settings = QosSettings(
        policy_dir, state_dir, cgroup_root=detect_cgroup2_root(), netns=pair.netns
    )
    return Reconciler(settings)


def api_policy_document(device: str, name: str = "job-net", **spec: Any) -> dict[str, Any]:
    """A two-class egress policy on `device` (1Gbit: bulk 300Mbit on port 5201, rest
    100Mbit), as a policy document; `spec` keys replace the defaults."""
    return {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosPolicy",
        "metadata": {"name": name},
        "spec": {
            "interface": device,
            "direction": "egress",
            "bandwidth": "1Gbit",
            "defaultClass": "rest",
            "classes": [
                {
                    "name": "bulk",
                    "priority": 1,
                    "rate": "300Mbit",
                    "match": [{"dstPorts": ["5201"]}],
                },
                {"name": "rest", "priority": 7, "rate": "100Mbit"},
            ],
            **spec,
        },
    }
