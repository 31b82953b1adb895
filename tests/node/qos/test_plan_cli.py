"""`fabric-agent policy plan`: kubectl-diff exit codes against a real kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.common.policy.model import load_policy_file
from agent.node.qos import tc
from agent.node.qos.desired import build_tree
from agent.node.qos.reconciler import QosSettings, Reconciler
from tests import ROOT
from tests.conftest import VethPair, VethTraffic

POLICY = """\
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: plan-test}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: rest
  classes:
    - name: bulk
      priority: 1
      rate: 300Mbit
      match:
        - {{dstPorts: ["5201"], protocol: tcp}}
    - {{name: rest, priority: 7, rate: 100Mbit}}
"""


def plan(netns: str, *files: Path, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    state = state or files[0].parent / "no-state"
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "agent", "policy",
         "plan", "--state-dir", str(state), *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def write_policy(tmp_path: Path, device: str, rate: str = "300Mbit") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(device=device).replace("300Mbit", rate))
    return path


def test_plan_shows_changes_then_none(shaped_pair: VethPair, tmp_path: Path) -> None:
    path = write_policy(tmp_path, shaped_pair.device)

    before = plan(shaped_pair.netns, path)
    (loaded,) = load_policy_file(path)
    tc.reconcile(build_tree(loaded.policy).tree, netns=shaped_pair.netns)
    after = plan(shaped_pair.netns, path)
    edited = plan(shaped_pair.netns, write_policy(tmp_path, shaped_pair.device, "400Mbit"))

    assert before.returncode == 1, before.stderr
    assert "+ qdisc fa: htb default 11" in before.stdout
    assert '+ class fa:10 "bulk" parent :1 rate 300Mbit ceil 1Gbit prio 1' in before.stdout
    assert "nftables table" not in before.stdout  # nothing here needs it
    assert after.returncode == 0, after.stdout + after.stderr
    assert ": no changes" in after.stdout
    assert edited.returncode == 1
    assert edited.stdout.count("\n  ~ ") == 1
    assert "rate 300Mbit -> 400Mbit" in edited.stdout


def test_foreign_root_qdisc_is_an_error(shaped_pair: VethPair, tmp_path: Path) -> None:
    subprocess.run(
        ["ip", "netns", "exec", shaped_pair.netns, "tc", "qdisc", "add", "dev",
         shaped_pair.device, "root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "32kbit",
         "latency", "400ms"],
        check=True, capture_output=True,
    )  # fmt: skip

    result = plan(shaped_pair.netns, write_policy(tmp_path, shaped_pair.device))

    assert result.returncode == 2
    assert "root qdisc is tbf 1:, not the agent's" in result.stderr
    assert "spec.takeOver: true" in result.stderr


def test_bad_policy_is_an_error(tmp_path: Path, shaped_pair: VethPair) -> None:
    path = write_policy(tmp_path, shaped_pair.device, "3Gbit")

    result = plan(shaped_pair.netns, path)

    assert result.returncode == 2
    assert f"{path}: spec.classes[0].rate: 3Gbit exceeds bandwidth 1Gbit" in result.stderr


def test_missing_interface_is_an_error(tmp_path: Path, shaped_pair: VethPair) -> None:
    result = plan(shaped_pair.netns, write_policy(tmp_path, "fabnosuch0"))

    assert result.returncode == 2
    assert "fabnosuch0: no such device" in result.stderr


def test_status_lists_every_class_with_its_throughput(
    shaped_pair: VethPair, veth_traffic: VethTraffic, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    text = write_policy(tmp_path, shaped_pair.device).read_text()
    # No cgroup entry: this test has no such cgroup to classify by.
    (policy_dir / "p.yaml").write_text(
        text.replace("        - {cgroup: system.slice/bulk.service}\n", "")
    )
    reconciler = Reconciler(QosSettings(policy_dir, tmp_path / "state", netns=shaped_pair.netns))
    assert reconciler.reconcile().result == "success"
    reconciler.close()
    veth_traffic.start()  # UDP to a port no class matches: the default class "rest"
    try:
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{shaped_pair.netns}", sys.executable, "-m", "agent",
             "policy", "status", "--state-dir", str(tmp_path / "state")],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        veth_traffic.stop()

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "POLICY", "DEVICE", "CLASS", "RATE", "CEIL", "THROUGHPUT", "DROPS", "OVERLIMITS",
    ]  # fmt: skip
    rows = {line.split()[2]: line.split() for line in lines[1:]}
    assert rows["bulk"][:5] == ["plan-test", shaped_pair.device, "bulk", "300Mbit", "1Gbit"]
    assert rows["bulk"][5] == "0bit/s"
    assert rows["rest"][5].endswith("bit/s") and rows["rest"][5] != "0bit/s"


def test_plan_covers_the_nftables_table_and_ingress(shaped_pair: VethPair, tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    remarked = POLICY.format(device=shaped_pair.device).replace(
        "      rate: 300Mbit\n", "      rate: 300Mbit\n      dscp: 26\n"
    )
    (policy_dir / "egress.yaml").write_text(remarked)
    ingress = POLICY.format(device=shaped_pair.device).replace(
        "direction: egress", "direction: ingress"
    )
    (policy_dir / "ingress.yaml").write_text(ingress.replace("plan-test", "plan-in"))
    files = sorted(policy_dir.iterdir())

    before = plan(shaped_pair.netns, *files, state=tmp_path / "state")
    reconciler = Reconciler(QosSettings(policy_dir, tmp_path / "state", netns=shaped_pair.netns))
    assert reconciler.reconcile().result == "success"
    reconciler.close()
    after = plan(shaped_pair.netns, *files, state=tmp_path / "state")

    assert before.returncode == 1, before.stderr
    assert (
        f"+ ingress redirect {shaped_pair.device} -> ifb-{shaped_pair.device} (IFB)"
        in before.stdout
    )
    assert "htb default 11" in before.stdout
    assert "nftables table inet fabric_agent: + load (" in before.stdout
    assert after.returncode == 0, after.stdout + after.stderr
    assert after.stdout.count(": no changes") == 2
    assert "nftables table" not in after.stdout
