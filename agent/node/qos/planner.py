"""The one planner: what must change so that the kernel holds the desired state.

It reads the kernel through `QosKernel` and changes nothing. The daemon applies the plan
it returns (agent.node.qos.enforce); `fabric-agent policy plan` and the API's dry runs
print it. Per policy: its ingress redirect when one is missing, then the changes to its
HTB tree (agent.node.qos.htb.plan: the difference only). Policies the agent applied
before and no longer wants are taken down, unless their device now belongs to another
policy (renamed, or handed over). The nftables table is loaded when its body changed or
the kernel's copy differs from the one last loaded.

A policy that cannot be put in place keeps what it had: nothing of it is removed (not
the tree it had on another interface either), and its nftables rules are those it was
last applied with (none when it never was), so a failed policy neither loses its
shaping nor gains remarking it does not have.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from agent.common.errors import FabricError
from agent.common.policy.model import QosPolicy
from agent.node.qos import htb
from agent.node.qos.desired import DesiredPolicy, DesiredState, KernelOptions, nft_body
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
    # What the plan was made from, for enforcement to plan the table again when a policy
    # fails as it is applied.
    desired: DesiredState
    options: KernelOptions
    # Applied policies whose device another policy takes over, by the name of that
    # policy: their record goes once it is in place, and stays if it fails.
    handovers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(p.steps for p in self.policies) and not self.removals and not self.nft.step

    @property
    def errors(self) -> dict[str, str]:
        """Why a policy (or the table, under NFT_DEVICE) cannot be put in place."""
        errors = dict(self.desired.errors)
        errors.update({p.name: p.error for p in self.policies if p.error is not None})
        if self.nft.error is not None:
            errors[NFT_DEVICE] = self.nft.error
        return errors

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


def plan(
    desired: DesiredState, kernel: QosKernel, applied: QosState, options: KernelOptions
) -> Plan:
    """The plan that turns what `kernel` holds into `desired`; `applied` is what the agent
    last applied (its policies' devices, the table as last loaded)."""
    policies = tuple(_plan_policy(policy, kernel) for policy in desired.policies)
    failed = set(desired.errors) | {p.name for p in policies if p.error is not None}
    owners = {p.device: p.name for p in desired.policies}
    removals: list[Removal] = []
    handovers: dict[str, list[str]] = {}
    for name, previous in sorted(applied.policies.items()):
        wanted = desired.policy(name)
        if name in failed or (wanted is not None and wanted.device == previous.device):
            continue  # in place, or kept where it was while it cannot be moved
        owner = owners.get(previous.device)
        if owner is not None:
            # Renamed, or handed to another policy: its tree is that policy's now.
            handovers.setdefault(owner, []).append(name)
            continue
        removals.append(Removal(previous, _removal_steps(previous)))
    kept = failed | {old for owner in failed for old in handovers.get(owner, ())}
    nft = plan_nft(desired, applied, kept, kernel, options)
    return Plan(
        policies,
        tuple(removals),
        nft,
        desired,
        options,
        {owner: tuple(names) for owner, names in handovers.items()},
    )


def plan_nft(
    desired: DesiredState,
    applied: QosState,
    kept: Collection[str],
    kernel: QosKernel,
    options: KernelOptions,
) -> NftPlan:
    """The table for the desired policies, but for `kept` ones: those are classified as
    they were last applied (or not at all), since their trees stay as they were."""
    classified = [(p.policy, p.minors) for p in desired.policies if p.name not in kept]
    for name in sorted(kept):
        record = applied.policies.get(name)
        policy = _applied_policy(record) if record is not None else None
        if record is not None and policy is not None:
            classified.append((policy, record.minors))
    try:
        body = nft_body(classified, options)
    except FabricError as exc:
        return NftPlan(error=str(exc))
    return _plan_table(body, kernel, applied)


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


def _removal_steps(previous: AppliedPolicy) -> tuple[KernelStep, ...]:
    steps: list[KernelStep] = [RemoveTree(previous.device)]
    if previous.direction == "ingress":
        steps.append(RemoveRedirect(previous.interface))
    return tuple(steps)


def _applied_policy(record: AppliedPolicy) -> QosPolicy | None:
    try:
        return QosPolicy.model_validate(record.document, by_alias=True, by_name=False)
    except ValueError:
        return None  # a record no model accepts classifies nothing


def _plan_table(body: str, kernel: QosKernel, applied: QosState) -> NftPlan:
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
