"""Enforcement accuracy: configured against measured, for each QoS case, 3 runs, medians.

Needs root and iperf3. Two throwaway network namespaces joined by a veth pair (deleted at
the end whatever happens); the agent's HTB tree on the near end (egress) or on the IFB
its ingress redirect feeds (ingress). Per case and run: iperf3 TCP flows for --seconds
from one namespace to the other; what each class sent is read from its HTB byte counters
over the steady part (from 2 s after start to 2 s before the end), so it is the rate on
the wire, headers included, which is what HTB enforces. iperf3's receiver goodput
(payload only, ~95.6 % of a full frame) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.common.policy.units import PortRange
from agent.node.qos import ifb, tc
from agent.node.qos.htb import HtbClass, HtbTree, U32Filter, U32Match

MBIT = 10**6


@dataclass(frozen=True)
class Case:
    name: str
    direction: str
    classes: tuple[tuple[int, int, int, int], ...]  # minor, rate, ceil (Mbit/s), prio
    flows: tuple[tuple[int, int], ...]  # (port, class minor) per parallel flow
    expected: dict[int, float]  # class minor -> Mbit/s due
    parent_mbit: int = 200


CASES = (
    Case(
        "ceiling 200 Mbit/s",
        "egress",
        ((0x10, 100, 200, 1),),
        ((5201, 0x10),),
        {0x10: 200},
        parent_mbit=1000,
    ),
    Case(
        "guarantees 150 / 50 of 200",
        "egress",
        ((0x10, 150, 200, 1), (0x11, 50, 200, 1)),
        ((5301, 0x10), (5302, 0x11)),
        {0x10: 150, 0x11: 50},
    ),
    Case(
        "idle share borrowed up to ceil 180",
        "egress",
        ((0x10, 50, 180, 1), (0x11, 150, 200, 1)),
        ((5401, 0x10),),
        {0x10: 180},
    ),
    Case(
        "priority: spare 100 to prio 0",
        "egress",
        ((0x10, 50, 200, 0), (0x11, 50, 200, 5)),
        ((5501, 0x10), (5502, 0x11)),
        {0x10: 150, 0x11: 50},
    ),
    Case(
        "ingress ceiling 200 Mbit/s",
        "ingress",
        ((0x10, 100, 200, 1),),
        ((5201, 0x10),),
        {0x10: 200},
    ),
)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextmanager
def namespaces() -> Iterator[tuple[str, str, str, str]]:
    token = secrets.token_hex(3)
    near, far = f"fabacc{token}-a", f"fabacc{token}-b"
    device = f"fabacc{token}"
    made = []
    try:
        for name in (near, far):
            ip("netns", "add", name)
            made.append(name)
        ip("-n", near, "link", "add", device, "type", "veth", "peer", "name", device + "p",
           "netns", far)  # fmt: skip
        ip("-n", near, "addr", "add", "10.251.0.1/30", "dev", device)
        ip("-n", far, "addr", "add", "10.251.0.2/30", "dev", device + "p")
        for name, dev in ((near, device), (far, device + "p")):
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", dev, "up")
        yield near, far, device, "10.251.0.2"
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def tree_for(case: Case, device: str) -> HtbTree:
    classes = [HtbClass.with_rate(0x1, None, case.parent_mbit * MBIT)]
    for minor, rate, ceil, prio in case.classes:
        classes.append(HtbClass.with_rate(minor, 0x1, rate * MBIT, ceil * MBIT, prio))
    classes.append(HtbClass.with_rate(0x1F, 0x1, 8 * MBIT, 200 * MBIT, 7))
    filters = [
        U32Filter(10 + i, minor, U32Match(ip_proto=6, dport=PortRange.single(port)))
        for i, (port, minor) in enumerate(case.flows)
    ]
    return HtbTree(device, 0xFA, 0x1F, tuple(classes), tuple(filters))


def run_flows(
    senders: str, receivers: str, address: str, ports: list[int], seconds: int
) -> list[float]:
    servers = [
        subprocess.Popen(["nsenter", f"--net=/run/netns/{receivers}", "iperf3", "-s", "-1",
                          "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports
    ]  # fmt: skip
    try:
        time.sleep(0.5)
        clients = [
            subprocess.Popen(["nsenter", f"--net=/run/netns/{senders}", "iperf3", "-c", address,
                              "-p", str(port), "-t", str(seconds), "-J"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for port in ports
        ]  # fmt: skip
        goodput = []
        for client in clients:
            out, _ = client.communicate(timeout=seconds + 30)
            goodput.append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / MBIT)
        return goodput
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait()


def run_case(case: Case, seconds: int) -> tuple[dict[int, float], list[float]]:
    with namespaces() as (near, far, device, far_address):
        if case.direction == "ingress":
            shaped = ifb.ensure_ingress_redirect(device, netns=near)
            senders, receivers, address = far, near, "10.251.0.1"
        else:
            shaped, senders, receivers, address = device, near, far, far_address
        tc.reconcile(tree_for(case, shaped), netns=near)
        goodput: list[float] = []
        ports = [port for port, _ in case.flows]
        runner = threading.Thread(
            target=lambda: goodput.extend(run_flows(senders, receivers, address, ports, seconds))
        )
        runner.start()
        time.sleep(2.5)
        first, t0 = tc.class_stats(shaped, netns=near), time.monotonic()
        time.sleep(seconds - 4)
        last, t1 = tc.class_stats(shaped, netns=near), time.monotonic()
        runner.join()
        rates = {m: (last[m].bytes - first[m].bytes) * 8 / (t1 - t0) / MBIT for m in case.expected}
        return rates, goodput


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=7)
    args = parser.parse_args()
    print(f"{args.runs} runs per case, {args.seconds} s flows, medians\n")
    print("| case | class | configured | measured on the wire | error | goodput (payload) |")
    print("|---|---|---:|---:|---:|---:|")
    for case in CASES:
        runs = [run_case(case, args.seconds) for _ in range(args.runs)]
        for i, (minor, due) in enumerate(case.expected.items()):
            wire = statistics.median(r[0][minor] for r in runs)
            good = statistics.median(r[1][i] for r in runs) if i < len(case.flows) else float("nan")
            print(f"| {case.name} | fa:{minor:x} | {due:.0f} Mbit/s | {wire:.1f} Mbit/s | "
                  f"{100 * (wire - due) / due:+.1f} % | {good:.1f} Mbit/s |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
