"""Kernel changes that never unshape and leave nothing behind: a failed first apply
leaves no tree, IFB or redirect; `defaultClass` changes with traffic flowing and no
moment unshaped; a cgroup that vanishes costs only its own nftables rule. Real
namespaces, veth pairs, HTB, nftables and iperf3 where the claim is about the kernel."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.node.qos.htb import Phase
from agent.node.qos.kernel import (
    KernelStep,
    TcApplyError,
    TcCapabilities,
    TreeChanges,
    ifb_name,
)
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import load_state
from tests.conftest import VethPair
from tests.node.qos import DEVICE, api_policy_document, fake_settings, make
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


# --- a failed apply leaves no residue ---------------------------------------------------


class RollbackFails(FakeKernel):
    """A kernel that creates the root qdisc, then refuses a class and cannot roll back
    (the device's state changed under the rollback): the root stays."""

    def apply(self, step: KernelStep) -> None:
        if isinstance(step, TreeChanges) and step.before is None:
            root = next(c for c in step.changes if c.phase is Phase.ROOT)
            super().apply(TreeChanges(step.device, (root,), None))
            cls = next(c for c in step.changes if c.phase is Phase.CLASS)
            raise TcApplyError(cls, 22, "Invalid argument", "Device or resource busy")
        super().apply(step)


def test_a_tree_left_by_a_failed_first_apply_is_removed(
    dirs: tuple[Path, Path], cgroups: Path
) -> None:
    kernel = RollbackFails([DEVICE])
    reconciler = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        write(dirs[0], DEVICE)
        result = reconciler.reconcile()
    finally:
        reconciler.close()

    assert result.result == "error" and "rollback failed too" in result.errors[0]
    assert kernel.tree(DEVICE) is None


def _links(pair: VethPair) -> str:
    return _run("ip", "-n", pair.netns, "-o", "link", "show")


def _qdiscs(pair: VethPair) -> str:
    return _run("ip", "netns", "exec", pair.netns, "tc", "qdisc", "show")


def test_an_ingress_policy_the_kernel_refuses_leaves_no_ifb_redirect_or_tree(
    shaped_pair: VethPair, tc_capabilities: TcCapabilities, tmp_path: Path
) -> None:
    if not (tc_capabilities.ifb and tc_capabilities.mirred):
        pytest.skip("kernel cannot redirect ingress to an IFB")
    if tc_capabilities.fq_codel:
        pytest.skip("kernel has fq_codel: the leaf qdisc this test relies on being refused")
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    reconciler = make(shaped_pair, dirs)
    # The kernel's own refusal, half way through the tree: its leaf qdisc kind is missing.
    claimed = dataclasses.replace(tc_capabilities, fq_codel=True)
    reconciler.kernel.capabilities = lambda: claimed  # type: ignore[method-assign]
    ifb = ifb_name(shaped_pair.device)
    path = dirs[0] / "in.yaml"
    path.write_text(yaml.safe_dump(api_policy_document(shaped_pair.device, direction="ingress")))
    try:
        result = reconciler.reconcile()
        after_failure = (_links(shaped_pair), _qdiscs(shaped_pair))
        path.unlink()
        reconciler.reconcile()
        after_removal = (_links(shaped_pair), _qdiscs(shaped_pair))
    finally:
        reconciler.close()

    assert result.result == "error" and "fq_codel" in result.errors[0]
    for links, qdiscs in (after_failure, after_removal):
        assert f" {ifb}:" not in links
        assert "ingress ffff:" not in qdiscs and "htb fa:" not in qdiscs
    assert load_state(dirs[1]).policies == {}
