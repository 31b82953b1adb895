"""The operator's policy files: the policy directory read and checked against this host,
and the policies last applied from files, rebuilt from the state when the directory is
invalid (a restart into a broken directory keeps enforcing what it had)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.common.policy.model import (
    LoadedPolicy,
    ParseCache,
    PolicyViolation,
    QosPolicy,
    check_host,
    load_policy_files,
)
from agent.node.qos.api_objects import API_SOURCE
from agent.node.qos.desired import owner_text, policy_device
from agent.node.qos.state import QosState

log = logging.getLogger(__name__)

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class FileRead:
    """The policies of a set of files, and every violation (none: all may be enforced)."""

    policies: list[LoadedPolicy]
    violations: list[PolicyViolation]


def policy_files(directory: Path) -> list[Path]:
    """The entries of `directory` named as policy files, in name order; none when it does
    not exist. Entries that are not readable files (a symlink loop or one to nothing, a
    FIFO, a directory) are in the list: reading them reports why, where skipping them
    would drop a policy without a word."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES)


def read_files(
    paths: Sequence[Path],
    *,
    interface_exists: Callable[[str], bool],
    cgroup_root: Path | None,
    cache: ParseCache | None = None,
) -> FileRead:
    """Load and check the files: the model, ownership across them, then (when those
    hold) the interfaces and cgroups they name on this host. `cache`: the files' parses
    from the last read (agent.common.policy.model.load_policy_files)."""
    loaded, violations = load_policy_files(paths, cache)
    owners: dict[str, LoadedPolicy] = {}
    for policy in loaded:
        # An egress policy on another one's IFB: the model's (interface, direction)
        # check passes it (and reports the same pair itself), the devices collide.
        owner = owners.setdefault(policy_device(policy.policy), policy)
        if owner is not policy and _claim(owner) != _claim(policy):
            violations.append(policy.violation("spec.interface", owner_text(owner, owner.file)))
    if not violations:
        violations.extend(
            check_host(loaded, interface_exists=interface_exists, cgroup_root=cgroup_root)
        )
    return FileRead(loaded, violations)


def _claim(loaded: LoadedPolicy) -> tuple[str, str]:
    return loaded.policy.spec.interface, loaded.policy.spec.direction


def policies_from_state(state: QosState) -> list[LoadedPolicy]:
    """The file policies last applied, as their files gave them."""
    policies = []
    for applied in state.policies.values():
        if applied.file == API_SOURCE:
            continue  # the API store has those
        document = applied.base if applied.base is not None else applied.document
        try:
            policy = QosPolicy.model_validate(document, by_alias=True, by_name=False)
        except ValueError as exc:
            log.error("state of policy %s unusable, not enforced: %s", applied.name, exc)
            continue
        policies.append(LoadedPolicy(applied.file, None, policy))
    return policies
