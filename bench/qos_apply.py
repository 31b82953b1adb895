"""Building and changing a 64-class HTB tree: the agent's netlink path against one `tc`
process per command, as shell-based tools (tcconfig, FireQOS, the CNI examples) do.

Needs root. Runs in a throwaway network namespace holding a veth pair (the tree goes on
one end), deleted at the end whatever happens. The tree: root qdisc `fa:`, class `fa:1`,
64 leaf classes `fa:10`..`fa:4f` each with a pfifo leaf qdisc, and 128 u32 filters
(`match ip dport N 0xffff`, two per leaf): 258 kernel objects. Per repetition and path:
build it from nothing, check the kernel has exactly the desired tree, change one class's
rate, check again, delete the tree (not timed). Times are wall clock (perf_counter):
- agent: `agent.node.qos.tc.apply(plan(desired, None))` for the build and
  `apply(plan(changed, current))` for the change, the plans made beforehand from the
  tree the caller holds (passed as `before`, the rollback target, as the reconciler
  does);
- the daemon's reconcile pass (`Reconciler.reconcile()`, what its loop runs every
  `--reconcile-interval`: read and check the policy directory, plan against the kernel
  through the same path as `policy plan`, apply, persist) over a policy file whose 64
  classes make the same tree: once after one class's rate was edited in the file, and
  once with nothing to do (the steady state);
- tc CLI: `ip netns exec NS tc ...`, one process per command, sequentially;
- tc -batch: the same commands in one `ip netns exec NS tc -batch FILE` process
  (what a careful shell tool could do; shown to separate process cost from kernel cost).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from agent.common.policy.model import load_policy_files
from agent.common.policy.units import PortRange
from agent.node.qos.htb import HtbClass, HtbTree, U32Filter, U32Match, burst_for_rate, plan
from agent.node.qos.pipeline import QosSettings
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.tc import apply, read_tree, remove_tree

MBIT = 10**6
LEAVES = 64
FILTERS_PER_LEAF = 2
FIRST_LEAF = 0x10
FIRST_PORT = 5000
FIRST_PREF = 100
DEVICE = "fabbench0"
# The goals from the issue.
GOAL_RATIO = 10.0
GOAL_BUILD_MS = 100.0
GOAL_CHANGE_MS = 10.0


def desired_tree(changed_rate_bps: int | None = None) -> HtbTree:
    leaves = [
        HtbClass.with_rate(FIRST_LEAF + i, 0x1, 100 * MBIT, 10_000 * MBIT, i % 8)
        for i in range(LEAVES)
    ]
    if changed_rate_bps is not None:
        leaves[0] = HtbClass.with_rate(FIRST_LEAF, 0x1, changed_rate_bps, 10_000 * MBIT, 0)
    filters = [
        U32Filter(FIRST_PREF + i, FIRST_LEAF + i // FILTERS_PER_LEAF,
                  U32Match(dport=PortRange.single(FIRST_PORT + i)))
        for i in range(LEAVES * FILTERS_PER_LEAF)
    ]  # fmt: skip
    return HtbTree(
        device=DEVICE,
        root_major=0xFA,
        default_minor=FIRST_LEAF,
        classes=(HtbClass.with_rate(0x1, None, 10_000 * MBIT), *leaves),
        filters=tuple(filters),
        leaf_kind="pfifo",
    )


def class_args(cls: HtbClass) -> list[str]:
    parent = "fa:" if cls.parent_minor is None else f"fa:{cls.parent_minor:x}"
    return [
        "parent", parent, "classid", f"fa:{cls.minor:x}", "htb",
        "rate", f"{cls.rate_bps}bit", "ceil", f"{cls.ceil_bps}bit",
        "burst", str(burst_for_rate(cls.rate_bps)), "cburst", str(burst_for_rate(cls.ceil_bps)),
        "prio", str(cls.prio), "quantum", str(cls.quantum_bytes),
    ]  # fmt: skip


def cli_build(tree: HtbTree) -> list[list[str]]:
    """The tree as tc commands (arguments after `tc`), in the order a script runs them."""
    dev = ["dev", tree.device]
    commands = [["qdisc", "add", *dev, "root", "handle", "fa:", "htb", "default",
                 f"{tree.default_minor:x}"]]  # fmt: skip
    commands += [["class", "add", *dev, *class_args(c)] for c in tree.classes]
    commands += [
        ["qdisc", "add", *dev, "parent", f"fa:{c.minor:x}", "handle", f"{c.minor:x}:",
         "pfifo", "limit", "1000"]
        for c in tree.classes if c.parent_minor is not None
    ]  # fmt: skip
    for f in tree.filters:
        assert f.match.dport is not None
        commands.append(
            ["filter", "add", *dev, "parent", "fa:", "protocol", "ip", "pref", str(f.pref),
             "u32", "match", "ip", "dport", str(f.match.dport.first), "0xffff",
             "flowid", f"fa:{f.flow_minor:x}"]
        )  # fmt: skip
    return commands


def cli_change(tree: HtbTree) -> list[list[str]]:
    leaf = next(c for c in tree.classes if c.minor == FIRST_LEAF)
    return [["class", "change", "dev", tree.device, *class_args(leaf)]]


def tc_argv(netns: str | None) -> list[str]:
    return ["tc"] if netns is None else ["ip", "netns", "exec", netns, "tc"]


def run_cli(netns: str | None, commands: Sequence[list[str]]) -> None:
    for command in commands:
        subprocess.run([*tc_argv(netns), *command], check=True)


def run_batch(netns: str | None, commands: Sequence[list[str]]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".tc") as script:
        script.write("".join(" ".join(c) + "\n" for c in commands))
        script.flush()
        subprocess.run([*tc_argv(netns), "-batch", script.name], check=True)


def open_socket(netns: str | None) -> None:
    (IPRoute() if netns is None else IPRoute(netns=netns)).close()


def timed_ms(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def check(netns: str | None, want: HtbTree, path: str) -> None:
    got = read_tree(DEVICE, netns=netns)
    if got is None or plan(want, got):
        raise SystemExit(f"{path}: the kernel's tree differs from the desired one")


def policy_file(rate_first: str = "100Mbit") -> str:
    """A policy whose classes make the tree of `desired_tree` (one filter per class and
    address family: 128 for 64 classes)."""
    lines = [
        "apiVersion: fabric.qos/v1alpha1",
        "kind: QosPolicy",
        "metadata: {name: bench}",
        "spec:",
        f"  interface: {DEVICE}",
        "  direction: egress",
        "  bandwidth: 10Gbit",
        "  defaultClass: c0",
        "  classes:",
    ]
    for i in range(LEAVES):
        rate = rate_first if i == 0 else "100Mbit"
        lines.append(
            f"    - {{name: c{i}, priority: {i % 8}, rate: {rate}, "
            f'match: [{{dstPorts: ["{FIRST_PORT + i}"]}}]}}'
        )
    return "\n".join(lines) + "\n"


def daemon_passes(netns: str | None, times: dict[str, list[float]]) -> None:
    """The daemon's pass after a one-class edit of the policy file, then with nothing to
    do; the tree is built (untimed) and taken down after."""
    with tempfile.TemporaryDirectory(prefix="fabbench-") as directory:
        policy_dir = Path(directory) / "policies"
        policy_dir.mkdir()
        path = policy_dir / "bench.yaml"
        path.write_text(policy_file())
        reconciler = Reconciler(QosSettings(policy_dir, Path(directory) / "state", netns=netns))
        try:
            if reconciler.reconcile().result != "success":
                raise SystemExit("daemon pass: the policy was not enforced")
            path.write_text(policy_file(rate_first="50Mbit"))
            result = None

            def edited() -> None:
                nonlocal result
                result = reconciler.reconcile()

            times["daemon pass, one class edited"].append(timed_ms(edited))
            if result is None or len(result.changes) != 1:
                raise SystemExit(f"daemon pass: expected one change, got {result}")
            times["daemon pass, nothing to do"].append(timed_ms(reconciler.reconcile))
            # What each pass would add if it parsed the unchanged file again.
            times["policy file parse"].append(timed_ms(lambda: load_policy_files([path])))
            reconciler.remove_all()
        finally:
            reconciler.close()


def repetition(netns: str | None, times: dict[str, list[float]]) -> None:
    built, changed = desired_tree(), desired_tree(changed_rate_bps=50 * MBIT)
    build_plan = plan(built, None)
    change_plan = plan(changed, built)
    assert len(change_plan) == 1, change_plan

    times["agent build"].append(timed_ms(lambda: apply(build_plan, netns=netns, before=None)))
    check(netns, built, "agent build")
    times["agent read_tree"].append(timed_ms(lambda: read_tree(DEVICE, netns=netns)))
    times["agent socket open"].append(timed_ms(lambda: open_socket(netns)))
    times["agent change"].append(timed_ms(lambda: apply(change_plan, netns=netns, before=built)))
    check(netns, changed, "agent change")
    remove_tree(DEVICE, netns=netns)
    daemon_passes(netns, times)

    build, change = cli_build(built), cli_change(changed)
    for label, runner in (("tc CLI", run_cli), ("tc -batch", run_batch)):
        times[f"{label} build"].append(timed_ms(partial(runner, netns, build)))
        check(netns, built, f"{label} build")
        times[f"{label} change"].append(timed_ms(partial(runner, netns, change)))
        check(netns, changed, f"{label} change")
        remove_tree(DEVICE, netns=netns)


KEYS = [f"{p} {op}" for p in ("agent", "tc CLI", "tc -batch") for op in ("build", "change")]
KEYS += ["daemon pass, one class edited", "daemon pass, nothing to do", "policy file parse"]
KEYS += ["agent read_tree", "agent socket open"]


def measure(netns: str | None, repetitions: int) -> dict[str, float]:
    """Medians in ms; `netns` None: this process and `tc` already run in the namespace."""
    repetition(netns, {k: [] for k in KEYS})  # warm-up: imports, caches
    times: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(repetitions):
        repetition(netns, times)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, median: dict[str, float]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| operation | agent (netlink) | tc CLI, a process per command | tc -batch, one process "
        "| tc CLI / agent | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for op, goal_ms in (("build", GOAL_BUILD_MS), ("change", GOAL_CHANGE_MS)):
        agent, cli, batch = (median[f"{p} {op}"] for p in ("agent", "tc CLI", "tc -batch"))
        name = f"{LEAVES}-class build" if op == "build" else "one-class rate change"
        lines.append(
            f"| {name} | {agent:.2f} ms | {cli:.2f} ms | {batch:.2f} ms | {cli / agent:.2f} "
            f"| agent <= {goal_ms:.0f} ms, ratio >= {GOAL_RATIO:.0f} |"
        )
    edited, steady = median["daemon pass, one class edited"], median["daemon pass, nothing to do"]
    lines += [
        f"| the daemon's pass, one class edited in the file | {edited:.2f} ms | | "
        f"| {median['tc CLI change'] / edited:.2f} | |",
        f"| the daemon's pass, nothing to do | {steady:.2f} ms | | | | |",
        f"| parsing the policy file (a pass skips it while unchanged) "
        f"| {median['policy file parse']:.2f} ms | | | | |",
        f"| `read_tree` alone (259 objects) | {median['agent read_tree']:.2f} ms | | | | |",
        f"| opening the netlink socket alone | {median['agent socket open']:.2f} ms | | | | |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--repetitions", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("qos_apply: needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    netns = f"fabbench-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", DEVICE, "type", "veth", "peer",
                        "name", "fabbench1"], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", netns, "link", "set", DEVICE, "up"], check=True)
        objects = 3 + LEAVES * 2 + LEAVES * FILTERS_PER_LEAF
        print(
            f"{args.repetitions} repetitions, medians, wall clock; {LEAVES} leaf classes, "
            f"{LEAVES * FILTERS_PER_LEAF} u32 filters: {objects} kernel objects, "
            f"{objects - 1} tc commands\n"
        )
        outside = measure(netns, args.repetitions)
        print(report(f"From outside the namespace (agent `netns={netns}`, "
                     "`ip netns exec NS tc`)", outside) + "\n")  # fmt: skip
        # As on a host: the agent and tc run in the namespace they change. Last, because
        # this process cannot leave it again.
        pyroute2_netns.setns(netns)
        inside = measure(None, args.repetitions)
        print(report("Inside the namespace (agent `netns=None`, plain `tc`)", inside))
    finally:
        # The namespace outlives its name while this process is in it; it goes at exit.
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
