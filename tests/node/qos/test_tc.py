"""The HTB backend against the real kernel, in throwaway namespaces; real traffic where the
claim is about traffic."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from agent.common.policy.units import PortRange
from agent.node.qos.htb import HtbClass, HtbTree, U32Filter, U32Match, plan
from agent.node.qos.kernel import KernelStateConflict, TcApplyError, TcCapabilities
from agent.node.qos.tc import PROBE_PREFIX, apply, class_stats, read_tree, remove_stale_probes
from tests.conftest import VethPair, VethTraffic
from tests.node.qos import netlink_put

MBIT = 10**6


def tc(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "tc", *args], check=True, capture_output=True, text=True
    ).stdout


def three_classes(pair: VethPair, rate_10: int = 600 * MBIT) -> HtbTree:
    return HtbTree(
        device=pair.device,
        root_major=0xFA,
        default_minor=0x12,
        classes=(
            HtbClass.with_rate(0x1, None, 1000 * MBIT),
            HtbClass.with_rate(0x10, 0x1, rate_10, 1000 * MBIT, 1, "collectives"),
            HtbClass.with_rate(0x11, 0x1, 300 * MBIT, 1000 * MBIT, 2, "storage"),
            HtbClass.with_rate(0x12, 0x1, 100 * MBIT, 1000 * MBIT, 3, "default"),
        ),
        filters=(
            U32Filter(10, 0x10, U32Match(ip_proto=6, dport=PortRange.single(5201))),
            U32Filter(20, 0x11, U32Match(ip_proto=6, dport=PortRange(6000, 6100))),
            U32Filter(30, 0x11, U32Match(src="10.250.0.0/16", dscp=10)),
            U32Filter(40, 0x12, U32Match(protocol="ipv6", dst="fd00::/8", sport=PortRange(1, 3))),
        ),
    )


def test_build_and_read_back(shaped_pair: VethPair) -> None:
    desired = three_classes(shaped_pair)

    changes = netlink_put(desired, shaped_pair.netns)

    assert changes
    assert read_tree(shaped_pair.device, netns=shaped_pair.netns) == desired
    assert plan(desired, read_tree(shaped_pair.device, netns=shaped_pair.netns)) == []
    assert netlink_put(desired, shaped_pair.netns) == []


def test_one_rate_change_is_one_class_change(shaped_pair: VethPair) -> None:
    netlink_put(three_classes(shaped_pair), shaped_pair.netns)
    desired = three_classes(shaped_pair, rate_10=500 * MBIT)

    changes = plan(desired, read_tree(shaped_pair.device, netns=shaped_pair.netns))
    apply(changes, netns=shaped_pair.netns)

    assert [str(c) for c in changes] == ['~ class fa:10 "collectives" rate 600Mbit -> 500Mbit']
    assert read_tree(shaped_pair.device, netns=shaped_pair.netns) == desired
    assert "rate 500Mbit" in tc(shaped_pair.netns, "class", "show", "dev", shaped_pair.device)


def test_class_deleted_by_hand_is_planned_back(shaped_pair: VethPair) -> None:
    desired = three_classes(shaped_pair)
    netlink_put(desired, shaped_pair.netns)
    ns, dev = shaped_pair.netns, shaped_pair.device
    tc(ns, "filter", "del", "dev", dev, "parent", "fa:", "pref", "10", "protocol", "ip", "u32")
    tc(ns, "class", "del", "dev", dev, "classid", "fa:10")

    changes = plan(desired, read_tree(dev, netns=ns))

    assert [str(c).split()[:3] for c in changes] == [
        ["+", "class", "fa:10"],
        ["+", "qdisc", "10:"],
        ["+", "filter", "pref"],
    ]
    apply(changes, netns=ns)
    assert read_tree(dev, netns=ns) == desired


def test_foreign_root_qdisc_is_a_conflict(shaped_pair: VethPair) -> None:
    ns, dev = shaped_pair.netns, shaped_pair.device
    tc(
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "handle",
        "5:",
        "tbf",
        "rate",
        "1mbit",
        "burst",
        "32kbit",
        "latency",
        "400ms",
    )
    before = tc(ns, "qdisc", "show", "dev", dev)

    with pytest.raises(KernelStateConflict, match=f"{dev}: root qdisc is tbf 5:"):
        netlink_put(three_classes(shaped_pair), ns)

    assert tc(ns, "qdisc", "show", "dev", dev) == before
    assert read_tree(dev, netns=ns, take_over=True) is None


def test_failed_change_rolls_back_to_previous_tree(shaped_pair: VethPair) -> None:
    ns, dev = shaped_pair.netns, shaped_pair.device
    previous = three_classes(shaped_pair)
    netlink_put(previous, ns)
    changes = plan(three_classes(shaped_pair, rate_10=400 * MBIT), previous)
    # A change to a class the kernel does not have: rejected after the first change ran.
    ghost = HtbClass.with_rate(0x20, 0x1, 10 * MBIT)
    changes.append(dataclasses.replace(changes[0], subject=ghost, before=ghost))

    with pytest.raises(TcApplyError, match=r"~ class fa:20 .* rolled back") as caught:
        apply(changes, netns=ns)

    assert caught.value.rollback_error is None
    assert read_tree(dev, netns=ns) == previous
    assert "rate 600Mbit" in tc(ns, "class", "show", "dev", dev)


def test_class_stats_count_traffic(shaped_pair: VethPair, veth_traffic: VethTraffic) -> None:
    ns = shaped_pair.netns
    netlink_put(three_classes(shaped_pair), ns)
    veth_traffic.send(50, payload_bytes=1000)

    stats = class_stats(shaped_pair.device, netns=ns)

    assert set(stats) == {0x1, 0x10, 0x11, 0x12}
    assert stats[0x12].packets >= 50  # UDP to no filtered port: the default class
    assert stats[0x12].bytes >= 50 * 1028
    assert stats[0x1].bytes >= stats[0x12].bytes
    assert stats[0x10].packets == 0


# --- real traffic ---


def iperf_pair(pair: VethPair, ports: list[int], seconds: int = 4) -> list[float]:
    """Receiver-side Mbit/s of parallel TCP flows from `pair.netns` to the peer."""
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    servers = [
        subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{pair.peer_netns}",
                "iperf3",
                "-s",
                "-1",
                "-B",
                pair.peer_address,
                "-p",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    clients: list[subprocess.Popen[str]] = []
    try:
        time.sleep(0.5)
        clients = [
            subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{pair.netns}",
                    "iperf3",
                    "-c",
                    pair.peer_address,
                    "-p",
                    str(port),
                    "-t",
                    str(seconds),
                    "-J",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        results = []
        for client in clients:
            out, _ = client.communicate(timeout=seconds + 20)
            report = json.loads(out)
            results.append(report["end"]["sum_received"]["bits_per_second"] / MBIT)
        return results
    finally:
        procs: list[subprocess.Popen[Any]] = [*clients, *servers]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class Measured:
    """Per flow: iperf3's receiver goodput; per class: what HTB sent, headers included,
    over the steady part of the run (the class byte counters over seconds 1.5 to 3.5)."""

    goodput_mbit: list[float]
    class_mbit: dict[int, float]


def measure_once(pair: VethPair, ports: list[int], minors: list[int]) -> Measured:
    goodput: list[float] = []
    runner = threading.Thread(target=lambda: goodput.extend(iperf_pair(pair, ports)))
    runner.start()
    try:
        time.sleep(2.0)  # server start-up (0.5 s) and TCP ramp-up
        first, t0 = class_stats(pair.device, netns=pair.netns), time.monotonic()
        time.sleep(2.0)
        last, t1 = class_stats(pair.device, netns=pair.netns), time.monotonic()
    finally:
        runner.join()
    rates = {m: (last[m].bytes - first[m].bytes) * 8 / (t1 - t0) / MBIT for m in minors}
    return Measured(goodput, rates)


def measure(
    pair: VethPair, ports: list[int], minors: list[int], ok: Callable[[Measured], bool]
) -> Measured:
    """Measure, and up to twice more while a run misses (a noisy neighbour on the host:
    on 2 shared cores a starved sender falls short of the ceiling)."""
    result = measure_once(pair, ports, minors)
    for _ in range(2):
        if ok(result):
            break
        result = measure_once(pair, ports, minors)
    return result


def test_ceiling_holds_within_5_percent(shaped_pair: VethPair) -> None:
    netlink_put(
        HtbTree(
            device=shaped_pair.device,
            root_major=0xFA,
            default_minor=0x10,
            classes=(
                HtbClass.with_rate(0x1, None, 1000 * MBIT),
                HtbClass.with_rate(0x10, 0x1, 100 * MBIT, 200 * MBIT),
            ),
        ),
        netns=shaped_pair.netns,
    )

    result = measure(shaped_pair, [5201], [0x10], lambda r: 190 <= r.class_mbit[0x10] <= 210)

    # HTB meters whole frames; iperf3 counts TCP payload, about 95.6 % of a full frame.
    print(f"ceil 200 Mbit/s: class sent {result.class_mbit[0x10]:.1f} Mbit/s on the wire, "
          f"goodput {result.goodput_mbit[0]:.1f} Mbit/s")  # fmt: skip
    assert 190 <= result.class_mbit[0x10] <= 210
    assert 180 <= result.goodput_mbit[0] <= 210


def test_capabilities_without_namespaces_probe_on_a_device_of_their_own(
    veth_pair: VethPair, tc_capabilities: TcCapabilities
) -> None:
    # Run inside the test's namespace, so the temporary device never appears on the host.
    script = "from agent.node.qos import tc; print(repr(tc._probe_on_own_device()))"
    result = subprocess.run(
        ["nsenter", f"--net=/run/netns/{veth_pair.netns}", sys.executable, "-c", script],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    links = subprocess.run(
        ["ip", "-n", veth_pair.netns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout

    assert result.stdout.strip() == repr(tc_capabilities)
    assert "fabcap" not in links


def test_probe_namespaces_of_dead_agents_are_removed(tc_capabilities: TcCapabilities) -> None:
    # A probe cut off by SIGKILL (pid of a process that has ended), and a live one's.
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = f"{PROBE_PREFIX}{ended.pid}-{secrets.token_hex(3)}"
    live = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = remove_stale_probes()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)

    assert stale in removed and stale not in names
    assert live not in removed and live in names


def test_an_idle_class_share_is_borrowed_up_to_the_ceiling(shaped_pair: VethPair) -> None:
    # Only "busy" sends: it gets the idle class's 150 Mbit/s on top of its own 50, up to
    # its 180 Mbit/s ceiling.
    netlink_put(
        HtbTree(
            device=shaped_pair.device,
            root_major=0xFA,
            default_minor=0x12,
            classes=(
                HtbClass.with_rate(0x1, None, 200 * MBIT),
                HtbClass.with_rate(0x10, 0x1, 50 * MBIT, 180 * MBIT, 1, "busy"),
                HtbClass.with_rate(0x11, 0x1, 150 * MBIT, 200 * MBIT, 1, "idle"),
                HtbClass.with_rate(0x12, 0x1, 8 * MBIT, 200 * MBIT, 7),
            ),
            filters=(U32Filter(10, 0x10, U32Match(ip_proto=6, dport=PortRange.single(5401))),),
        ),
        netns=shaped_pair.netns,
    )

    result = measure(shaped_pair, [5401], [0x10, 0x11], lambda r: 171 <= r.class_mbit[0x10] <= 189)

    print(f"borrowing: busy class sent {result.class_mbit[0x10]:.1f} Mbit/s (ceil 180)")
    assert 171 <= result.class_mbit[0x10] <= 189
    assert result.class_mbit[0x11] < 1


@pytest.mark.parametrize(
    ("rates", "prios"),
    [
        # Guarantees: each class gets its own rate when both are busy.
        ((150, 50), (1, 1)),
        # Priority: both guaranteed 50 and allowed all 200 Mbit/s; the 100 Mbit/s spare
        # goes to the lower priority number first.
        ((50, 50), (0, 5)),
    ],
    ids=["guarantees", "priority"],
)
def test_two_busy_classes_get_150_and_50_within_10_percent(
    shaped_pair: VethPair, rates: tuple[int, int], prios: tuple[int, int]
) -> None:
    netlink_put(
        HtbTree(
            device=shaped_pair.device,
            root_major=0xFA,
            default_minor=0x12,
            classes=(
                HtbClass.with_rate(0x1, None, 200 * MBIT),
                HtbClass.with_rate(0x10, 0x1, rates[0] * MBIT, 200 * MBIT, prios[0]),
                HtbClass.with_rate(0x11, 0x1, rates[1] * MBIT, 200 * MBIT, prios[1]),
                HtbClass.with_rate(0x12, 0x1, 8 * MBIT, 200 * MBIT, 7),
            ),
            filters=(
                U32Filter(10, 0x10, U32Match(ip_proto=6, dport=PortRange.single(5301))),
                U32Filter(11, 0x11, U32Match(ip_proto=6, dport=PortRange.single(5302))),
            ),
        ),
        netns=shaped_pair.netns,
    )

    def ok(r: Measured) -> bool:
        return 135 <= r.class_mbit[0x10] <= 165 and 45 <= r.class_mbit[0x11] <= 55

    result = measure(shaped_pair, [5301, 5302], [0x10, 0x11], ok)

    first, second = result.class_mbit[0x10], result.class_mbit[0x11]
    print(f"rates {rates} prios {prios}: classes sent {first:.1f}/{second:.1f} Mbit/s on the "
          f"wire, goodput {result.goodput_mbit[0]:.1f}/{result.goodput_mbit[1]:.1f}")  # fmt: skip
    assert 135 <= first <= 165
    assert 45 <= second <= 55
