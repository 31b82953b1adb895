"""Ingress shaping through an IFB device, against the real kernel in throwaway
namespaces; real traffic for the ceiling."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from agent.node.qos.htb import HtbClass, HtbTree
from agent.node.qos.ifb import (
    ensure_ingress_redirect,
    read_ingress_redirect,
    remove_ingress_redirect,
)
from agent.node.qos.kernel import IFNAMSIZ, KernelStateConflict, TcCapabilities, ifb_name
from agent.node.qos.tc import class_stats
from tests.conftest import VethPair
from tests.node.qos import netlink_put

MBIT = 10**6


def run(netns: str, *args: str, check: bool = True) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *args], check=check, capture_output=True, text=True
    ).stdout


def kernel_state(pair: VethPair) -> str:
    """Qdiscs, ingress filters (with their action indexes, which a re-add would bump) and
    links with their ifindexes: what a change to the redirect would show in."""
    ns, dev = pair.netns, pair.device
    return "\n".join(
        [
            run(ns, "tc", "qdisc", "show"),
            run(ns, "tc", "filter", "show", "dev", dev, "ingress"),
            run(ns, "ip", "-d", "-o", "link", "show"),
        ]
    )


@pytest.fixture
def ingress_pair(shaped_pair: VethPair, tc_capabilities: TcCapabilities) -> VethPair:
    """`shaped_pair`, when this kernel has IFB, the ingress qdisc and mirred."""
    missing = [name for name in ("ifb", "ingress", "mirred") if not getattr(tc_capabilities, name)]
    if missing:
        pytest.skip(f"kernel lacks {', '.join(missing)}")
    return shaped_pair


def test_ifb_name_is_short_and_deterministic() -> None:
    long_a, long_b = "enp193s0f1np1v12", "enp193s0f1np1v13"

    names = [ifb_name("eth0"), ifb_name("fabc0ffeea"), ifb_name(long_a), ifb_name(long_b)]

    assert names[:2] == ["ifb-eth0", "ifb-fabc0ffeea"]
    assert all(len(n) <= IFNAMSIZ and n.startswith("ifb-") for n in names)
    assert names[2] == ifb_name(long_a) and names[2] != names[3]


def test_ensure_creates_the_redirect_and_a_second_call_changes_nothing(
    ingress_pair: VethPair,
) -> None:
    ns, dev = ingress_pair.netns, ingress_pair.device

    ifb = ensure_ingress_redirect(dev, netns=ns)
    first = kernel_state(ingress_pair)
    again = ensure_ingress_redirect(dev, netns=ns)

    assert again == ifb == ifb_name(dev)
    assert kernel_state(ingress_pair) == first
    state = read_ingress_redirect(dev, netns=ns)
    assert state.complete
    assert (state.qdisc, state.redirect_to, state.foreign_filters) == ("ingress", ifb, 0)
    shown = run(ns, "tc", "filter", "show", "dev", dev, "ingress")
    assert f"mirred (Egress Redirect to device {ifb})" in shown
    assert "<BROADCAST,NOARP,UP,LOWER_UP>" in run(ns, "ip", "link", "show", ifb)


def test_remove_cleans_everything(ingress_pair: VethPair) -> None:
    ns, dev = ingress_pair.netns, ingress_pair.device
    before = kernel_state(ingress_pair)
    ifb = ensure_ingress_redirect(dev, netns=ns)
    netlink_put(HtbTree(ifb, 0xFA, 0x10, (HtbClass.with_rate(0x10, None, 100 * MBIT),)), netns=ns)

    removed = remove_ingress_redirect(dev, netns=ns)

    assert removed
    assert kernel_state(ingress_pair) == before
    assert ifb not in run(ns, "ip", "link", "show")
    assert "ingress" not in run(ns, "tc", "qdisc", "show", "dev", dev)
    assert remove_ingress_redirect(dev, netns=ns) is False


def test_deleted_ifb_is_drift_and_ensure_repairs_it(ingress_pair: VethPair) -> None:
    ns, dev = ingress_pair.netns, ingress_pair.device
    ifb = ensure_ingress_redirect(dev, netns=ns)
    run(ns, "ip", "link", "del", ifb)

    drifted = read_ingress_redirect(dev, netns=ns)
    ensure_ingress_redirect(dev, netns=ns)

    assert not drifted.complete
    assert (drifted.ifb_present, drifted.redirect_to) == (False, "")
    repaired = read_ingress_redirect(dev, netns=ns)
    assert repaired.complete
    assert run(ns, "tc", "filter", "show", "dev", dev, "ingress").count("mirred") == 1


@pytest.mark.parametrize("kind", ["ingress", "clsact"])
def test_foreign_ingress_filters_are_refused(ingress_pair: VethPair, kind: str) -> None:
    ns, dev = ingress_pair.netns, ingress_pair.device
    run(ns, "tc", "qdisc", "add", "dev", dev, kind if kind == "clsact" else "ingress")
    run(ns, "tc", "filter", "add", "dev", dev, "ingress", "protocol", "ip", "pref", "7",
        "u32", "match", "ip", "dport", "22", "0xffff", "flowid", "1:1")  # fmt: skip
    before = kernel_state(ingress_pair)

    with pytest.raises(KernelStateConflict, match=rf"{dev}: {kind} qdisc ffff: carries 1 filter"):
        ensure_ingress_redirect(dev, netns=ns)

    assert kernel_state(ingress_pair) == before
    state = read_ingress_redirect(dev, netns=ns)
    assert (state.qdisc, state.foreign_filters, state.complete) == (kind, 1, False)
    assert remove_ingress_redirect(dev, netns=ns) is False
    assert kernel_state(ingress_pair) == before


def test_empty_clsact_is_used_and_left_in_place(ingress_pair: VethPair) -> None:
    ns, dev = ingress_pair.netns, ingress_pair.device
    run(ns, "tc", "qdisc", "add", "dev", dev, "clsact")

    ifb = ensure_ingress_redirect(dev, netns=ns)

    assert read_ingress_redirect(dev, netns=ns).complete
    assert remove_ingress_redirect(dev, netns=ns)
    assert "clsact" in run(ns, "tc", "qdisc", "show", "dev", dev)
    assert run(ns, "tc", "filter", "show", "dev", dev, "ingress") == ""
    assert ifb not in run(ns, "ip", "link", "show")


# --- real traffic ---


def iperf_into(pair: VethPair, seconds: int = 4) -> float:
    """Receiver-side Mbit/s of one TCP flow from `pair.peer_netns` into `pair.netns`."""
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{pair.netns}", "iperf3", "-s", "-1", "-B",
         pair.address, "-p", "5201"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client: subprocess.Popen[str] | None = None
    try:
        time.sleep(0.5)
        client = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{pair.peer_netns}", "iperf3", "-c", pair.address,
             "-p", "5201", "-t", str(seconds), "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = client.communicate(timeout=seconds + 20)
        report: dict[str, Any] = json.loads(out)
        return float(report["end"]["sum_received"]["bits_per_second"]) / MBIT
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def measure_once(pair: VethPair, ifb: str, minor: int) -> tuple[float, float]:
    """(class Mbit/s on the IFB over seconds 2 to 4 of the run, iperf3 goodput)."""
    goodput: list[float] = []
    runner = threading.Thread(target=lambda: goodput.append(iperf_into(pair)))
    runner.start()
    try:
        time.sleep(2.0)  # server start-up (0.5 s) and TCP ramp-up
        first, t0 = class_stats(ifb, netns=pair.netns), time.monotonic()
        time.sleep(2.0)
        last, t1 = class_stats(ifb, netns=pair.netns), time.monotonic()
    finally:
        runner.join()
    return (last[minor].bytes - first[minor].bytes) * 8 / (t1 - t0) / MBIT, goodput[0]


def test_ingress_ceiling_holds_within_5_percent(ingress_pair: VethPair) -> None:
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    ns, dev = ingress_pair.netns, ingress_pair.device
    ifb = ensure_ingress_redirect(dev, netns=ns)
    netlink_put(
        HtbTree(
            device=ifb,
            root_major=0xFA,
            default_minor=0x10,
            classes=(
                HtbClass.with_rate(0x1, None, 1000 * MBIT),
                HtbClass.with_rate(0x10, 0x1, 100 * MBIT, 200 * MBIT),
            ),
        ),
        netns=ns,
    )

    class_mbit, goodput = measure_once(ingress_pair, ifb, 0x10)
    for _ in range(2):  # up to twice more: a noisy neighbour on the host starves iperf3
        if 190 <= class_mbit <= 210:
            break
        class_mbit, goodput = measure_once(ingress_pair, ifb, 0x10)

    # The IFB sees the frames the veth received (Ethernet header pushed back by mirred);
    # iperf3 counts TCP payload, about 95.6 % of a full frame.
    print(f"ingress ceil 200 Mbit/s: IFB class sent {class_mbit:.1f} Mbit/s, "
          f"goodput {goodput:.1f} Mbit/s")  # fmt: skip
    assert 190 <= class_mbit <= 210
    assert 180 <= goodput <= 210
