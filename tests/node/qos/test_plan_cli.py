"""`fabric-agent policy plan`: kubectl-diff exit codes against a real kernel."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import pytest

from agent.common.policy.documents import encode_document
from agent.common.policy.model import detect_cgroup2_root, load_policy_file
from agent.node.qos.desired import build_tree
from agent.node.qos.pipeline import QosSettings
from agent.node.qos.reconciler import Reconciler
from agent.proto.fabric.v1 import qos_service_pb2 as pb
from agent.proto.fabric.v1.qos_service_pb2_grpc import QosServiceStub
from tests import ROOT
from tests.conftest import VethPair, VethTraffic
from tests.node.qos import api_policy_document, assignment_document, netlink_put

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


def plan(
    netns: str,
    *files: Path,
    state: Path | None = None,
    policy_dir: Path | None = None,
    options: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`fabric-agent policy plan` in the namespace: of `files`, or of `policy_dir`."""
    state = state or (files[0] if files else Path("/nonexistent")).parent / "no-state"
    where = ["--policy-dir", str(policy_dir)] if policy_dir is not None else []
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "agent", "policy",
         "plan", "--state-dir", str(state), *where, *options, *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def add_tbf_root(pair: VethPair) -> None:
    """Someone else's root qdisc (tbf 1:) on the pair's device."""
    subprocess.run(
        ["ip", "netns", "exec", pair.netns, "tc", "qdisc", "add", "dev", pair.device, "root",
         "handle", "1:", "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"],
        check=True, capture_output=True,
    )  # fmt: skip


def write_policy(tmp_path: Path, device: str, rate: str = "300Mbit") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(device=device).replace("300Mbit", rate))
    return path


def test_plan_shows_changes_then_none(shaped_pair: VethPair, tmp_path: Path) -> None:
    path = write_policy(tmp_path, shaped_pair.device)

    before = plan(shaped_pair.netns, path)
    (loaded,) = load_policy_file(path)
    netlink_put(build_tree(loaded.policy).tree, shaped_pair.netns)
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
    add_tbf_root(shaped_pair)

    result = plan(shaped_pair.netns, write_policy(tmp_path, shaped_pair.device))

    assert result.returncode == 2
    assert "root qdisc is tbf 1:, not the agent's" in result.stderr
    assert "spec.takeOver: true" in result.stderr


def test_bad_policy_is_an_error(tmp_path: Path, shaped_pair: VethPair) -> None:
    path = write_policy(tmp_path, shaped_pair.device, "3Gbit")

    result = plan(shaped_pair.netns, path)

    assert result.returncode == 2
    assert f"{path}: spec.classes[0].rate: 3Gbit exceeds bandwidth 1Gbit" in result.stderr


def test_a_bad_file_is_an_error_and_the_others_are_still_planned(
    tmp_path: Path, shaped_pair: VethPair
) -> None:
    good = write_policy(tmp_path, shaped_pair.device)
    bad = tmp_path / "broken.yaml"
    bad.write_text("spec: [\n")

    result = plan(shaped_pair.netns, bad, good)

    # As the daemon would: the broken file refused by itself, the other one enforced.
    assert result.returncode == 2
    assert f"{bad}:2:1: not valid YAML" in result.stderr
    assert "+ qdisc fa: htb default 11" in result.stdout


def test_missing_interface_is_an_error(tmp_path: Path, shaped_pair: VethPair) -> None:
    result = plan(shaped_pair.netns, write_policy(tmp_path, "fabnosuch0"))

    # Refused as the daemon refuses it: the policy names no interface of this host.
    assert result.returncode == 2
    assert "spec.interface: unknown interface 'fabnosuch0' on this host" in result.stderr


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
    reconciler = Reconciler(
        QosSettings(policy_dir, tmp_path / "state", netns=shaped_pair.netns, file_settle_s=0.0)
    )
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
    reconciler = Reconciler(
        QosSettings(policy_dir, tmp_path / "state", netns=shaped_pair.netns, file_settle_s=0.0)
    )
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


REMARKED_CLASSES = """\
    - name: collectives
      priority: 0
      rate: 300Mbit
      dscp: 26
      match:
        - {dstPorts: ["29500-29599"], protocol: tcp}
"""


def test_plan_of_a_node_the_daemon_enforces_is_empty(shaped_pair: VethPair, tmp_path: Path) -> None:
    """A file policy (with nftables rules), an API policy and an assignment whose cgroup
    exists, enforced by the running daemon: its plan path and `policy plan` agree."""
    cgroup_root = detect_cgroup2_root()
    if cgroup_root is None:
        pytest.skip("needs a cgroup v2 mount")
    netns, device = shaped_pair.netns, shaped_pair.device
    spare = f"{device[:11]}-sp"
    subprocess.run(["ip", "-n", netns, "link", "add", spare, "type", "veth", "peer", "name",
                    f"{spare}x"], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", netns, "link", "set", spare, "up"], check=True)
    job = cgroup_root / f"fabric-plan-{uuid.uuid4().hex[:8]}"
    job.mkdir()
    policy_dir, state_dir = tmp_path / "policies", tmp_path / "state"
    policy_dir.mkdir()
    (policy_dir / "node.yaml").write_text(
        POLICY.format(device=device).replace("  classes:\n", "  classes:\n" + REMARKED_CLASSES)
    )
    socket_dir = tempfile.mkdtemp(prefix="fabric-plan-")
    log = (tmp_path / "agent.log").open("wb")
    daemon = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "agent", "run",
         "--collectors", "host", "--metrics-listen", "127.0.0.1:0", "--grpc-listen", "none",
         "--grpc-socket", f"{socket_dir}/agent.sock", "--policy-dir", str(policy_dir),
         "--state-dir", str(state_dir), "--reconcile-interval", "1s"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    channel = grpc.insecure_channel(f"unix:{socket_dir}/agent.sock")
    stub = QosServiceStub(channel)
    try:
        _wait_for(lambda: _states(stub) == {"plan-test": pb.POLICY_STATE_ENFORCED}, daemon)
        api_policy = api_policy_document(spare, name="job-net")
        assignment = assignment_document(
            "slurm-job-7", str(job.relative_to(cgroup_root)), "plan-test", "collectives"
        )
        for document in (api_policy, assignment):
            stub.ApplyPolicy(pb.ApplyPolicyRequest(object=encode_document(document)))
        enforced = pb.POLICY_STATE_ENFORCED
        _wait_for(lambda: set(_states(stub).values()) == {enforced} and len(_states(stub)) == 3,
                  daemon)  # fmt: skip

        result = plan(netns, state=state_dir, policy_dir=policy_dir)

        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(": no changes") == 2  # the file policy and the API one
        assert "nftables table" not in result.stdout
        assert "(API) on " + spare in result.stdout
    finally:
        channel.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        shutil.rmtree(socket_dir, ignore_errors=True)
        job.rmdir()


def _states(stub: QosServiceStub) -> dict[str, int]:
    try:
        listed = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=2)
    except grpc.RpcError:
        return {}
    return {p.name: p.state for p in listed.policies}


def _wait_for(condition: Callable[[], bool], daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert daemon.poll() is None, "the agent died"
        assert time.monotonic() < deadline, "not enforced within 30 s"
        time.sleep(0.1)


def test_plan_takes_over_and_finds_cgroups_as_told(shaped_pair: VethPair, tmp_path: Path) -> None:
    add_tbf_root(shaped_pair)
    path = write_policy(tmp_path, shaped_pair.device)
    cgroups = tmp_path / "cgroups"
    (cgroups / "jobs" / "7").mkdir(parents=True)
    with_cgroup = tmp_path / "cgroup.yaml"
    with_cgroup.write_text(
        path.read_text().replace('{dstPorts: ["5201"], protocol: tcp}', "{cgroup: jobs/7}")
    )

    refused = plan(shaped_pair.netns, path)
    taken_over = plan(shaped_pair.netns, path, options=["--take-over", "true"])
    elsewhere = plan(shaped_pair.netns, with_cgroup, options=["--cgroup-root", str(tmp_path)])
    found = plan(shaped_pair.netns, with_cgroup, options=["--cgroup-root", str(cgroups)])

    assert refused.returncode == 2 and "root qdisc is tbf 1:" in refused.stderr
    assert taken_over.returncode == 1, taken_over.stderr
    assert "+ qdisc fa: htb default 11" in taken_over.stdout
    # A missing cgroup costs only its own nftables rule, which waits for it.
    assert elsewhere.returncode == 2
    assert "waiting for cgroup jobs/7 (class bulk)" in elsewhere.stderr
    assert found.returncode == 2 and "waiting for cgroup" not in found.stderr
