"""API policies and assignments through the reconciler, against a real kernel: beside the
files, refused where a file owns the name or the interface, leases that run out and take
their classes with them, assignments that join a job's cgroup to a class, and state that
survives a restart."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.common.policy.model import QosAssignment, QosPolicy, detect_cgroup2_root, validate_object
from agent.node.qos import tc
from agent.node.qos.api_policies import API_FILE, ENFORCED, ORIGIN_FLEET, PENDING, RefusedError
from agent.node.qos.nftables import Nftables
from agent.node.qos.nftrules import TABLE_FAMILY, TABLE_NAME
from agent.node.qos.reconciler import Reconciler
from tests.conftest import VethPair
from tests.node.qos import api_policy_document, make
from tests.node.qos.test_reconciler import ip_netns, write

CGROUP_ROOT = detect_cgroup2_root()


def api_policy(device: str, name: str = "job-net", rate: str = "300Mbit") -> QosPolicy:
    document = api_policy_document(device, name)
    document["spec"]["classes"][0]["rate"] = rate
    model = validate_object(document, "test")
    assert isinstance(model, QosPolicy)
    return model


def assignment(
    name: str, cgroup: str, policy: str = "node", cls: str = "collectives"
) -> QosAssignment:
    document = {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosAssignment",
        "metadata": {"name": name},
        "spec": {"policy": policy, "className": cls, "match": [{"cgroup": cgroup}]},
    }
    model = validate_object(document, "test")
    assert isinstance(model, QosAssignment)
    return model


@pytest.fixture
def spare(shaped_pair: VethPair) -> Iterator[str]:
    """A second interface in the reconciler's namespace (one end of a veth pair whose
    ends both stay there), for API policies beside the file policy's interface."""
    name = f"{shaped_pair.device[:11]}-sp"
    subprocess.run(
        [
            "ip",
            "-n",
            shaped_pair.netns,
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            f"{name}x",
        ],
        check=True,
    )
    subprocess.run(["ip", "-n", shaped_pair.netns, "link", "set", name, "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "-n", shaped_pair.netns, "link", "del", name], check=False)


@pytest.fixture
def job_cgroup() -> Iterator[str]:
    """A fresh cgroup v2 directory, relative to the cgroup2 root; removed after."""
    if CGROUP_ROOT is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 mount")
    relative = f"fabric-test-{uuid.uuid4().hex[:8]}"
    yield relative
    (CGROUP_ROOT / relative).rmdir() if (CGROUP_ROOT / relative).is_dir() else None


def nft_table(netns: str) -> str:
    with Nftables(netns=netns) as nft:
        listing = nft.list_table(TABLE_FAMILY, TABLE_NAME)
    return json.dumps(listing)


def test_api_policy_applied_beside_files_and_listed(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()

    outcome = reconciler.apply_object(api_policy(spare), ttl_s=600)

    assert any(change.startswith("job-net: + qdisc fa:") for change in outcome.changes)
    assert outcome.view is not None and outcome.view.state == ENFORCED
    assert outcome.view.expires_at is not None
    tree = tc.read_tree(spare, netns=shaped_pair.netns)
    assert tree is not None and len(tree.classes) == 3
    views = {view.name: view for view in reconciler.policies()}
    assert views["node"].source == "file" and views["job-net"].source == "api"
    assert views["job-net"].device == spare
    # Nothing left to do: a second pass changes nothing.
    assert reconciler.reconcile().changes == ()
    saved = json.loads((dirs[1] / API_FILE).read_text())
    assert [o["name"] for o in saved["objects"]] == ["job-net"]


def test_file_names_and_interfaces_are_refused(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()
    before = tc.read_tree(shaped_pair.device, netns=shaped_pair.netns)

    with pytest.raises(RefusedError) as same_name:
        reconciler.apply_object(api_policy(spare, name="node"))
    with pytest.raises(RefusedError) as same_interface:
        reconciler.apply_object(api_policy(shaped_pair.device))
    with pytest.raises(RefusedError) as deleting_file:
        reconciler.delete_object("node")

    assert same_name.value.problems[0].kind == "SOURCE"
    assert "belongs to policy file" in str(same_name.value)
    assert same_interface.value.problems[0].kind == "OWNERSHIP"
    assert "owned by policy 'node'" in str(same_interface.value)
    assert deleting_file.value.problems[0].kind == "SOURCE"
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == before
    assert tc.read_tree(spare, netns=shaped_pair.netns) is None
    assert reconciler.api.entries() == []


def test_validate_only_reports_and_changes_nothing(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str
) -> None:
    outcome = reconciler.apply_object(api_policy(spare), validate_only=True)

    assert any("+ qdisc fa:" in change for change in outcome.changes)
    assert tc.read_tree(spare, netns=shaped_pair.netns) is None
    assert reconciler.api.entries() == []
    assert reconciler.plan_object(api_policy(spare)) == list(outcome.changes)


def test_lease_runs_out_and_its_classes_go(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str
) -> None:
    reconciler.apply_object(api_policy(spare), ttl_s=1.0)
    assert tc.read_tree(spare, netns=shaped_pair.netns) is not None
    stop = threading.Event()
    # A long interval: the lease, not the schedule, must wake the loop.
    loop = threading.Thread(target=reconciler.run, args=(stop, 60.0), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if tc.read_tree(spare, netns=shaped_pair.netns) is None:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        reconciler.wake.set()
        loop.join(10)

    assert tc.read_tree(spare, netns=shaped_pair.netns) is None
    assert reconciler.lease_expirations == 1
    assert reconciler.api.entries() == []
    assert [v.name for v in reconciler.policies()] == []


def test_renewed_lease_outlives_its_first_ttl(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str
) -> None:
    reconciler.apply_object(api_policy(spare), ttl_s=1.0)
    time.sleep(0.6)
    view = reconciler.renew_lease("job-net", 3.0)
    time.sleep(0.6)
    reconciler.reconcile()

    assert view.lease_ttl_s == 3.0
    assert tc.read_tree(spare, netns=shaped_pair.netns) is not None
    assert reconciler.lease_expirations == 0


def test_assignment_joins_cgroup_to_class_and_waits_for_it(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path], job_cgroup: str
) -> None:
    assert CGROUP_ROOT is not None
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()
    tree_before = tc.read_tree(shaped_pair.device, netns=shaped_pair.netns)

    pending = reconciler.apply_object(assignment("job-1", job_cgroup), ttl_s=600)
    assert pending.view is not None and pending.view.state == PENDING
    assert job_cgroup not in nft_table(shaped_pair.netns)

    (CGROUP_ROOT / job_cgroup).mkdir()
    result = reconciler.reconcile()
    assert "nftables table reloaded" in result.changes
    assert job_cgroup in nft_table(shaped_pair.netns)
    assert {v.name: v.state for v in reconciler.policies()}["job-1"] == ENFORCED
    # The class's HTB tree is untouched: a cgroup is classified by nftables alone.
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == tree_before

    reconciler.delete_object("job-1")
    assert job_cgroup not in nft_table(shaped_pair.netns)
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == tree_before


def test_assignment_to_unknown_policy_or_class_is_refused(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()

    with pytest.raises(RefusedError, match="no policy named 'other'"):
        reconciler.apply_object(assignment("job-1", "x", policy="other"))
    with pytest.raises(RefusedError, match="has no class 'gold'"):
        reconciler.apply_object(assignment("job-1", "x", cls="gold"))
    assert reconciler.api.entries() == []


def test_kernel_refusal_rolls_back(
    reconciler: Reconciler, shaped_pair: VethPair, spare: str
) -> None:
    # Someone else's root qdisc: the pass cannot take the interface over.
    ip_netns(
        shaped_pair.netns,
        "tc",
        "qdisc",
        "add",
        "dev",
        spare,
        "root",
        "handle",
        "1:",
        "htb",
    )
    try:
        with pytest.raises(RefusedError) as refused:
            reconciler.apply_object(api_policy(spare))
        assert refused.value.problems[0].kind in {"KERNEL", "OWNERSHIP"}
        assert reconciler.api.entries() == []
        qdiscs = ip_netns(shaped_pair.netns, "tc", "qdisc", "show", "dev", spare)
        assert "qdisc htb 1: root" in qdiscs
    finally:
        ip_netns(shaped_pair.netns, "tc", "qdisc", "del", "dev", spare, "root")


def test_api_policies_survive_a_restart_without_a_change(
    shaped_pair: VethPair, spare: str, dirs: tuple[Path, Path]
) -> None:
    first = make(shaped_pair, dirs)
    try:
        first.apply_object(api_policy(spare), ttl_s=600)
    finally:
        first.close()
    second = make(shaped_pair, dirs)
    try:
        result = second.reconcile()
        assert result.changes == ()
        assert [v.name for v in second.policies()] == ["job-net"]
        assert second.policies()[0].expires_at is not None
    finally:
        second.close()


def test_fleet_and_local_api_objects_change_only_their_own(
    shaped_pair: VethPair, spare: str, dirs: tuple[Path, Path]
) -> None:
    first = make(shaped_pair, dirs)
    try:
        first.apply_object(api_policy(spare, name="fleet-net"), origin=ORIGIN_FLEET)
        before = tc.read_tree(spare, netns=shaped_pair.netns)

        with pytest.raises(RefusedError) as replacing:
            first.apply_object(api_policy(spare, name="fleet-net", rate="100Mbit"))
        with pytest.raises(RefusedError) as deleting:
            first.delete_object("fleet-net")
        with pytest.raises(RefusedError) as renewing:
            first.renew_lease("fleet-net", 60)

        for refused in (replacing, deleting, renewing):
            assert refused.value.problems[0].kind == "OWNERSHIP"
            assert "fleet aggregator" in str(refused.value)
        assert tc.read_tree(spare, netns=shaped_pair.netns) == before
        assert first.fleet_names() == {"fleet-net"}
        assert [v.source for v in first.policies()] == ["fleet"]
    finally:
        first.close()
    # The origin is persisted: after a restart the fleet still owns it.
    second = make(shaped_pair, dirs)
    try:
        assert second.reconcile().changes == ()
        assert second.fleet_names() == {"fleet-net"}
        second.delete_object("fleet-net", origin=ORIGIN_FLEET)
        assert second.fleet_names() == set()
        assert tc.read_tree(spare, netns=shaped_pair.netns) is None
    finally:
        second.close()
