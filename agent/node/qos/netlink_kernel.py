"""`QosKernel` on the real kernel: traffic control over netlink (pyroute2; agent.node.qos.tc
and agent.node.qos.ifb) and the agent's nftables table through libnftables in-process
(agent.node.qos.nftables). Never a subprocess.

`netns` names a network namespace under /run/netns to work in (tests); None is the
agent's own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from pyroute2 import IPRoute

from agent.node.qos import ifb, tc
from agent.node.qos.htb import HtbTree
from agent.node.qos.kernel import (
    AgentObjects,
    ClassStats,
    DeleteNftTable,
    EnsureRedirect,
    IngressRedirect,
    KernelStep,
    LoadNftTable,
    NftListing,
    RemoveRedirect,
    RemoveTree,
    TcCapabilities,
    TreeChanges,
)
from agent.node.qos.nftables import Nftables
from agent.node.qos.nftrules import TABLE_FAMILY, TABLE_NAME

log = logging.getLogger(__name__)


class NetlinkKernel:
    """The kernel of this host (or of network namespace `netns`)."""

    def __init__(
        self, netns: str | None = None, *, capabilities: TcCapabilities | None = None
    ) -> None:
        self.netns = netns
        self._capabilities = capabilities
        self._nft: Nftables | None = None
        self._lock = threading.Lock()

    def capabilities(self) -> TcCapabilities:
        if self._capabilities is None:
            caps = tc.detect_capabilities()
            found = [f.name for f in dataclasses.fields(caps) if getattr(caps, f.name)]
            missing = [f.name for f in dataclasses.fields(caps) if not getattr(caps, f.name)]
            log.info(
                "traffic control: kernel has %s; lacks %s; leaf qdisc %s",
                ", ".join(found) or "nothing usable",
                ", ".join(missing) or "nothing",
                caps.leaf_kind,
            )
            self._capabilities = caps
        return self._capabilities

    def interface_exists(self, name: str) -> bool:
        with IPRoute(netns=self.netns) if self.netns else IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    def read_tree(self, device: str, *, take_over: bool = False) -> HtbTree | None:
        return tc.read_tree(device, netns=self.netns, take_over=take_over)

    def read_redirect(self, interface: str) -> IngressRedirect:
        return ifb.read_ingress_redirect(interface, netns=self.netns)

    def read_nft_table(self) -> NftListing | None:
        return self._nftables().list_table(TABLE_FAMILY, TABLE_NAME)

    def class_stats(self, device: str) -> dict[int, ClassStats]:
        return tc.class_stats(device, netns=self.netns)

    def apply(self, step: KernelStep) -> None:
        if isinstance(step, TreeChanges):
            tc.apply(step.changes, netns=self.netns, before=step.before)
        elif isinstance(step, EnsureRedirect):
            ifb.ensure_ingress_redirect(step.interface, netns=self.netns)
        elif isinstance(step, RemoveTree):
            tc.remove_tree(step.device, netns=self.netns)
        elif isinstance(step, RemoveRedirect):
            ifb.remove_ingress_redirect(step.interface, netns=self.netns)
        elif isinstance(step, LoadNftTable):
            self._nftables().replace_table(TABLE_FAMILY, TABLE_NAME, step.body)
        elif isinstance(step, DeleteNftTable):
            self._nftables().delete_table(TABLE_FAMILY, TABLE_NAME)
        else:  # pragma: no cover - KernelStep is closed
            raise TypeError(f"not a kernel step: {step!r}")

    def agent_objects(self) -> AgentObjects:
        ifbs, redirects = ifb.agent_ifbs_and_redirects(netns=self.netns)
        trees = tc.agent_trees(netns=self.netns)
        return AgentObjects(frozenset(trees), frozenset(redirects), frozenset(ifbs))

    def close(self) -> None:
        with self._lock:
            nft, self._nft = self._nft, None
        if nft is not None:
            nft.close()

    def _nftables(self) -> Nftables:
        """One libnftables context, opened on first use: a host that never needs the
        table (or lacks libnftables) never loads the library."""
        with self._lock:
            if self._nft is None:
                self._nft = Nftables(netns=self.netns)
            return self._nft
