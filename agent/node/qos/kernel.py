"""The boundary between the QoS logic and the kernel: `QosKernel`, what it reads and the
steps it applies.

Everything above this module is plain data and pure functions (the policies, the
desired kernel objects, the plan); everything below it talks to the kernel. Two
implementations keep the same contract (tests/node/qos/test_kernel_contract.py): the
netlink and libnftables one (`agent.node.qos.netlink_kernel`) and an in-memory fake the
QoS logic is tested against without root.

A step is applied whole or not at all: `TreeChanges` rolls its device back to the tree
it had when a change fails, a nftables table loads in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from agent.common.errors import FabricError

# ifb_name: validation checks the IFB name an ingress policy derives, too.
from agent.common.policy.limits import IFB_PREFIX as IFB_PREFIX
from agent.common.policy.limits import ifb_name as ifb_name
from agent.node.qos.htb import Change, HtbTree, format_handle
from agent.node.qos.nftrules import TABLE_FAMILY, TABLE_NAME

# The drift and error label of the agent's nftables table (its "device").
NFT_DEVICE = "nftables"
IFNAMSIZ = 15  # usable characters of a Linux interface name
INGRESS_HANDLE = 0xFFFF0000


class TcError(FabricError):
    """A traffic-control operation failed; the message names the device."""


class KernelStateConflict(TcError):
    """The device's root qdisc is someone else's; the agent will not replace it unasked."""

    def __init__(self, device: str, kind: str, handle: int) -> None:
        super().__init__(
            f"{device}: root qdisc is {kind} {format_handle(handle >> 16)}, "
            "not the agent's; refusing to replace it (a policy's spec.takeOver: true would)"
        )
        self.device = device
        self.kind = kind
        self.handle = handle


class IngressConflict(KernelStateConflict):
    """The interface's ingress hook carries filters the agent did not put there."""

    def __init__(self, device: str, kind: str, foreign_filters: int) -> None:
        TcError.__init__(
            self,
            f"{device}: {kind} qdisc {format_handle(INGRESS_HANDLE >> 16)} carries "
            f"{foreign_filters} filter(s) that are not the agent's; refusing to redirect "
            "ingress beside them",
        )
        self.device = device
        self.kind = kind
        self.handle = INGRESS_HANDLE
        self.foreign_filters = foreign_filters


class TcApplyError(TcError):
    """A change of a plan failed; the tree was rolled back to what it was unless
    `rollback_error` says why that failed too."""

    def __init__(
        self, change: Change, errno_code: int, reason: str, rollback_error: str | None = None
    ) -> None:
        text = f"{change.device}: `{change}` failed: {reason} (errno {errno_code}); "
        text += (
            f"rollback failed too: {rollback_error}"
            if rollback_error
            else "rolled back to the previous tree"
        )
        super().__init__(text)
        self.change = change
        self.errno = errno_code
        self.reason = reason
        self.rollback_error = rollback_error


class NftError(FabricError):
    """nftables refused a command, or is not there; the message carries its own text."""


# --- what the kernel reads back ---


@dataclass(frozen=True)
class IngressRedirect:
    """What the kernel has of the agent's redirect on `interface` (for drift checks).

    `qdisc` is the kind on `ffff:` ("ingress", "clsact", another kind, or None);
    `redirect_to` the device the agent's filter sends to (None: no such filter);
    `foreign_filters` the other filters on the ingress hook."""

    interface: str
    ifb: str
    ifb_present: bool
    ifb_up: bool
    qdisc: str | None
    redirect_to: str | None
    foreign_filters: int

    @property
    def complete(self) -> bool:
        """The redirect works as `EnsureRedirect` leaves it."""
        return (
            self.ifb_present
            and self.ifb_up
            and self.qdisc in ("ingress", "clsact")
            and self.redirect_to == self.ifb
        )

    def conflict(self) -> TcError | None:
        """Why the agent may not redirect here (someone else uses the ingress hook)."""
        if self.qdisc not in (None, "ingress", "clsact"):
            return TcError(
                f"{self.interface}: qdisc {self.qdisc} holds ffff:, not ingress or clsact"
            )
        if self.foreign_filters:
            return IngressConflict(self.interface, str(self.qdisc), self.foreign_filters)
        return None


@dataclass(frozen=True)
class ClassStats:
    """Counters of one class since it was created. `rate_bps` only when the kernel runs a
    rate estimator on the class (none unless asked for), else None."""

    minor: int
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog_bytes: int
    rate_bps: int | None


@dataclass(frozen=True)
class TcCapabilities:
    """What this kernel can do for QoS."""

    htb: bool
    pfifo: bool
    fq_codel: bool
    u32: bool
    ingress: bool
    clsact: bool
    mirred: bool
    ifb: bool

    @property
    def leaf_kind(self) -> str:
        """The leaf qdisc to use: fq_codel where there is one."""
        return "fq_codel" if self.fq_codel else "pfifo"


# The agent's nftables table as the kernel lists it back (nftables JSON): compared with
# the listing taken after the last load, rule handles included, to tell drift.
NftListing = dict[str, Any]


# --- the steps a plan is made of ---


@dataclass(frozen=True)
class TreeChanges:
    """Make `changes` to the agent's HTB tree on `device`; `before` is the tree they were
    planned from (None: none there), the target of a rollback."""

    device: str
    changes: tuple[Change, ...]
    before: HtbTree | None

    def lines(self) -> list[str]:
        return [str(change) for change in self.changes]

    def done(self) -> list[str]:
        return self.lines()


@dataclass(frozen=True)
class EnsureRedirect:
    """Redirect what `interface` receives to its IFB device `ifb` (created if missing)."""

    interface: str
    ifb: str

    def lines(self) -> list[str]:
        return [f"+ ingress redirect {self.interface} -> {self.ifb} (IFB)"]

    def done(self) -> list[str]:
        return self.lines()


@dataclass(frozen=True)
class RemoveTree:
    """Delete the agent's root qdisc on `device` (with every class, leaf and filter)."""

    device: str

    def lines(self) -> list[str]:
        return [f"- HTB tree on {self.device}"]

    def done(self) -> list[str]:
        return [f"removed from {self.device}"]


@dataclass(frozen=True)
class RemoveRedirect:
    """Undo `EnsureRedirect` on `interface`: its filter, the ingress qdisc when nothing
    else uses it, and the IFB device."""

    interface: str

    def lines(self) -> list[str]:
        return [f"- ingress redirect {self.interface} -> {ifb_name(self.interface)} (IFB)"]

    def done(self) -> list[str]:
        return []  # reported with the tree's removal


@dataclass(frozen=True)
class LoadNftTable:
    """Make the agent's table exactly `body`, in one transaction; `rules` is how many
    rules it holds, `replacing` whether a table is there already."""

    body: str
    rules: int
    replacing: bool

    def lines(self) -> list[str]:
        action = "~ reload" if self.replacing else "+ load"
        return [f"nftables table {TABLE_FAMILY} {TABLE_NAME}: {action} ({self.rules} rules)"]

    def done(self) -> list[str]:
        return ["nftables table reloaded"]


@dataclass(frozen=True)
class DeleteNftTable:
    """Delete the agent's table: no policy needs it."""

    def lines(self) -> list[str]:
        return [f"nftables table {TABLE_FAMILY} {TABLE_NAME}: - delete (no policy needs it)"]

    def done(self) -> list[str]:
        return ["nftables table deleted"]


KernelStep = (
    TreeChanges | EnsureRedirect | RemoveTree | RemoveRedirect | LoadNftTable | DeleteNftTable
)


@dataclass(frozen=True)
class AgentObjects:
    """What of the agent's the kernel holds, wherever it is: the devices with an HTB root
    of the agent's handle, the interfaces with its ingress redirect, its IFB devices
    (`ifb-*`). A start-up compares them with what the state and the policies claim."""

    trees: frozenset[str] = frozenset()
    redirects: frozenset[str] = frozenset()
    ifbs: frozenset[str] = frozenset()


class QosKernel(Protocol):
    """What the QoS logic needs of the kernel: a few reads and one way to change it."""

    def capabilities(self) -> TcCapabilities:
        """What traffic control can do here (the leaf qdisc to use)."""
        ...

    def interface_exists(self, name: str) -> bool: ...

    def read_tree(self, device: str, *, take_over: bool = False) -> HtbTree | None:
        """The agent's tree on `device`; None when it has none there. Raises TcError for a
        missing device and KernelStateConflict for another root qdisc, unless
        `take_over` (then None, so that a plan replaces it)."""
        ...

    def read_redirect(self, interface: str) -> IngressRedirect:
        """The agent's ingress redirect on `interface`; TcError for a missing interface."""
        ...

    def read_nft_table(self) -> NftListing | None:
        """The agent's nftables table as listed; None when absent. NftError when nftables
        cannot be used here."""
        ...

    def class_stats(self, device: str) -> dict[int, ClassStats]:
        """The counters of the agent's classes on `device`, by class minor."""
        ...

    def apply(self, step: KernelStep) -> None:
        """Make one step, whole or not at all; raises TcError or NftError."""
        ...

    def agent_objects(self) -> AgentObjects:
        """Every tree, ingress redirect and IFB device of the agent's in the kernel."""
        ...

    def close(self) -> None: ...
