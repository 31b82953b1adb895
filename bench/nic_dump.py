"""CPU per link dump: pyroute2's decode against agent.node.netlink's, at 30 and 200 links.

Makes a throwaway network namespace with N veth links (N/2 pairs, plus lo), and times
one dump of every link, converted to `agent.node.netlink.Link`, per call:
  pyroute2 full       IPRoute.get_links(): every attribute decoded
  pyroute2 4 attrs    the same request, with a message class that names only IFLA_IFNAME,
                      IFLA_MTU, IFLA_OPERSTATE and IFLA_STATS64
  pyroute2 no attrs   the same request, a message class without attributes: pyroute2's
                      request machinery alone, before any attribute is read
  agent.node.netlink       NetlinkLinkDumper, links unchanged: a counters dump (RTM_GETSTATS)
                      on a plain socket, struct-parsed, joined to the cached link dump
  agent.node.netlink, changed   the same when a link event has arrived: the link dump
                      (RTM_GETLINK, stats skipped) is redone first
CPU time of the process (time.process_time_ns), median and p95 over --calls calls.
Needs root (namespaces); the namespace is deleted on exit, whatever happens.

    sudo .venv/bin/python bench/nic_dump.py [--links 30 200] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import nlmsg
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from agent.node.netlink import Link, LinkStats, NetlinkLinkDumper


class FourAttributes(nlmsg):  # type: ignore[misc]
    fields = ifinfmsg.fields
    nla_map = (
        (3, "IFLA_IFNAME", "asciiz"),
        (4, "IFLA_MTU", "uint32"),
        (16, "IFLA_OPERSTATE", "uint8"),
        (23, "IFLA_STATS64", "ifstats64"),
    )

    class ifstats64(ifinfmsg.ifstats64):  # type: ignore[misc]
        pass


class NoAttributes(nlmsg):  # type: ignore[misc]
    fields = ifinfmsg.fields


_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")


_WANTED = frozenset({"IFLA_IFNAME", "IFLA_OPERSTATE", "IFLA_MTU", "IFLA_STATS64"})


def pyroute2_link(message: Any) -> Link:
    """As the agent's pyroute2 dumper did it: one pass over the attributes, touching only
    the values wanted."""
    attrs: dict[str, Any] = {}
    for slot in message["attrs"]:
        key = slot[0]
        if key in _WANTED and key not in attrs:
            attrs[key] = slot[1]
    stats = attrs["IFLA_STATS64"]
    operstate = attrs.get("IFLA_OPERSTATE", "UNKNOWN")
    if isinstance(operstate, int):  # the 4-attribute class leaves it a number
        operstate = _OPERSTATES[operstate]
    return Link(
        index=int(message["index"]),
        name=str(attrs["IFLA_IFNAME"]),
        operstate=str(operstate).lower(),
        mtu=int(attrs.get("IFLA_MTU", 0)),
        stats=LinkStats._make(int(stats[field]) for field in LinkStats._fields),
    )


@contextmanager
def namespace_with_links(links: int) -> Iterator[str]:
    name = f"fabbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        batch = "".join(f"link add b{i}a type veth peer name b{i}b\n" for i in range(links // 2))
        subprocess.run(
            ["ip", "-n", name, "-batch", "-"], input=batch, text=True, check=True,
            capture_output=True,
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def cpu_ms(dump: Callable[[], Sequence[Any]], calls: int) -> tuple[float, float, int]:
    """Median and p95 CPU milliseconds per call, and how many links a call returned."""
    count = len(dump())  # warm-up
    samples = []
    for _ in range(calls):
        start = time.process_time_ns()
        dump()
        samples.append((time.process_time_ns() - start) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))], count


def bench(links: int, calls: int) -> list[tuple[str, float, float, int]]:
    rows = []
    with namespace_with_links(links) as netns:
        iproute = IPRoute(groups=0, netns=netns, flags=0)
        marshal = iproute.asyncore.marshal
        try:
            for label, message_class in (
                ("pyroute2 full", ifinfmsg),
                ("pyroute2 4 attrs", FourAttributes),
            ):
                marshal.msg_map[RTM_NEWLINK] = message_class
                rows.append(
                    (label, *cpu_ms(lambda: [pyroute2_link(m) for m in iproute.get_links()], calls))
                )
            marshal.msg_map[RTM_NEWLINK] = NoAttributes
            rows.append(("pyroute2 no attrs", *cpu_ms(lambda: list(iproute.get_links()), calls)))
        finally:
            iproute.close()
        dumper = NetlinkLinkDumper(netns=netns)
        try:
            rows.append(("agent.node.netlink", *cpu_ms(dumper.dump_links, calls)))

            def after_a_link_event() -> Sequence[Link]:
                dumper._attributes = None  # as a link event does
                return dumper.dump_links()

            rows.append(("agent.node.netlink, changed", *cpu_ms(after_a_link_event, calls)))
        finally:
            dumper.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--links", type=int, nargs="+", default=[30, 200])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("nic_dump: needs root to create a network namespace", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the namespace is deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"CPU per dump, ms, over {args.calls} calls\n")
    print("| links | method | median | p95 |")
    print("|---:|:---|---:|---:|")
    for links in args.links:
        for label, median, p95, count in bench(links, args.calls):
            print(f"| {count} | {label} | {median:.3f} | {p95:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
