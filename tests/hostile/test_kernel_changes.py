"""Kernel changes that never unshape and leave nothing behind: a failed first apply
leaves no tree, IFB or redirect; `defaultClass` changes with traffic flowing and no
moment unshaped; a cgroup that vanishes costs only its own nftables rule. Real
namespaces, veth pairs, HTB, nftables and iperf3 where the claim is about the kernel."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.common.policy.model import detect_cgroup2_root
from agent.node.qos.htb import Phase
from agent.node.qos.kernel import (
    KernelStep,
    NftError,
    TcApplyError,
    TcCapabilities,
    TreeChanges,
    ifb_name,
)
from agent.node.qos.nftables import Nftables
from agent.node.qos.nftrules import NFT_CGROUP_BASE, TABLE_FAMILY, TABLE_NAME
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import load_state
from tests.conftest import VethPair, iperf3_intervals
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


# --- defaultClass changes with traffic flowing ------------------------------------------

MBIT = 1_000_000


def _default_class_policy(device: str, default: str, *, with_fast: bool = True) -> str:
    document = api_policy_document(device, name="shaped", defaultClass=default)
    document["spec"]["classes"] = [
        {"name": "unused", "priority": 0, "rate": "10Mbit", "ceil": "10Mbit",
         "match": [{"dstPorts": ["9"]}]},
        {"name": "slow", "priority": 1, "rate": "40Mbit", "ceil": "40Mbit"},
        {"name": "fast", "priority": 2, "rate": "80Mbit", "ceil": "80Mbit"},
    ][: 3 if with_fast else 2]  # fmt: skip
    return yaml.safe_dump(document)


def test_default_class_changes_with_a_flow_running_and_no_moment_unshaped(
    shaped_pair: VethPair, tmp_path: Path
) -> None:
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    path = dirs[0] / "shaped.yaml"
    path.write_text(_default_class_policy(shaped_pair.device, "slow"))
    reconciler = make(shaped_pair, dirs)
    stats = reconciler.kernel.class_stats
    rates: list[float] = []
    try:
        assert reconciler.reconcile().result == "success"
        (policy,) = reconciler.managed
        slow, fast = policy.minors["slow"], policy.minors["fast"]
        flow = threading.Thread(target=lambda: rates.extend(iperf3_intervals(shaped_pair, 7, 0.25)))
        flow.start()
        time.sleep(2.5)  # the flow runs in "slow"
        path.write_text(_default_class_policy(shaped_pair.device, "fast"))
        to_fast = reconciler.reconcile()
        at_fast = stats(shaped_pair.device)
        again = reconciler.reconcile()
        time.sleep(2.0)  # the flow runs in "fast"
        # Back to "slow", and "fast" (the default the flow is in) deleted with it.
        path.write_text(_default_class_policy(shaped_pair.device, "slow", with_fast=False))
        at_slow = stats(shaped_pair.device)
        to_slow = reconciler.reconcile()
        flow.join()
        at_end = stats(shaped_pair.device)
    finally:
        reconciler.close()

    assert to_fast.result == "success", to_fast.errors
    assert to_slow.result == "success", to_slow.errors
    assert again.changes == ()
    # Shaped throughout: no interval above the higher ceiling (80 Mbit/s) by more than
    # what bursts and quarter-second sampling add; unshaped, a veth carries gigabits.
    assert len(rates) >= 24 and max(rates) < 80 * 1.5, rates
    # Held to "slow" before the first change and after the second.
    assert max(rates[2:8]) < 40 * 1.5 and max(rates[-4:]) < 40 * 1.5, rates
    assert at_slow[fast].bytes - at_fast[fast].bytes > 10 * MBIT // 8
    assert at_slow[slow].bytes - at_fast[slow].bytes < MBIT // 8
    assert fast not in at_end
    assert at_end[slow].bytes - at_slow[slow].bytes > 10 * MBIT // 8


# --- a cgroup that vanishes -------------------------------------------------------------


def _cgroup_policy(device: str, cgroup: str) -> str:
    document = api_policy_document(device, name="node")
    document["spec"]["classes"] = [
        {"name": "service", "priority": 1, "rate": "100Mbit", "dscp": 10,
         "match": [{"cgroup": cgroup}]},
        {"name": "collectives", "priority": 0, "rate": "300Mbit", "dscp": 26,
         "match": [{"dstPorts": ["29500-29599"], "protocol": "tcp"}]},
        {"name": "rest", "priority": 7, "rate": "100Mbit"},
    ]  # fmt: skip
    return yaml.safe_dump(document)


def test_a_vanished_cgroup_costs_only_its_own_rule_and_it_returns_with_the_cgroup(
    shaped_pair: VethPair, tmp_path: Path
) -> None:
    cgroup_root = detect_cgroup2_root()
    if cgroup_root is None or not cgroup_root.is_relative_to(NFT_CGROUP_BASE):
        pytest.skip("needs a cgroup v2 mount at or below /sys/fs/cgroup")
    try:
        Nftables().close()
    except NftError as exc:
        pytest.skip(f"needs libnftables: {exc}")
    service = cgroup_root / f"fabric-hostile-{uuid.uuid4().hex[:8]}"
    service.mkdir()
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    (dirs[0] / "node.yaml").write_text(_cgroup_policy(shaped_pair.device, service.name))
    reconciler = make(shaped_pair, dirs)
    netns = ["nsenter", f"--net=/run/netns/{shaped_pair.netns}"]
    try:
        reconciler.reconcile()
        with_service = json.dumps(reconciler.kernel.read_nft_table())
        service.rmdir()  # the service stopped
        # A firewall reload flushes the table behind the agent's back.
        subprocess.run([*netns, "nft", "delete", "table", TABLE_FAMILY, TABLE_NAME], check=True)
        without = reconciler.reconcile()
        table_without = json.dumps(reconciler.kernel.read_nft_table())
        listed = {v.name: v for v in reconciler.policies()}["node"]
        service.mkdir()  # the service started again
        back = reconciler.reconcile()
        table_back = json.dumps(reconciler.kernel.read_nft_table())
    finally:
        reconciler.close()
        if service.exists():
            service.rmdir()

    assert "cgroupv2" in with_service
    assert without.result == "success", without.errors
    assert table_without != "null" and "cgroupv2" not in table_without
    assert '"af31"' in table_without  # DSCP 26: the other class still remarks
    assert listed.state == "enforced" and f"waiting for cgroup {service.name}" in listed.message
    assert back.result == "success", back.errors
    assert "nftables table reloaded" in back.changes
    assert service.name in table_back
