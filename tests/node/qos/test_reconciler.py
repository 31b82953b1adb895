"""The reconciler against the fake kernel: apply only differences, correct drift, keep a
policy whose file turns bad as it was last applied, adopt its own state after a restart."""

from __future__ import annotations

from pathlib import Path

from agent.common.policy.model import load_policy_file
from agent.node.qos.desired import build_tree
from agent.node.qos.kernel import NFT_DEVICE
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import load_state
from tests.node.qos import DEVICE, fake_settings
from tests.node.qos.fake_kernel import FakeKernel

POLICY = """\
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: {name}}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: rest
  classes:
    - name: collectives
      priority: 0
      rate: {rate}
      dscp: 26
      match:
        - {{dstPorts: ["29500-29599"], protocol: tcp}}
    - name: storage
      priority: 2
      rate: 200Mbit
      match:
        - {{dstPorts: ["2049"]}}
    - {{name: rest, priority: 7, rate: 100Mbit}}
"""


def write(policy_dir: Path, device: str, *, rate: str = "500Mbit", name: str = "node") -> Path:
    path = policy_dir / f"{name}.yaml"
    path.write_text(POLICY.format(name=name, device=device, rate=rate))
    return path


def nft_body(kernel: FakeKernel) -> str:
    listing = kernel.read_nft_table()
    return "" if listing is None else str(listing)


def test_apply_then_nothing_to_do(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0], DEVICE)

    first = reconciler.reconcile()
    second = reconciler.reconcile()

    assert first.result == "success" and first.changes
    assert "node: + qdisc fa: htb default 12" in first.changes
    assert "nftables table reloaded" in first.changes
    assert second.result == "success" and second.changes == ()
    (loaded,) = load_policy_file(path)
    expected = build_tree(loaded.policy, leaf_kind=kernel.capabilities().leaf_kind).tree
    assert kernel.tree(DEVICE) == expected
    assert "ip dscp set 26" in nft_body(kernel)
    assert load_state(dirs[1]).policies["node"].minors == {
        "collectives": 0x10, "storage": 0x11, "rest": 0x12,
    }  # fmt: skip
    assert reconciler.results["success"] == 2


def test_one_class_edit_changes_one_class(reconciler: Reconciler, dirs: tuple[Path, Path]) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    write(dirs[0], DEVICE, rate="400Mbit")
    result = reconciler.reconcile()

    tc_changes = [c for c in result.changes if c.startswith("node: ")]
    assert len(tc_changes) == 1
    assert tc_changes[0].startswith('node: ~ class fa:10 "collectives" rate 500Mbit -> 400Mbit')
    assert reconciler.drift == {}


def test_drift_is_corrected_and_counted(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    for pref in (102, 103):  # the storage class's IPv4 and IPv6 filters
        kernel.delete_filter(DEVICE, pref)
    kernel.delete_class(DEVICE, 0x11)
    kernel.delete_nft_table()

    result = reconciler.reconcile()

    assert result.result == "success"
    assert result.drift == {DEVICE: 1, NFT_DEVICE: 1}
    assert reconciler.reconcile().changes == ()
    assert reconciler.drift == {DEVICE: 1, NFT_DEVICE: 1}
    tree = kernel.tree(DEVICE)
    assert tree is not None and 0x11 in {c.minor for c in tree.classes}


def test_a_bad_edit_keeps_the_policy_as_last_applied_and_marks_it_failed(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    before = kernel.dump()
    state = (dirs[1] / "qos-state.json").read_text()

    write(dirs[0], DEVICE, rate="2Gbit")
    result = reconciler.reconcile()

    assert result.result == "invalid"
    assert [str(v) for v in result.violations] == [
        f"{dirs[0] / 'node.yaml'}: spec.classes[0].rate: 2Gbit exceeds bandwidth 1Gbit"
    ]
    assert kernel.dump() == before
    assert (dirs[1] / "qos-state.json").read_text() == state
    assert reconciler.results["invalid"] == 1
    (view,) = reconciler.policies()
    assert view.state == "failed" and "2Gbit exceeds bandwidth 1Gbit" in view.message


def test_restart_adopts_the_kernel_state(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    first.reconcile()
    first.close()
    applied = len(kernel.steps)

    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = restarted.reconcile()
    finally:
        restarted.close()

    assert result.result == "success" and result.changes == ()
    assert len(kernel.steps) == applied


def test_removed_policy_is_taken_down(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0], DEVICE)
    reconciler.reconcile()

    path.unlink()
    result = reconciler.reconcile()

    assert "node: removed from " + DEVICE in result.changes
    assert kernel.tree(DEVICE) is None
    assert kernel.read_nft_table() is None
    assert load_state(dirs[1]).policies == {}


def test_foreign_root_qdisc_is_an_error_and_left_alone(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    kernel.add_foreign_root(DEVICE, "tbf")
    write(dirs[0], DEVICE)

    result = reconciler.reconcile()

    assert result.result == "error"
    assert "root qdisc is tbf " in result.errors[0] and "not the agent's" in result.errors[0]
    assert kernel.tree(DEVICE) is None
    assert kernel.foreign_root(DEVICE) == ("tbf", 5 << 16)
    assert {v.name: v.state for v in reconciler.policies()}["node"] == "failed"


def test_remove_all(reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    reconciler.remove_all()

    assert kernel.tree(DEVICE) is None
    assert kernel.read_nft_table() is None
    assert load_state(dirs[1]).policies == {}


def test_a_policy_moved_to_another_interface_leaves_nothing_on_the_old_one(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    kernel.add_interface("fab9")

    write(dirs[0], "fab9")
    result = reconciler.reconcile()

    assert result.result == "success"
    assert kernel.tree(DEVICE) is None
    assert kernel.tree("fab9") is not None
    assert load_state(dirs[1]).policies["node"].device == "fab9"
