"""Applying a plan: each policy's steps through `QosKernel.apply`, one policy at a time.

A policy whose step fails keeps what it had (the kernel rolls the failed step back; the
state keeps its last applied record) and is reported with its error; the others go on.
A policy that fails the first time it is applied leaves nothing behind: not its tree,
not the ingress redirect made for it.
A change to a policy whose document did not change since the last pass is drift
(someone changed the kernel behind the agent's back): it is restored and counted.
Changes are logged here; errors are returned, for the caller to log when they change
(a failure that lasts would otherwise be logged on every pass).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from agent.common.errors import FabricError
from agent.node.qos.desired import DesiredPolicy
from agent.node.qos.kernel import (
    NFT_DEVICE,
    EnsureRedirect,
    KernelStep,
    LoadNftTable,
    QosKernel,
    RemoveRedirect,
    RemoveTree,
)
from agent.node.qos.planner import Plan, PolicyPlan, plan_nft
from agent.node.qos.state import AppliedPolicy, QosState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enforcement:
    """What applying a plan did."""

    changes: tuple[str, ...]
    # Why a policy (or the table, under NFT_DEVICE) is not enforced as desired.
    errors: Mapping[str, str]
    # Drift corrected, by device (NFT_DEVICE for the table).
    drift: Mapping[str, int]
    # What the agent holds now, to persist.
    state: QosState
    # The policies now in the kernel as desired, by name.
    enforced: Mapping[str, DesiredPolicy]


def enforce(
    plan: Plan,
    kernel: QosKernel,
    previous: QosState,
    *,
    enforced_before: Mapping[str, DesiredPolicy],
) -> Enforcement:
    """Apply `plan` to `kernel`. `previous` is the state it was planned against;
    `enforced_before` what the last pass enforced (a difference there is drift, not an
    edit)."""
    changes: list[str] = []
    errors: dict[str, str] = plan.errors
    drift: Counter[str] = Counter()
    applied: dict[str, AppliedPolicy] = {}
    enforced: dict[str, DesiredPolicy] = {}
    failed_now: set[str] = set()
    for item in plan.policies:
        desired = item.desired
        error = item.error or _apply(item, kernel)
        if error is not None:
            errors[item.name] = error
            if item.error is None:
                failed_now.add(item.name)
                _clear_attempt(item, kernel, previous)
            continue
        if item.steps:
            done = [line for step in item.steps for line in step.done()]
            changes.extend(f"{item.name}: {line}" for line in done)
            before = previous.policies.get(item.name)
            unchanged = before is not None and dict(before.document) == dict(desired.document)
            if unchanged and item.name in enforced_before:
                drift[desired.device] += 1
                log.warning("QoS drift on %s corrected: %d change(s)", desired.device, len(done))
            else:
                log.info(
                    "QoS policy %s applied on %s: %d change(s)",
                    item.name,
                    desired.device,
                    len(done),
                )
        applied[item.name] = _record(desired)
        enforced[item.name] = desired
    # What a failed policy had stays, and so does what it was to take over.
    unplaced = set(errors) | {old for owner in errors for old in plan.handovers.get(owner, ())}
    for name in unplaced & previous.policies.keys():
        applied[name] = previous.policies[name]
    for removal in plan.removals:
        if removal.name in failed_now:
            continue  # moved, and refused where it was going: its old tree stays
        try:
            for step in removal.steps:
                kernel.apply(step)
        except FabricError as exc:
            errors[removal.name] = str(exc)
            applied[removal.name] = removal.applied
            continue
        changes.extend(f"{removal.name}: {line}" for step in removal.steps for line in step.done())
        log.info("QoS policy %s removed from %s", removal.name, removal.applied.device)
    nft = plan.nft
    if failed_now:
        # The table was planned as if every policy went in; those that did not keep
        # their rules as they were.
        nft = plan_nft(plan.desired, previous, unplaced, kernel, plan.options)
    nft_body, nft_listing = previous.nft_body, previous.nft_listing
    if not nft.body and nft.error is None:
        nft_body, nft_listing = "", None
    if nft.error is not None:
        errors[NFT_DEVICE] = nft.error
    elif nft.step is not None:
        step = nft.step
        try:
            kernel.apply(step)
            if isinstance(step, LoadNftTable):
                # The kernel's listing (rule handles included) tells drift next time.
                nft_body, nft_listing = step.body, kernel.read_nft_table()
        except FabricError as exc:
            errors[NFT_DEVICE] = str(exc)
        else:
            changes.extend(step.done())
            if nft.drifted:
                drift[NFT_DEVICE] += 1
                log.warning("QoS drift in the nftables table corrected")
    state = QosState(applied, nft_body, nft_listing)
    return Enforcement(tuple(changes), errors, dict(drift), state, enforced)


def _apply(item: PolicyPlan, kernel: QosKernel) -> str | None:
    """Apply the policy's steps in order; the first failure's reason, or None."""
    try:
        for step in item.steps:
            kernel.apply(step)
    except FabricError as exc:
        return str(exc)
    return None


def _clear_attempt(item: PolicyPlan, kernel: QosKernel, previous: QosState) -> None:
    """Remove what a failed first attempt at a policy left: the agent's tree on its
    device and the ingress redirect it made. A failed tree change rolls itself back, but
    the redirect (and its IFB device) came in a step before it, and nothing would ever
    remove them: the policy was never recorded. What an applied policy holds (the same
    device, after a rename) is left alone."""
    desired = item.desired
    held = {p.device for p in previous.policies.values()}
    redirected = {p.interface for p in previous.policies.values() if p.direction == "ingress"}
    steps: list[KernelStep] = []
    if desired.device not in held:
        steps.append(RemoveTree(desired.device))
    made_redirect = any(isinstance(step, EnsureRedirect) for step in item.steps)
    if made_redirect and desired.interface not in redirected:
        steps.append(RemoveRedirect(desired.interface))
    for step in steps:
        try:
            kernel.apply(step)
        except FabricError as exc:
            # Someone else's root qdisc, or the device went: nothing of the agent's there.
            log.debug("QoS policy %s: nothing to clear on %s: %s", item.name, desired.device, exc)


def _record(desired: DesiredPolicy) -> AppliedPolicy:
    return AppliedPolicy(
        desired.name,
        desired.file,
        desired.interface,
        desired.direction,
        desired.device,
        desired.minors,
        desired.document,
        desired.base,
    )
