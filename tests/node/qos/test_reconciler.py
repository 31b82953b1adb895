"""The reconciler against a real kernel: apply only differences, correct drift, reject bad
policies without touching what is enforced, adopt its own state after a restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.common.policy.model import load_policy_file
from agent.node.qos import tc
from agent.node.qos.desired import build_tree
from agent.node.qos.reconciler import NFT_DEVICE, Reconciler
from agent.node.qos.state import load_state
from tests.conftest import VethPair
from tests.node.qos import make

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


def ip_netns(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], check=True, capture_output=True, text=True
    ).stdout


def test_apply_then_nothing_to_do(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0], shaped_pair.device)

    first = reconciler.reconcile()
    second = reconciler.reconcile()

    assert first.result == "success" and first.changes
    assert "node: + qdisc fa: htb default 12" in first.changes
    assert "nftables table reloaded" in first.changes
    assert second.result == "success" and second.changes == ()
    (loaded,) = load_policy_file(path)
    expected = build_tree(loaded.policy, leaf_kind=reconciler._leaf_kind()).tree
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) == expected
    assert "ip dscp set af31" in ip_netns(shaped_pair.netns, "nft", "list", "ruleset")  # 26
    assert load_state(dirs[1]).policies["node"].minors == {
        "collectives": 0x10, "storage": 0x11, "rest": 0x12,
    }  # fmt: skip
    assert reconciler.results["success"] == 2


def test_one_class_edit_changes_one_class(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()

    write(dirs[0], shaped_pair.device, rate="400Mbit")
    result = reconciler.reconcile()

    tc_changes = [c for c in result.changes if c.startswith("node: ")]
    assert len(tc_changes) == 1
    assert tc_changes[0].startswith('node: ~ class fa:10 "collectives" rate 500Mbit -> 400Mbit')
    assert reconciler.drift == {}


def test_drift_is_corrected_and_counted(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()
    netns, device = shaped_pair.netns, shaped_pair.device
    for pref in ("102", "103"):  # the storage class's IPv4 and IPv6 filters
        ip_netns(netns, "tc", "filter", "del", "dev", device, "parent", "fa:", "pref", pref)
    ip_netns(netns, "tc", "class", "del", "dev", device, "classid", "fa:11")
    ip_netns(netns, "nft", "delete", "table", "inet", "fabric_agent")

    result = reconciler.reconcile()

    assert result.result == "success"
    assert result.drift == {device: 1, NFT_DEVICE: 1}
    assert reconciler.reconcile().changes == ()
    assert reconciler.drift == {device: 1, NFT_DEVICE: 1}
    assert "fa:11" in ip_netns(netns, "tc", "class", "show", "dev", device)


def test_bad_policy_changes_nothing(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()
    before = ip_netns(shaped_pair.netns, "tc", "-d", "class", "show", "dev", shaped_pair.device)
    state = (dirs[1] / "qos-state.json").read_text()

    write(dirs[0], shaped_pair.device, rate="2Gbit")
    result = reconciler.reconcile()

    assert result.result == "invalid"
    assert [str(v) for v in result.violations] == [
        f"{dirs[0] / 'node.yaml'}: spec.classes[0].rate: 2Gbit exceeds bandwidth 1Gbit"
    ]
    assert (
        ip_netns(shaped_pair.netns, "tc", "-d", "class", "show", "dev", shaped_pair.device)
        == before
    )
    assert (dirs[1] / "qos-state.json").read_text() == state
    assert reconciler.results["invalid"] == 1


def test_restart_adopts_the_kernel_state(shaped_pair: VethPair, dirs: tuple[Path, Path]) -> None:
    write(dirs[0], shaped_pair.device)
    first = make(shaped_pair, dirs)
    first.reconcile()
    first.close()

    restarted = make(shaped_pair, dirs)
    try:
        result = restarted.reconcile()
    finally:
        restarted.close()

    assert result.result == "success" and result.changes == ()


def test_removed_policy_is_taken_down(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    path = write(dirs[0], shaped_pair.device)
    reconciler.reconcile()

    path.unlink()
    result = reconciler.reconcile()

    assert "node: removed from " + shaped_pair.device in result.changes
    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) is None
    assert "fabric_agent" not in ip_netns(shaped_pair.netns, "nft", "list", "tables")
    assert load_state(dirs[1]).policies == {}


def test_foreign_root_qdisc_is_an_error_and_left_alone(
    reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]
) -> None:
    tbf = ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"]
    ip_netns(shaped_pair.netns, "tc", "qdisc", "add", "dev", shaped_pair.device, "root", *tbf)
    write(dirs[0], shaped_pair.device)

    result = reconciler.reconcile()

    assert result.result == "error"
    assert "root qdisc is tbf " in result.errors[0] and "not the agent's" in result.errors[0]
    assert "tbf" in ip_netns(shaped_pair.netns, "tc", "qdisc", "show", "dev", shaped_pair.device)


def test_remove_all(reconciler: Reconciler, shaped_pair: VethPair, dirs: tuple[Path, Path]) -> None:
    write(dirs[0], shaped_pair.device)
    reconciler.reconcile()

    reconciler.remove_all()

    assert tc.read_tree(shaped_pair.device, netns=shaped_pair.netns) is None
    assert "fabric_agent" not in ip_netns(shaped_pair.netns, "nft", "list", "tables")
    assert load_state(dirs[1]).policies == {}
