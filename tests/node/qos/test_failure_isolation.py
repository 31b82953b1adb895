"""What a policy or API object that cannot be put in place keeps, and what it cannot take
from the others: dry runs refuse what applying refuses; a policy that cannot be built,
moved or renamed keeps its tree and its nftables rules; a failed policy gains no rules;
an API policy cannot take another's IFB; an unusable cgroup is a refusal, not a stalled
loop; a vanished interface leaves nothing behind. Fake kernel unless the claim is about
the kernel itself (then a throwaway namespace)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.common.errors import FabricError
from agent.common.policy import model
from agent.common.policy.model import PolicyError
from agent.node.qos.api_objects import ENFORCED, RefusedError
from agent.node.qos.kernel import RemoveTree, TcCapabilities, ifb_name
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import load_state
from tests.conftest import VethPair
from tests.node.qos import (
    DEVICE,
    SPARE,
    api_policy,
    assignment,
    make,
)
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write


def nft_text(kernel: FakeKernel) -> str:
    return json.dumps(kernel.read_nft_table())


# --- 1. dry runs that say "no changes" for what apply refuses --------------------------


def test_plan_and_validate_only_refuse_what_apply_refuses(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    kernel.add_foreign_root(SPARE, "tbf")
    policy = api_policy(SPARE)
    with pytest.raises(RefusedError):
        reconciler.apply_object(policy)

    with pytest.raises(FabricError):
        reconciler.plan_object(policy)
    with pytest.raises(FabricError):
        reconciler.apply_object(policy, validate_only=True)


# --- 2. a policy that cannot be built loses what it had ---------------------------------


def _ports(count: int) -> str:
    return ", ".join(f'"{1000 + i}"' for i in range(count))


def test_a_policy_that_cannot_be_built_keeps_its_applied_tree(
    reconciler: Reconciler,
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write(dirs[0], DEVICE)
    reconciler.reconcile()
    enforced = kernel.tree(DEVICE)
    table = nft_text(kernel)
    # 181 x 181 port pairs x 2 families: more filters than there are prefs. Validation
    # refuses it; with validation's limits lifted, building it is what fails.
    monkeypatch.setattr(model, "MAX_U32_FILTERS_PER_CLASS", 10**9)
    monkeypatch.setattr(model, "MAX_U32_FILTERS_PER_POLICY", 10**9)
    many = f"{{srcPorts: [{_ports(181)}], dstPorts: [{_ports(181)}]}}"
    path.write_text(path.read_text().replace('{dstPorts: ["2049"]}', many))

    first = reconciler.reconcile()
    second = reconciler.reconcile()

    assert any("cannot be built" in error for error in first.errors)
    assert kernel.tree(DEVICE) == enforced
    assert nft_text(kernel) == table
    assert second.changes == ()


# --- 3. a policy moved to an interface where it fails loses its old tree ---------------


def test_a_move_that_fails_keeps_the_policy_where_it_was(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    enforced = kernel.tree(DEVICE)
    kernel.add_interface("fab9")
    kernel.add_foreign_root("fab9", "tbf")

    write(dirs[0], "fab9")
    first = reconciler.reconcile()
    second = reconciler.reconcile()

    assert "root qdisc is tbf" in first.errors[0]
    assert kernel.tree(DEVICE) == enforced
    assert second.changes == ()


def test_a_refused_api_move_does_not_tear_down_the_enforced_tree(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    reconciler.apply_object(api_policy(SPARE))
    kernel.add_interface("fab9")
    kernel.add_foreign_root("fab9", "tbf")
    steps = len(kernel.steps)

    with pytest.raises(RefusedError):
        reconciler.apply_object(api_policy("fab9"))

    assert not [s for s in kernel.steps[steps:] if isinstance(s, RemoveTree)]


# --- 4. a rename whose new name fails orphans the tree ----------------------------------


def test_a_tree_kept_for_a_failed_rename_is_still_removed_later(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    old = write(dirs[0], DEVICE)
    reconciler.reconcile()
    old.unlink()
    new = write(dirs[0], DEVICE, name="node2", rate="400Mbit")
    kernel.fail_requests(lambda change: 1)  # EPERM for every tree change
    assert reconciler.reconcile().result == "error"
    kernel.fail_requests(None)

    new.unlink()
    reconciler.reconcile()

    assert kernel.tree(DEVICE) is None


# --- 5. an API policy on the agent's own IFB device ----------------------------------


def test_an_api_policy_cannot_take_the_ifb_of_a_file_ingress_policy(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0], DEVICE)
    path.write_text(path.read_text().replace("direction: egress", "direction: ingress"))
    reconciler.reconcile()
    ifb = ifb_name(DEVICE)
    enforced = kernel.tree(ifb)

    with pytest.raises(RefusedError):
        reconciler.apply_object(api_policy(ifb))

    for _ in range(2):
        reconciler.reconcile()
    assert kernel.tree(ifb) == enforced
    assert reconciler.drift == {}


# --- 6. a cgroup component longer than NAME_MAX --------------------------------------

LONG_CGROUP = "job-" + "x" * 300


def test_an_overlong_cgroup_in_a_file_is_a_violation_not_a_stalled_loop(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    reconciler.apply_object(api_policy(SPARE), ttl_s=1.0)
    bad = write(dirs[0], DEVICE, name="other")
    text = bad.read_text().replace("direction: egress", "direction: ingress")
    bad.write_text(text.replace('{dstPorts: ["2049"]}', f"{{cgroup: {LONG_CGROUP}}}"))
    time.sleep(1.1)

    result = reconciler.reconcile()

    assert result.result == "invalid"
    assert kernel.tree(SPARE) is None  # the lease ran out and its policy went


def test_an_overlong_cgroup_in_an_assignment_is_refused_not_an_oserror(
    reconciler: Reconciler, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    with pytest.raises((PolicyError, RefusedError)):
        reconciler.apply_object(assignment("job-1", LONG_CGROUP))


# --- 7. one assignment nft cannot express breaks the table for everyone ---------------


def test_an_assignment_nft_cannot_express_is_refused_and_harms_no_other(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    (cgroups / 'job"1').mkdir()
    (cgroups / "job-2").mkdir()

    # Refused as the document it is, whichever way it comes in.
    with pytest.raises(PolicyError, match="cannot be matched by nft"):
        assignment("job-1", 'job"1')

    outcome = reconciler.apply_object(assignment("job-2", "job-2", cls="storage"))
    assert outcome.view is not None and outcome.view.state == ENFORCED
    assert "job-2" in nft_text(kernel)
    reconciler.apply_object(api_policy(SPARE))


# --- 8. a failed policy's nftables rules are loaded -------------------------------------


def test_a_policy_that_failed_gets_no_dscp_remarking(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    kernel.add_foreign_root(DEVICE, "tbf")
    write(dirs[0], DEVICE)

    result = reconciler.reconcile()

    assert result.result == "error"
    assert {v.name: v.state for v in reconciler.policies()}["node"] == "failed"
    assert "dscp set" not in nft_text(kernel)


# --- 9. an interface that goes away (real kernel) --------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def test_an_ingress_policy_whose_interface_vanished_leaves_no_ifb(
    veth_pair: VethPair, tc_capabilities: TcCapabilities, tmp_path: Path
) -> None:
    if not (tc_capabilities.htb and tc_capabilities.ifb and tc_capabilities.mirred):
        pytest.skip("kernel cannot redirect ingress to an IFB")
    job_if = veth_pair.device + "j"  # a job's interface, e.g. a pod's veth
    _ip("-n", veth_pair.netns, "link", "add", job_if, "type", "veth", "peer", "name", job_if + "p")
    _ip("-n", veth_pair.netns, "link", "set", job_if, "up")
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    reconciler = make(veth_pair, dirs)
    try:
        reconciler.apply_object(api_policy(job_if, direction="ingress"))
        ifb = ifb_name(job_if)
        links = subprocess.run(
            ["ip", "-n", veth_pair.netns, "-o", "link", "show"], capture_output=True, text=True
        ).stdout
        assert f" {ifb}:" in links

        _ip("-n", veth_pair.netns, "link", "del", job_if)
        first = reconciler.reconcile()
        second = reconciler.reconcile()

        links = subprocess.run(
            ["ip", "-n", veth_pair.netns, "-o", "link", "show"], capture_output=True, text=True
        ).stdout
        assert f" {ifb}:" not in links
        assert second.result == "success", (first.errors, second.errors)
        assert load_state(dirs[1]).policies == {}
    finally:
        reconciler.close()


def test_a_new_policy_the_kernel_refuses_as_it_is_applied_gets_no_rules(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    kernel.fail_requests(lambda change: 1)  # EPERM for every tree change
    write(dirs[0], DEVICE)

    result = reconciler.reconcile()

    assert result.result == "error" and "rolled back" in result.errors[0]
    assert kernel.tree(DEVICE) is None
    assert "dscp set" not in nft_text(kernel)
