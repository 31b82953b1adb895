"""The agent's nftables table: rendered from policies, loaded into a namespace, and
checked with real traffic (cgroup classification into HTB, DSCP seen by the receiver)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from agent.common.policy.model import (
    LoadedPolicy,
    QosPolicy,
    check_host,
    detect_cgroup2_root,
    load_policies,
    load_policy_file,
)
from agent.node.qos import tc
from agent.node.qos.desired import build_tree
from agent.node.qos.nftables import Nftables, NftError
from agent.node.qos.nftrules import (
    NFT_CGROUP_BASE,
    TABLE_FAMILY,
    TABLE_NAME,
    NftRenderError,
    render_table,
)
from tests import ROOT
from tests.conftest import VethPair, netns_unavailable
from tests.node.qos import netlink_put

POLICIES = ROOT / "policies"
HYBRID = Path("/sys/fs/cgroup/unified")


def policy(text: str) -> QosPolicy:
    (loaded,) = load_policies(text, "test.yaml")
    return loaded.policy


def training() -> QosPolicy:
    (loaded,) = load_policy_file(POLICIES / "training-node.yaml")
    return loaded.policy


def render(*policies: QosPolicy, cgroup_root: Path = HYBRID) -> str:
    return render_table([(p, build_tree(p).minors) for p in policies], cgroup_root=cgroup_root)


def classes(interface: str, body: str, direction: str = "egress") -> QosPolicy:
    return policy(f"""
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: test-{interface}}}
spec:
  interface: {interface}
  direction: {direction}
  bandwidth: 1Gbit
  defaultClass: other
  classes:
{body}
""")


# --- rendering -------------------------------------------------------------------------


def test_training_node_table() -> None:
    body = render(training())

    job = '"unified/system.slice/slurmstepd.scope/job_4242"'
    loader = '"unified/system.slice/data-loader.service"'
    nfs = "ip daddr 10.40.0.0/16 tcp dport 2049"
    assert (
        body
        == f"""\
chain output {{
  type filter hook output priority mangle; policy accept;
  oifname "eth0" jump local-training-node
}}

chain forward {{
  type filter hook forward priority mangle; policy accept;
  oifname "eth0" jump routed-training-node
}}

chain local-training-node {{
  meta nfproto ipv4 th dport 29500-29599 meta priority set fa:10 ip dscp set 26 return
  meta nfproto ipv6 th dport 29500-29599 meta priority set fa:10 ip6 dscp set 26 return
  meta nfproto ipv4 socket cgroupv2 level 3 {job} meta priority set fa:10 ip dscp set 26 return
  meta nfproto ipv6 socket cgroupv2 level 3 {job} meta priority set fa:10 ip6 dscp set 26 return
  meta nfproto ipv4 {nfs} meta priority set fa:11 ip dscp set 10 return
  meta nfproto ipv4 socket cgroupv2 level 2 {loader} meta priority set fa:12 ip dscp set 18 return
  meta nfproto ipv6 socket cgroupv2 level 2 {loader} meta priority set fa:12 ip6 dscp set 18 return
}}

chain routed-training-node {{
  meta nfproto ipv4 th dport 29500-29599 meta priority set fa:10 ip dscp set 26 return
  meta nfproto ipv6 th dport 29500-29599 meta priority set fa:10 ip6 dscp set 26 return
  meta nfproto ipv4 {nfs} meta priority set fa:11 ip dscp set 10 return
}}
"""
    )


def test_unified_host_paths_and_root_major() -> None:
    body = render_table(
        [(training(), build_tree(training()).minors)],
        cgroup_root=Path("/sys/fs/cgroup"),
        root_major=0x1,
    )

    assert 'socket cgroupv2 level 3 "system.slice/slurmstepd.scope/job_4242"' in body
    assert "meta priority set 1:10 ip dscp set 26" in body


def test_cgroup_root_nft_cannot_reach_is_refused() -> None:
    with pytest.raises(NftRenderError, match=r"classes\[0\]\.match\[1\]\.cgroup.*/mnt/cg2"):
        render(training(), cgroup_root=Path("/mnt/cg2"))


def test_nothing_for_nft_renders_an_empty_table() -> None:
    u32_only = classes(
        "eth1",
        """
    - {name: rpc, priority: 0, rate: 10%, match: [{dstPorts: ["8000"], protocol: tcp}]}
    - {name: other, priority: 7, rate: 10%}
""",
    )
    ingress = classes(
        "eth2",
        """
    - {name: rpc, priority: 0, rate: 10%, dscp: 26, match: [{cgroup: a/b}]}
    - {name: other, priority: 7, rate: 10%}
""",
        direction="ingress",
    )

    assert render(u32_only, ingress) == ""
    assert render() == ""


def test_earlier_classes_are_claimed_first_and_later_ones_left_to_u32() -> None:
    p = classes(
        "eth1",
        """
    - name: rpc
      priority: 0
      rate: 10%
      match:
        - {dstPorts: ["8000", "9000-9100"], srcPorts: ["1024-65535"]}
        - {protocol: icmp, dstCidr: fd00::/64}
    - {name: marked, priority: 1, rate: 10%, match: [{fwmark: "0x100/0xff00"}, {fwmark: 7}]}
    - {name: job, priority: 2, rate: 10%, match: [{cgroup: jobs/j1, dstCidr: 10.0.0.0/8}]}
    - {name: bulk, priority: 3, rate: 10%, match: [{protocol: udp}]}
    - {name: other, priority: 7, rate: 10%}
""",
    )

    local, routed = render(p, cgroup_root=Path("/sys/fs/cgroup")).split("chain routed-")[-2:]

    # A packet to port 8000 from cgroup jobs/j1 is rpc's, as u32 pref order says: rpc's
    # entries come first. bulk follows the last class nft handles: u32 alone.
    assert local.split("chain local-test-eth1 {\n")[1] == (
        "  th sport 1024-65535 th dport { 8000, 9000-9100 } meta priority set fa:10 return\n"
        "  meta nfproto ipv6 ip6 daddr fd00::/64 meta l4proto ipv6-icmp"
        " meta priority set fa:10 return\n"
        "  meta mark & 0x0000ff00 == 0x00000100 meta priority set fa:11 return\n"
        "  meta mark 0x00000007 meta priority set fa:11 return\n"
        "  meta nfproto ipv4 ip daddr 10.0.0.0/8 socket cgroupv2 level 2"
        ' "jobs/j1" meta priority set fa:12 return\n'
        "}\n\n"
    )
    # Forwarded packets have no local socket: the cgroup class is left out there.
    assert routed == (
        "test-eth1 {\n"
        "  th sport 1024-65535 th dport { 8000, 9000-9100 } meta priority set fa:10 return\n"
        "  meta nfproto ipv6 ip6 daddr fd00::/64 meta l4proto ipv6-icmp"
        " meta priority set fa:10 return\n"
        "  meta mark & 0x0000ff00 == 0x00000100 meta priority set fa:11 return\n"
        "  meta mark 0x00000007 meta priority set fa:11 return\n"
        "}\n"
    )


def test_default_class_with_dscp_is_remarked_after_every_class() -> None:
    p = classes(
        "eth1",
        """
    - {name: other, priority: 7, rate: 10%, dscp: 8, match: [{dscp: 8}]}
    - {name: rpc, priority: 0, rate: 10%, match: [{protocol: tcp}]}
""",
    )

    body = render(p)

    assert body.split("chain routed-test-eth1 {\n")[1] == (
        "  meta nfproto ipv4 ip dscp 8 meta priority set fa:10 ip dscp set 8 return\n"
        "  meta nfproto ipv6 ip6 dscp 8 meta priority set fa:10 ip6 dscp set 8 return\n"
        "  meta l4proto tcp meta priority set fa:11 return\n"
        "  meta nfproto ipv4 meta priority set fa:10 ip dscp set 8 return\n"
        "  meta nfproto ipv6 meta priority set fa:10 ip6 dscp set 8 return\n"
        "}\n"
    )


def test_output_is_deterministic() -> None:
    a = classes("eth1", "    - {name: other, priority: 7, rate: 10%, dscp: 8}")
    b = classes("eth2", "    - {name: other, priority: 7, rate: 10%, dscp: 10}")

    assert render(a, b) == render(b, a)
    assert render(a, b).index("jump local-test-eth1") < render(a, b).index("jump local-test-eth2")


# --- in the kernel ---------------------------------------------------------------------


def open_nft(netns: str) -> Nftables:
    try:
        return Nftables(netns=netns)
    except NftError as exc:
        pytest.skip(f"no libnftables: {exc}")


@pytest.fixture
def job_cgroup() -> Iterator[tuple[Path, str]]:
    """(cgroup2 root, name) of a fresh cgroup directly below the root; removed after,
    its processes moved back to the root and killed first."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = detect_cgroup2_root()
    if root is None or not root.is_relative_to(NFT_CGROUP_BASE):
        pytest.skip(f"no cgroup2 mount nft can reach (found {root})")
    name = f"fabric-test-{secrets.token_hex(3)}"
    group = root / name
    group.mkdir()
    try:
        yield root, name
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (root / "cgroup.procs").write_text(pid)
            os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def cgroup_policy(pair: VethPair, cgroup: str, interface: str | None = None) -> QosPolicy:
    return classes(
        interface or pair.device,
        f"""
    - {{name: job, priority: 0, rate: 100Mbit, match: [{{cgroup: {cgroup}}}]}}
    - {{name: other, priority: 7, rate: 100Mbit}}
""",
    )


def test_rendered_table_loads_and_reads_back(
    veth_pair: VethPair, job_cgroup: tuple[Path, str]
) -> None:
    root, name = job_cgroup
    p = training().model_copy(
        update={
            "spec": training().spec.model_copy(update={"interface": veth_pair.device}),
        }
    )
    jobs = classes(veth_pair.device, "    - {name: other, priority: 7, rate: 10%}")
    ours = cgroup_policy(veth_pair, name, interface=veth_pair.peer_device)
    body = render_table(
        [(ours, build_tree(ours).minors), (jobs, build_tree(jobs).minors)], cgroup_root=root
    )
    nft = open_nft(veth_pair.netns)
    try:
        nft.replace_table(TABLE_FAMILY, TABLE_NAME, body)
        listing = nft.list_table(TABLE_FAMILY, TABLE_NAME)
        # The training policy names cgroups this host lacks: nft refuses it as a whole.
        with pytest.raises(NftError, match="cgroupv2 path fails"):
            nft.replace_table(TABLE_FAMILY, TABLE_NAME, render(p, cgroup_root=root))
        assert nft.list_table(TABLE_FAMILY, TABLE_NAME) == listing
        missing = check_host([LoadedPolicy("p.yaml", None, p)], interface_exists=lambda _: True,
                             cgroup_root=root)  # fmt: skip
        assert [v.path for v in missing] == [
            "spec.classes[0].match[1].cgroup",
            "spec.classes[2].match[0].cgroup",
        ]
    finally:
        nft.close()

    assert listing is not None
    chains = [item["chain"]["name"] for item in listing["nftables"] if "chain" in item]
    assert chains == ["output", f"local-test-{veth_pair.peer_device}"]
    (rule,) = [
        item["rule"]
        for item in listing["nftables"]
        if "rule" in item and item["rule"]["chain"].startswith("local-")
    ]
    assert {"mangle": {"key": {"meta": {"key": "priority"}}, "value": "fa:10"}} in rule["expr"]


SENDER = """
import socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for _ in range(count):
        sock.sendto(b"x" * 1000, (address, port))
"""


def send_from_cgroup(pair: VethPair, group: Path, count: int) -> None:
    """`count` UDP datagrams of 1000 bytes to the peer, from a process that joined `group`
    before it opened its socket (a socket keeps the cgroup of the process that made it)."""
    script = (
        'echo $$ > "$0/cgroup.procs" && exec nsenter --net="/run/netns/$1" "$2" -c "$3" "$4" 9 "$5"'
    )
    subprocess.run(
        ["sh", "-c", script, str(group), pair.netns, sys.executable, SENDER,
         pair.peer_address, str(count)],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_process_in_cgroup_lands_in_its_class(
    shaped_pair: VethPair, job_cgroup: tuple[Path, str]
) -> None:
    root, name = job_cgroup
    p = cgroup_policy(shaped_pair, name)
    desired = build_tree(p)
    netlink_put(desired.tree, shaped_pair.netns)
    nft = open_nft(shaped_pair.netns)
    try:
        nft.replace_table(
            TABLE_FAMILY, TABLE_NAME, render_table([(p, desired.minors)], cgroup_root=root)
        )
        job, other = desired.minors["job"], desired.minors["other"]
        before = tc.class_stats(shaped_pair.device, netns=shaped_pair.netns)

        send_from_cgroup(shaped_pair, root / name, 300)
        after_job = tc.class_stats(shaped_pair.device, netns=shaped_pair.netns)
        # The same traffic from a socket outside the cgroup: the default class.
        sock = pyroute2_netns.create_socket(
            shaped_pair.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0
        )
        with sock:
            for _ in range(300):
                sock.sendto(b"x" * 1000, (shaped_pair.peer_address, 9))
        after_other = tc.class_stats(shaped_pair.device, netns=shaped_pair.netns)
    finally:
        nft.close()

    assert after_job[job].bytes - before[job].bytes >= 300 * 1000
    assert after_job[other].bytes - before[other].bytes < 30 * 1000
    assert after_other[other].bytes - after_job[other].bytes >= 300 * 1000
    assert after_other[job].bytes == after_job[job].bytes


COUNTERS = """
chain input {
  type filter hook input priority filter; policy accept;
  udp dport 5001 ip dscp 26 counter
  udp dport 5002 ip dscp 26 counter
  udp dport 5002 ip dscp 0 counter
}
"""


def counters(listing: dict[str, Any] | None) -> list[int]:
    assert listing is not None
    return [
        expr["counter"]["packets"]
        for item in listing["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "counter" in expr
    ]


def test_dscp_remark_is_seen_by_the_receiver(veth_pair: VethPair) -> None:
    p = classes(
        veth_pair.device,
        """
    - {name: marked, priority: 0, rate: 10%, dscp: 26, match: [{dstPorts: ["5001"], protocol: udp}]}
    - {name: other, priority: 7, rate: 10%}
""",
    )
    sender, receiver = open_nft(veth_pair.netns), open_nft(veth_pair.peer_netns)
    try:
        sender.replace_table(TABLE_FAMILY, TABLE_NAME, render(p))
        receiver.replace_table("inet", "fabric_test_counters", COUNTERS)
        sock = pyroute2_netns.create_socket(
            veth_pair.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0
        )
        with sock:
            for _ in range(40):
                sock.sendto(b"x" * 100, (veth_pair.peer_address, 5001))
            for _ in range(20):
                sock.sendto(b"x" * 100, (veth_pair.peer_address, 5002))
        seen = counters(receiver.list_table("inet", "fabric_test_counters"))
    finally:
        sender.close()
        receiver.close()

    assert seen == [40, 0, 20]
