"""The one planner: what must change so that the kernel holds the desired state.

It reads the kernel through `QosKernel` and changes nothing. The daemon applies the plan
it returns (agent.node.qos.enforce); `fabric-agent policy plan` and the API's dry runs
print it. Per policy: its ingress redirect when one is missing, then the changes to its
HTB tree (agent.node.qos.htb.plan: the difference only). Policies the agent applied
before and no longer wants are taken down, unless their device now belongs to another
policy (renamed, or handed over). The nftables table is loaded when its body changed or
the kernel's copy differs from the one last loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.common.errors import FabricError
from agent.node.qos import htb
from agent.node.qos.desired import DesiredPolicy, DesiredState
from agent.node.qos.kernel import (
    NFT_DEVICE,
    DeleteNftTable,
    EnsureRedirect,
    KernelStep,
    LoadNftTable,
    NftError,
    QosKernel,
    RemoveRedirect,
    RemoveTree,
    TreeChanges,
)
from agent.node.qos.state import AppliedPolicy, QosState


@dataclass(frozen=True)
class PolicyPlan:
    """The steps that put one policy in place; `error` when it cannot be (a foreign root
    qdisc, a missing device), with no steps."""

    desired: DesiredPolicy
    steps: tuple[KernelStep, ...] = ()
    error: str | None = None

    @property
    def name(self) -> str:
        return self.desired.name


@dataclass(frozen=True)
class Removal:
    """A policy applied before that is no longer wanted: its tree and redirect go."""

    applied: AppliedPolicy
    steps: tuple[KernelStep, ...]

    @property
    def name(self) -> str:
        return self.applied.name


@dataclass(frozen=True)
class NftPlan:
    """What to do with the agent's nftables table. `drifted`: the body is what was last
    loaded, the kernel's copy is not (someone changed it)."""

    step: LoadNftTable | DeleteNftTable | None = None
    drifted: bool = False
    error: str | None = None
    # The body the table should have ("": no table).
    body: str = ""


@dataclass(frozen=True)
class Plan:
    """Everything one pass would change."""

    policies: tuple[PolicyPlan, ...]
    removals: tuple[Removal, ...]
    nft: NftPlan
    # Policies that could not even be built (agent.node.qos.desired.DesiredState.errors).
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(p.steps for p in self.policies) and not self.removals and not self.nft.step

    def lines(self, names: Iterable[str] | None = None) -> list[str]:
        """Every change as `policy: change` (the table's as its own line), in the order
        they would be made; only those of `names` (and the table) when given."""
        wanted = None if names is None else set(names)
        lines: list[str] = []
        items: list[PolicyPlan | Removal] = [*self.policies, *self.removals]
        for item in items:
            if wanted is None or item.name in wanted:
                lines.extend(f"{item.name}: {line}" for step in item.steps for line in step.lines())
        if self.nft.step is not None:
            lines.extend(self.nft.step.lines())
        return lines


def plan(desired: DesiredState, kernel: QosKernel, applied: QosState) -> Plan:
    """The plan that turns what `kernel` holds into `desired`; `applied` is what the agent
    last applied (its policies' devices, the table as last loaded)."""
    policies = tuple(_plan_policy(policy, kernel) for policy in desired.policies)
    in_use = {p.device for p in desired.policies}
    removals = tuple(
        Removal(previous, _removal_steps(previous))
        for name, previous in sorted(applied.policies.items())
        if not _kept(name, previous, desired, in_use)
    )
    nft_error = desired.errors.get(NFT_DEVICE)
    nft = NftPlan(error=nft_error) if nft_error else _plan_nft(desired.nft_body, kernel, applied)
    errors = {k: v for k, v in desired.errors.items() if k != NFT_DEVICE}
    return Plan(policies, removals, nft, errors)


def _plan_policy(policy: DesiredPolicy, kernel: QosKernel) -> PolicyPlan:
    steps: list[KernelStep] = []
    try:
        actual = None
        if policy.direction == "ingress":
            redirect = kernel.read_redirect(policy.interface)
            conflict = redirect.conflict()
            if conflict is not None:
                raise conflict
            if not redirect.complete:
                steps.append(EnsureRedirect(policy.interface, policy.device))
            if redirect.ifb_present:
                actual = kernel.read_tree(policy.device, take_over=policy.take_over)
        else:
            actual = kernel.read_tree(policy.device, take_over=policy.take_over)
        changes = htb.plan(policy.tree, actual)
    except FabricError as exc:
        return PolicyPlan(policy, error=str(exc))
    if changes:
        steps.append(TreeChanges(policy.device, tuple(changes), actual))
    return PolicyPlan(policy, tuple(steps))


def _kept(name: str, previous: AppliedPolicy, desired: DesiredState, in_use: set[str]) -> bool:
    """Whether what `previous` put in the kernel stays: its policy still wants that device,
    or the device is another policy's now (which plans it from what is there)."""
    wanted = desired.policy(name)
    if wanted is not None and wanted.device == previous.device:
        return True
    return previous.device in in_use


def _removal_steps(previous: AppliedPolicy) -> tuple[KernelStep, ...]:
    steps: list[KernelStep] = [RemoveTree(previous.device)]
    if previous.direction == "ingress":
        steps.append(RemoveRedirect(previous.interface))
    return tuple(steps)


def _plan_nft(body: str, kernel: QosKernel, applied: QosState) -> NftPlan:
    if not body.strip():
        # Nothing to classify: a host without libnftables (or a run without
        # CAP_NET_ADMIN and no policies) never needs the table.
        try:
            present = kernel.read_nft_table() is not None
        except NftError:
            return NftPlan()
        return NftPlan(DeleteNftTable() if present else None)
    try:
        listing = kernel.read_nft_table()
    except NftError as exc:
        return NftPlan(error=str(exc), body=body)
    if body == applied.nft_body and listing == applied.nft_listing:
        return NftPlan(body=body)
    step = LoadNftTable(body, _rule_count(body), replacing=listing is not None)
    return NftPlan(step, drifted=body == applied.nft_body, body=body)


def _rule_count(body: str) -> int:
    lines = (line.strip() for line in body.splitlines())
    return sum(1 for line in lines if line and not line.startswith(("chain", "type", "}")))
