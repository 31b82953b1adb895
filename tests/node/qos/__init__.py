"""Tests of agent/node/qos. The QoS logic runs against `FakeKernel` (tests/node/qos/
fake_kernel.py) on the interfaces `DEVICE` and `SPARE`; `make()` builds a reconciler on
the real kernel of a test namespace for the tests that are about the kernel.
`api_policy_document()` is the policy the API tests apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.common.policy.model import (
    QosAssignment,
    QosPolicy,
    detect_cgroup2_root,
    parse_document,
)
from agent.node.qos.htb import Change, HtbTree, plan
from agent.node.qos.kernel import QosKernel, TreeChanges
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.pipeline import QosSettings
from agent.node.qos.reconciler import Reconciler
from tests.conftest import VethPair

# The fake kernel's interfaces: a file policy's, and a spare one for API policies.
DEVICE, SPARE = "fab0", "fab1"


def make(pair: VethPair, dirs: tuple[Path, Path]) -> Reconciler:
    """A reconciler on `pair`'s first namespace with (policy dir, state dir) `dirs`."""
    policy_dir, state_dir = dirs
    settings = QosSettings(
        policy_dir,
        state_dir,
        cgroup_root=detect_cgroup2_root(),
        netns=pair.netns,
        file_settle_s=0.0,
    )
    return Reconciler(settings)


def fake_settings(dirs: tuple[Path, Path], cgroups: Path) -> QosSettings:
    """Settings for a reconciler on the fake kernel: (policy dir, state dir) `dirs`, and
    `cgroups` as the cgroup2 mount. Files are taken as soon as they are written (the
    tests write them whole)."""
    return QosSettings(
        dirs[0], dirs[1], cgroup_root=cgroups, nft_cgroup_base=cgroups, file_settle_s=0.0
    )


def put_tree(kernel: QosKernel, desired: HtbTree) -> list[Change]:
    """Make the kernel hold `desired`: read, plan, apply; the changes it took."""
    actual = kernel.read_tree(desired.device)
    changes = plan(desired, actual)
    if changes:
        kernel.apply(TreeChanges(desired.device, tuple(changes), actual))
    return changes


def netlink_put(desired: HtbTree, netns: str) -> list[Change]:
    """`put_tree` on the real kernel of namespace `netns`."""
    kernel = NetlinkKernel(netns)
    try:
        return put_tree(kernel, desired)
    finally:
        kernel.close()


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


def assignment_document(name: str, cgroup: str, policy: str, cls: str) -> dict[str, Any]:
    """A QosAssignment of `cgroup` to class `cls` of `policy`, as a document."""
    return {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosAssignment",
        "metadata": {"name": name},
        "spec": {"policy": policy, "className": cls, "match": [{"cgroup": cgroup}]},
    }


def api_policy(
    device: str, name: str = "job-net", rate: str = "300Mbit", **spec: object
) -> QosPolicy:
    """`api_policy_document` as its model, with the first class at `rate`."""
    document = api_policy_document(device, name, **spec)
    document["spec"]["classes"][0]["rate"] = rate
    model = parse_document(document, "test")
    assert isinstance(model, QosPolicy)
    return model


def assignment(
    name: str, cgroup: str, policy: str = "node", cls: str = "collectives"
) -> QosAssignment:
    """`assignment_document` as its model."""
    model = parse_document(assignment_document(name, cgroup, policy, cls), "test")
    assert isinstance(model, QosAssignment)
    return model
