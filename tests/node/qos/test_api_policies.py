"""API policies and assignments through the reconciler, against the fake kernel: beside
the files, refused where a file owns the name or the interface, leases that run out and
take their classes with them, assignments that join a job's cgroup to a class, and state
that survives a restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.common.policy.model import Match
from agent.node.qos.api_objects import API_FILE, ENFORCED, ORIGIN_FLEET, PENDING, RefusedError
from agent.node.qos.reconciler import Reconciler
from tests.node.qos import (
    DEVICE,
    SPARE,
    api_policy,
    assignment,
    fake_settings,
)
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write


@pytest.fixture
def job_cgroup() -> str:
    """A job's cgroup path, relative to the cgroup2 root (not created)."""
    return f"fabric-test-{uuid.uuid4().hex[:8]}"


def nft_table(kernel: FakeKernel) -> str:
    return json.dumps(kernel.read_nft_table())


def test_api_policy_applied_beside_files_and_listed(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    outcome = reconciler.apply_object(api_policy(SPARE), ttl_s=600)

    assert any(change.startswith("job-net: + qdisc fa:") for change in outcome.changes)
    assert outcome.view is not None and outcome.view.state == ENFORCED
    assert outcome.view.expires_at is not None
    tree = kernel.tree(SPARE)
    assert tree is not None and len(tree.classes) == 3
    views = {view.name: view for view in reconciler.policies()}
    assert views["node"].source == "file" and views["job-net"].source == "api"
    assert views["job-net"].device == SPARE
    # Nothing left to do: a second pass changes nothing.
    assert reconciler.reconcile().changes == ()
    saved = json.loads((dirs[1] / API_FILE).read_text())
    assert [o["name"] for o in saved["objects"]] == ["job-net"]


def test_file_names_and_interfaces_are_refused(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    before = kernel.tree(DEVICE)

    with pytest.raises(RefusedError) as same_name:
        reconciler.apply_object(api_policy(SPARE, name="node"))
    with pytest.raises(RefusedError) as same_interface:
        reconciler.apply_object(api_policy(DEVICE))
    with pytest.raises(RefusedError) as deleting_file:
        reconciler.delete_object("node")

    assert same_name.value.problems[0].kind == "SOURCE"
    assert "belongs to policy file" in str(same_name.value)
    assert same_interface.value.problems[0].kind == "OWNERSHIP"
    assert "owned by policy 'node'" in str(same_interface.value)
    assert deleting_file.value.problems[0].kind == "SOURCE"
    assert kernel.tree(DEVICE) == before
    assert kernel.tree(SPARE) is None
    assert reconciler.api.entries() == []


def test_validate_only_reports_and_changes_nothing(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    outcome = reconciler.apply_object(api_policy(SPARE), validate_only=True)

    assert any("+ qdisc fa:" in change for change in outcome.changes)
    assert kernel.tree(SPARE) is None
    assert reconciler.api.entries() == []
    assert reconciler.plan_object(api_policy(SPARE)) == list(outcome.changes)


def test_lease_runs_out_and_its_classes_go(reconciler: Reconciler, kernel: FakeKernel) -> None:
    reconciler.apply_object(api_policy(SPARE), ttl_s=1.0)
    assert kernel.tree(SPARE) is not None
    stop = threading.Event()
    # A long interval: the lease, not the schedule, must wake the loop.
    loop = threading.Thread(target=reconciler.run, args=(stop, 60.0), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if kernel.tree(SPARE) is None:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        reconciler.wake.set()
        loop.join(10)

    assert kernel.tree(SPARE) is None
    assert reconciler.lease_expirations == 1
    assert reconciler.api.entries() == []
    assert [v.name for v in reconciler.policies()] == []


def test_renewed_lease_outlives_its_first_ttl(reconciler: Reconciler, kernel: FakeKernel) -> None:
    reconciler.apply_object(api_policy(SPARE), ttl_s=1.0)
    time.sleep(0.6)
    view = reconciler.renew_lease("job-net", 3.0)
    time.sleep(0.6)
    reconciler.reconcile()

    assert view.lease_ttl_s == 3.0
    assert kernel.tree(SPARE) is not None
    assert reconciler.lease_expirations == 0


def test_assignment_joins_cgroup_to_class_and_waits_for_it(
    reconciler: Reconciler,
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    cgroups: Path,
    job_cgroup: str,
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    tree_before = kernel.tree(DEVICE)

    pending = reconciler.apply_object(assignment("job-1", job_cgroup), ttl_s=600)
    assert pending.view is not None and pending.view.state == PENDING
    assert job_cgroup not in nft_table(kernel)

    (cgroups / job_cgroup).mkdir()
    result = reconciler.reconcile()
    assert "nftables table reloaded" in result.changes
    assert job_cgroup in nft_table(kernel)
    assert {v.name: v.state for v in reconciler.policies()}["job-1"] == ENFORCED
    # The class's HTB tree is untouched: a cgroup is classified by nftables alone.
    assert kernel.tree(DEVICE) == tree_before

    reconciler.delete_object("job-1")
    assert job_cgroup not in nft_table(kernel)
    assert kernel.tree(DEVICE) == tree_before


def test_assignment_to_unknown_policy_or_class_is_refused(
    reconciler: Reconciler, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    with pytest.raises(RefusedError, match="no policy named 'other'"):
        reconciler.apply_object(assignment("job-1", "x", policy="other"))
    with pytest.raises(RefusedError, match="has no class 'gold'"):
        reconciler.apply_object(assignment("job-1", "x", cls="gold"))
    assert reconciler.api.entries() == []


def test_kernel_refusal_rolls_back(reconciler: Reconciler, kernel: FakeKernel) -> None:
    # Someone else's root qdisc: the pass cannot take the interface over.
    kernel.add_foreign_root(SPARE, "htb", 1)
    before = kernel.dump()

    with pytest.raises(RefusedError) as refused:
        reconciler.apply_object(api_policy(SPARE))

    assert refused.value.problems[0].kind in {"KERNEL", "OWNERSHIP"}
    assert reconciler.api.entries() == []
    assert kernel.dump() == before
    assert kernel.foreign_root(SPARE) == ("htb", 1 << 16)


def test_a_change_the_kernel_refuses_half_way_leaves_the_previous_policy(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    reconciler.apply_object(api_policy(SPARE))
    before = kernel.tree(SPARE)
    kernel.fail_requests(lambda change: 22 if "class" in str(change) else None)

    with pytest.raises(RefusedError) as refused:
        reconciler.apply_object(api_policy(SPARE, rate="200Mbit"))

    assert refused.value.problems[0].kind == "KERNEL"
    assert "rolled back" in str(refused.value)
    assert kernel.tree(SPARE) == before
    entry = reconciler.api.get("job-net")
    assert entry is not None
    assert entry.document["spec"]["classes"][0]["rate"] == "300Mbit"


def test_api_policies_survive_a_restart_without_a_change(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        first.apply_object(api_policy(SPARE), ttl_s=600)
    finally:
        first.close()
    second = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = second.reconcile()
        assert result.changes == ()
        assert [v.name for v in second.policies()] == ["job-net"]
        assert second.policies()[0].expires_at is not None
    finally:
        second.close()


def test_fleet_and_local_api_objects_change_only_their_own(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        first.apply_object(api_policy(SPARE, name="fleet-net"), origin=ORIGIN_FLEET)
        before = kernel.tree(SPARE)

        with pytest.raises(RefusedError) as replacing:
            first.apply_object(api_policy(SPARE, name="fleet-net", rate="100Mbit"))
        with pytest.raises(RefusedError) as deleting:
            first.delete_object("fleet-net")
        with pytest.raises(RefusedError) as renewing:
            first.renew_lease("fleet-net", 60)

        for refused in (replacing, deleting, renewing):
            assert refused.value.problems[0].kind == "OWNERSHIP"
            assert "fleet aggregator" in str(refused.value)
        assert kernel.tree(SPARE) == before
        assert first.fleet_names() == {"fleet-net"}
        assert [v.source for v in first.policies()] == ["fleet"]
    finally:
        first.close()
    # The origin is persisted: after a restart the fleet still owns it.
    second = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        assert second.reconcile().changes == ()
        assert second.fleet_names() == {"fleet-net"}
        second.delete_object("fleet-net", origin=ORIGIN_FLEET)
        assert second.fleet_names() == set()
        assert kernel.tree(SPARE) is None
    finally:
        second.close()


def test_an_api_policy_whose_cgroup_vanished_keeps_its_tree_and_waits_for_the_cgroup(
    reconciler: Reconciler, kernel: FakeKernel, cgroups: Path, job_cgroup: str
) -> None:
    (cgroups / job_cgroup).mkdir()
    policy = api_policy(SPARE)
    classes = policy.spec.classes
    bulk = classes[0].model_copy(update={"match": (*classes[0].match, Match(cgroup=job_cgroup))})
    spec = policy.spec.model_copy(update={"classes": (bulk, *classes[1:])})
    reconciler.apply_object(policy.model_copy(update={"spec": spec}))
    tree = kernel.tree(SPARE)
    assert job_cgroup in nft_table(kernel)

    (cgroups / job_cgroup).rmdir()
    result = reconciler.reconcile()

    assert result.result == "success", result.errors
    assert kernel.tree(SPARE) == tree
    assert job_cgroup not in nft_table(kernel)
    (view,) = reconciler.policies()
    assert view.state == ENFORCED and f"waiting for cgroup {job_cgroup}" in view.message
