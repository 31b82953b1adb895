"""Ingress shaping: redirect what an interface receives to an IFB device, whose egress
the ordinary HTB tree then shapes.

An interface's ingress has no queue to shape, so the agent puts an `ingress` qdisc
(`ffff:`) on it with one u32 match-all filter whose action is `mirred egress redirect`
to an IFB device (`ifb_name(interface)`); packets leave the IFB through its root qdisc
and re-enter the stack as if received by the interface. The tree for an ingress policy
is built for `ifb_name(interface)` and applied like any other (agent.node.qos.netlink_kernel).
Shaping there cannot win back link bandwidth already spent:
it slows the senders (TCP backs off on the drops and delay), it does not stop a flood.

Netlink through pyroute2 only. The kernel keeps no owner label, so the agent recognises
its filter by shape: u32 at pref `REDIRECT_PREF`, matching everything, with a single
mirred egress redirect. Any other filter on the interface's ingress hook is someone
else's, and the agent then leaves the hook alone (KernelStateConflict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.node.qos.kernel import (
    IFB_PREFIX,
    INGRESS_HANDLE,
    IngressConflict,
    IngressRedirect,
    TcError,
    ifb_name,
)
from agent.node.qos.tc import _index, _iproute, _sel_bytes

TC_H_INGRESS = 0xFFFFFFF1  # the parent of an ingress or clsact qdisc
TC_H_MIN_INGRESS = 0xFFF2  # clsact's ingress hook (ffff:fff2) ...
TC_H_MIN_EGRESS = 0xFFF3  # ... and egress hook
ETH_P_ALL = 0x0003
# The agent's filter pref on the ingress hook: fa, as the root major of its HTB trees.
REDIRECT_PREF = 0xFA
# u32 stores a class id even where the qdisc (ingress) has no classes; tc's recipes use 1:1.
_REDIRECT_CLASSID = 0x10001
_TCA_EGRESS_REDIR = 1  # mirred eaction
_TC_ACT_STOLEN = 4


# --- reading ---


@dataclass
class _Hook:
    kind: str | None  # the qdisc on ffff:, None when there is none
    parent: int  # where filters for received packets attach
    ours: list[Any]  # the agent's filter messages (with their selector)
    redirect_ifindex: int | None
    foreign: int


def _mirred_target(msg: Any) -> int | None:
    """The ifindex of a u32 filter that is the agent's redirect, else None."""
    if msg.get_attr("TCA_KIND") != "u32" or msg["info"] >> 16 != REDIRECT_PREF:
        return None
    options = msg.get_attr("TCA_OPTIONS")
    sel = options.get_attr("TCA_U32_SEL")
    if _sel_bytes(sel) or sel["nkeys"] != 1:  # match-all is one all-zero key
        return None
    actions = options.get_attr("TCA_U32_ACT")
    entries = [] if actions is None else [a for _, a in actions["attrs"]]
    if len(entries) != 1 or entries[0].get_attr("TCA_ACT_KIND") != "mirred":
        return None
    parms = entries[0].get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
    if parms["eaction"] != _TCA_EGRESS_REDIR or parms["action"] != _TC_ACT_STOLEN:
        return None
    return int(parms["ifindex"])


def _read_hook(ipr: Any, index: int) -> _Hook:
    qdisc = next((q for q in ipr.get_qdiscs(index) if q["parent"] == TC_H_INGRESS), None)
    if qdisc is None:
        return _Hook(None, INGRESS_HANDLE, [], None, 0)
    kind = str(qdisc.get_attr("TCA_KIND"))
    major = qdisc["handle"] & 0xFFFF0000
    # clsact: the agent uses the ingress hook; a filter on the egress hook is still
    # someone else's business on this qdisc, so it counts as foreign.
    parents = [major | TC_H_MIN_INGRESS, major | TC_H_MIN_EGRESS] if kind == "clsact" else [major]
    hook = _Hook(kind, parents[0], [], None, 0)
    for parent in parents:
        for msg in ipr.get_filters(index, parent=parent):
            options = msg.get_attr("TCA_OPTIONS")
            if msg.get_attr("TCA_KIND") == "u32" and (
                options is None or options.get_attr("TCA_U32_SEL") is None
            ):
                continue  # a u32 pref's chain header or hash table, not a rule
            target = _mirred_target(msg) if parent == hook.parent else None
            if target is None:
                hook.foreign += 1
            else:
                hook.ours.append(msg)
                hook.redirect_ifindex = target
    return hook


def _ifb_link(ipr: Any, name: str) -> Any | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    return ipr.get_links(found[0])[0]


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def agent_ifbs_and_redirects(*, netns: str | None = None) -> tuple[set[str], set[str]]:
    """The agent's IFB devices (kind ifb, named `ifb-*`) and the interfaces carrying its
    ingress redirect, on the whole host (or namespace)."""
    ifbs: set[str] = set()
    redirects: set[str] = set()
    with _iproute(netns) as ipr:
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            if _link_kind(link) == "ifb" and name.startswith(IFB_PREFIX):
                ifbs.add(name)
                continue
            if _read_hook(ipr, int(link["index"])).ours:
                redirects.add(name)
    return ifbs, redirects


def read_ingress_redirect(interface: str, *, netns: str | None = None) -> IngressRedirect:
    """The agent's ingress redirect on `interface` as the kernel has it."""
    ifb = ifb_name(interface)
    with _iproute(netns) as ipr:
        index = _index(ipr, interface)
        hook = _read_hook(ipr, index)
        link = _ifb_link(ipr, ifb)
        redirect_to = None
        if hook.redirect_ifindex == 0:
            redirect_to = ""  # mirred forgets a device that is deleted under it
        elif hook.redirect_ifindex is not None:
            try:
                target = ipr.get_links(hook.redirect_ifindex)[0]
                redirect_to = str(target.get_attr("IFLA_IFNAME"))
            except NetlinkError:
                redirect_to = ""  # the device it redirects to is gone
    return IngressRedirect(
        interface=interface,
        ifb=ifb,
        ifb_present=link is not None and _link_kind(link) == "ifb",
        ifb_up=link is not None and bool(link["flags"] & 1),  # IFF_UP
        qdisc=hook.kind,
        redirect_to=redirect_to,
        foreign_filters=hook.foreign,
    )


# --- changing ---


def ensure_ingress_redirect(interface: str, *, netns: str | None = None) -> str:
    """Redirect what `interface` receives to its IFB device; returns the IFB's name.

    Creates the IFB (and sets it up), the ingress qdisc and the agent's filter where
    missing; changes nothing where all is in place. Raises IngressConflict (a
    KernelStateConflict) before touching anything when the ingress hook carries filters
    that are not the agent's, TcError when the IFB name is taken by another kind of
    device or a step fails."""
    ifb = ifb_name(interface)
    with _iproute(netns) as ipr:
        index = _index(ipr, interface)
        hook = _read_hook(ipr, index)
        if hook.kind not in (None, "ingress", "clsact"):
            raise TcError(f"{interface}: qdisc {hook.kind} holds ffff:, not ingress or clsact")
        if hook.foreign:
            raise IngressConflict(interface, str(hook.kind), hook.foreign)
        link = _ifb_link(ipr, ifb)
        if link is not None and _link_kind(link) != "ifb":
            raise TcError(f"{interface}: {ifb} exists and is a {_link_kind(link)}, not an ifb")
        try:
            if link is None:
                ipr.link("add", ifname=ifb, kind="ifb")
                link = _ifb_link(ipr, ifb)
                if link is None:
                    raise TcError(f"{interface}: {ifb} was created and is gone again")
            ifb_index = int(link["index"])
            if not link["flags"] & 1:
                ipr.link("set", index=ifb_index, state="up")
            if hook.kind is None:
                ipr.tc("add", "ingress", index, INGRESS_HANDLE)
            if hook.redirect_ifindex == ifb_index and len(hook.ours) == 1:
                return ifb
            if hook.ours:  # pointing at a deleted or recreated IFB: replace it
                _delete_filter(ipr, index, hook.parent)
            ipr.tc(
                "add-filter",
                "u32",
                index,
                parent=hook.parent,
                prio=REDIRECT_PREF,
                protocol=ETH_P_ALL,
                target=_REDIRECT_CLASSID,
                keys=["0x0/0x0+0"],
                action=[
                    {
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": ifb_index,
                    }
                ],
            )
        except NetlinkError as exc:
            raise TcError(f"{interface}: setting up the ingress redirect to {ifb}: {exc}") from exc
    return ifb


def _delete_filter(ipr: Any, index: int, parent: int) -> None:
    ipr.tc(
        "del-filter",
        "u32",
        index,
        parent=parent,
        prio=REDIRECT_PREF,
        protocol=ETH_P_ALL,
        target=0,
    )


def remove_ingress_redirect(interface: str, *, netns: str | None = None) -> bool:
    """Undo `ensure_ingress_redirect`: the agent's filter, the ingress qdisc when no other
    filter is attached to it, and the IFB device (with the tree on it). False when there
    was nothing of the agent's to remove. An interface that is gone took its ingress
    qdisc and filter with it; its IFB device is still the agent's to delete."""
    ifb = ifb_name(interface)
    removed = False
    with _iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=interface)
        index = int(found[0]) if found else None
        hook = (
            _read_hook(ipr, index)
            if index is not None
            else _Hook(None, INGRESS_HANDLE, [], None, 0)
        )
        try:
            if hook.ours and index is not None:
                _delete_filter(ipr, index, hook.parent)
                removed = True
            # clsact is never the agent's (it adds `ingress`): it stays, as do foreign filters.
            if hook.kind == "ingress" and not hook.foreign and index is not None:
                ipr.tc("del", index=index, handle=INGRESS_HANDLE, parent=TC_H_INGRESS)
                removed = True
            link = _ifb_link(ipr, ifb)
            if link is not None and _link_kind(link) == "ifb":
                ipr.link("del", index=int(link["index"]))
                removed = True
        except NetlinkError as exc:
            raise TcError(f"{interface}: removing the ingress redirect to {ifb}: {exc}") from exc
    return removed
