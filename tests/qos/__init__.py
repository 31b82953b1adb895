"""Tests of agent/qos; `api_policy_document()` is the policy API tests apply."""

from __future__ import annotations

from typing import Any


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
