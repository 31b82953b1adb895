"""Policies and assignments applied through the API: their store, leases, origins, and
which of them may be enforced beside the policy files (`admit`).

The operator's files stay authoritative: an API object may not take a file policy's name
or the interface a file policy owns. API objects persist in `api-policies.json` in the
state directory (written atomically), so a restarted agent keeps enforcing them, and
each may carry a lease: an absolute expiry on the wall clock, so a lease runs out across
restarts too, and an orchestrator that crashed (a job whose epilog never ran) does not
leave its QoS behind.

An assignment (`QosAssignment`) adds match entries to one class of a policy. Before a
pass they are merged into that policy; an entry whose cgroup does not exist yet is left
out until it does (a job's cgroup may appear after its prolog ran), and the assignment
reports itself pending meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.common.errors import FabricError
from agent.common.policy.limits import (
    MAX_U32_FILTERS_PER_CLASS,
    MAX_U32_FILTERS_PER_POLICY,
    u32_filters_of,
)
from agent.common.policy.model import (
    LoadedPolicy,
    Match,
    PolicyObject,
    QosAssignment,
    QosPolicy,
    cgroup_exists,
    check_host,
    parse_document,
)
from agent.node.qos.desired import owner_text, policy_device
from agent.node.qos.state import (
    MAX_STATE_BYTES,
    Quarantine,
    StateError,
    check_version,
    encode_json,
    read_json,
    text_field,
    write_json_atomic,
)

log = logging.getLogger(__name__)

API_FILE = "api-policies.json"
VERSION = 1
# What AppliedPolicy.file and LoadedPolicy.file say for an API object.
API_SOURCE = "<api>"
# Leases shorter than a reconcile pass are noise; longer than a month are no lease.
MIN_LEASE_S = 1.0
MAX_LEASE_S = 30 * 24 * 3600.0

ENFORCED, PENDING, FAILED = "enforced", "pending", "failed"
# Who applied an API object: a local API client, or the fleet aggregator. Each changes
# only its own objects, so an orchestrator on the node cannot undo a fleet assignment
# and the aggregator's resync never removes a job's assignment.
ORIGIN_API, ORIGIN_FLEET = "api", "fleet"
# An assignment a job file of the scheduler's hooks gives (agent.node.jobs); it is the
# job's until the epilog removes the file.
ORIGIN_SLURM = "slurm"


class NotFoundError(FabricError):
    """No API object of that name."""


@dataclass(frozen=True)
class Precondition:
    """Why the node refuses an object as it is: what kind of problem, about what."""

    kind: str  # OWNERSHIP | INTERFACE | CGROUP | KERNEL | SOURCE | POLICY | LIMIT
    subject: str
    description: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.description}"


class RefusedError(FabricError):
    """The object is valid but this node cannot take it now (FAILED_PRECONDITION)."""

    def __init__(self, problems: Sequence[Precondition]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class LeaseError(FabricError):
    """A lease TTL out of range, or a renewal without a TTL to renew with."""


def check_lease_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not MIN_LEASE_S <= ttl_s <= MAX_LEASE_S:
        raise LeaseError(f"lease TTL must be between 1s and 30d, got {ttl_s:g}s")


@dataclass(frozen=True)
class ApiEntry:
    """One API object: its document (YAML names) and its lease."""

    name: str
    kind: str
    document: Mapping[str, Any]
    applied_at: float
    lease_ttl_s: float | None = None
    # Unix time the lease runs out; None: no lease.
    expires_at: float | None = None
    origin: str = ORIGIN_API

    def model(self) -> PolicyObject:
        return parse_document(self.document, f"{API_FILE}:{self.name}")

    def renewed(self, now: float, ttl_s: float) -> ApiEntry:
        return replace(self, lease_ttl_s=ttl_s, expires_at=now + ttl_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "document": dict(self.document),
            "applied_at": self.applied_at,
            "lease_ttl_s": self.lease_ttl_s,
            "expires_at": self.expires_at,
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, data: Any) -> ApiEntry:
        """Raises StateError naming the field that is missing, of the wrong type or out
        of range."""
        if not isinstance(data, dict):
            raise StateError(f"an entry is a {type(data).__name__}, not an object")
        name = text_field(data, "name")
        document = data.get("document")
        if not isinstance(document, dict):
            raise StateError(f"{name}: document is not an object")
        origin = data.get("origin", ORIGIN_API)
        if origin not in (ORIGIN_API, ORIGIN_FLEET):
            raise StateError(f"{name}: origin {origin!r} is not api or fleet")
        ttl = _number(data, "lease_ttl_s", name, optional=True)
        if ttl is not None and not MIN_LEASE_S <= ttl <= MAX_LEASE_S:
            raise StateError(f"{name}: lease_ttl_s {ttl:g} is not between 1s and 30d")
        return cls(
            name=name,
            kind=text_field(data, "kind", name),
            document=document,
            applied_at=_number(data, "applied_at", name) or 0.0,
            lease_ttl_s=ttl,
            expires_at=_number(data, "expires_at", name, optional=True),
            origin=origin,
        )


def _number(
    data: Mapping[str, Any], key: str, owner: str, *, optional: bool = False
) -> float | None:
    """data[key] as a finite, non-negative number (None when absent and `optional`)."""
    value = data.get(key)
    if value is None and optional:
        return None
    # bool is an int to Python, not a number to anyone writing this file.
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number >= 0:
            return number
    raise StateError(f"{owner}: {key} is {value!r}, not a finite number >= 0")


def new_entry(
    obj: PolicyObject, now: float, ttl_s: float | None, origin: str = ORIGIN_API
) -> ApiEntry:
    document = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    expires = None if ttl_s is None else now + ttl_s
    return ApiEntry(obj.metadata.name, obj.kind, document, now, ttl_s, expires, origin)


def check_origin(entry: ApiEntry | None, origin: str) -> None:
    """RefusedError (OWNERSHIP) when `entry` exists and belongs to the other origin."""
    if entry is None or entry.origin == origin:
        return
    if entry.origin == ORIGIN_SLURM:
        reason = "the Slurm job's assignment (its job file): the job's epilog removes it"
        raise RefusedError([Precondition("OWNERSHIP", entry.name, reason)])
    owner = "the fleet aggregator" if entry.origin == ORIGIN_FLEET else "the node's API"
    reason = f"applied by {owner}: change or delete it there"
    raise RefusedError([Precondition("OWNERSHIP", entry.name, reason)])


class ApiPolicyStore:
    """The API objects by name, persisted in `state_dir/api-policies.json`. Not
    thread-safe: the reconciler's lock guards it.

    With `quarantine` (the daemon) an unusable file, or one with unusable entries, is set
    aside and the usable entries kept; without (a read-only CLI) it raises StateError."""

    def __init__(self, state_dir: Path, quarantine: Quarantine | None = None) -> None:
        self.path = state_dir / API_FILE
        self._entries: dict[str, ApiEntry] = {}
        try:
            self._entries, problems = self._load()
        except StateError as exc:
            if quarantine is None:
                raise
            quarantine.set_aside(self.path, str(exc))
            return
        if problems:
            reason = f"{self.path}: {len(problems)} unusable entries ({'; '.join(problems[:3])})"
            if quarantine is None:
                log.error("%s: left out", reason)
                return
            # The file as it was stays for the operator; the usable entries go on.
            if quarantine.set_aside(self.path, reason) is not None:
                try:
                    self.save()
                except StateError as exc:
                    log.error("%s", exc)

    def _load(self) -> tuple[dict[str, ApiEntry], list[str]]:
        try:
            data = read_json(self.path)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read API policies: {exc}") from None
        if data is None:
            return {}, []
        data = check_version(self.path, data, "API policy")
        items = data.get("objects", [])
        if not isinstance(items, list):
            raise StateError(f"{self.path}: objects is not a list")
        entries: dict[str, ApiEntry] = {}
        problems: list[str] = []
        for item in items:
            try:
                entry = ApiEntry.from_json(item)
                entry.model()
            except FabricError as exc:
                # One unusable entry must not cost the others their enforcement.
                problems.append(str(exc))
                continue
            entries[entry.name] = entry
        return entries, problems

    def save(self) -> None:
        """Raises StateSaveError (the file as it was) when it cannot be written."""
        write_json_atomic(self.path, _file_payload(self._entries))

    def check_room(self, entry: ApiEntry) -> None:
        """RefusedError (LIMIT) when the file with `entry` put in would be over
        MAX_STATE_BYTES: the next start would set it aside, and every API object with it."""
        size = len(encode_json(_file_payload({**self._entries, entry.name: entry})))
        if size > MAX_STATE_BYTES:
            reason = (
                f"{API_FILE} would hold {size} bytes with it, over the {MAX_STATE_BYTES} "
                "bytes the agent reads back at start"
            )
            raise RefusedError([Precondition("LIMIT", entry.name, reason)])

    def get(self, name: str) -> ApiEntry | None:
        return self._entries.get(name)

    def put(self, entry: ApiEntry) -> None:
        self._entries[entry.name] = entry

    def remove(self, name: str) -> ApiEntry | None:
        return self._entries.pop(name, None)

    def entries(self) -> list[ApiEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def expired(self, now: float) -> list[ApiEntry]:
        return [e for e in self.entries() if e.expires_at is not None and e.expires_at <= now]

    def next_expiry(self) -> float | None:
        times = [e.expires_at for e in self._entries.values() if e.expires_at is not None]
        return min(times) if times else None


def _file_payload(entries: Mapping[str, ApiEntry]) -> dict[str, Any]:
    return {"version": VERSION, "objects": [entries[name].to_json() for name in sorted(entries)]}


@dataclass(frozen=True)
class MergeResult:
    """Policies with their assignments merged in, and each assignment's state."""

    policies: list[LoadedPolicy]
    states: dict[str, tuple[str, str]]
    # Policy name -> the assignments merged into it.
    merged: dict[str, tuple[str, ...]]


def merge_assignments(
    policies: Sequence[LoadedPolicy],
    assignments: Sequence[QosAssignment],
    cgroup_exists: Callable[[str], bool],
    waiting: Callable[[list[str]], str] | None = None,
) -> MergeResult:
    """Append each assignment's match entries to its class, in assignment-name order.

    An entry naming a cgroup that does not exist is left out (nftables resolves a cgroup
    path when the table is loaded, so a missing one would fail the whole table).
    """
    by_name = {loaded.policy.metadata.name: loaded for loaded in policies}
    extra: dict[str, dict[str, list[Match]]] = {}
    states: dict[str, tuple[str, str]] = {}
    merged: dict[str, list[str]] = {}
    for assignment in sorted(assignments, key=lambda a: a.metadata.name):
        name, spec = assignment.metadata.name, assignment.spec
        target = by_name.get(spec.policy)
        if target is None:
            states[name] = (PENDING, f"no enforced policy named {spec.policy!r}")
            continue
        if spec.class_name not in {c.name for c in target.policy.spec.classes}:
            reason = f"policy {spec.policy!r} has no class {spec.class_name!r}"
            states[name] = (PENDING, reason)
            continue
        active = [m for m in spec.match if m.cgroup is None or cgroup_exists(m.cgroup)]
        if not active:
            missing = [str(m.cgroup) for m in spec.match]
            text = waiting(missing) if waiting else f"waiting for cgroup {', '.join(missing)}"
            states[name] = (PENDING, text)
            continue
        over = _over_limits(target.policy, extra.get(spec.policy, {}), spec.class_name, active)
        if over is not None:
            states[name] = (FAILED, over)
            continue
        extra.setdefault(spec.policy, {}).setdefault(spec.class_name, []).extend(active)
        merged.setdefault(spec.policy, []).append(name)
        left_out = len(spec.match) - len(active)
        message = f"{left_out} match entries wait for their cgroup" if left_out else ""
        states[name] = (ENFORCED, message)
    result = []
    for loaded in policies:
        additions = extra.get(loaded.policy.metadata.name)
        if not additions:
            result.append(loaded)
            continue
        policy = loaded.policy
        classes = tuple(
            c.model_copy(update={"match": (*c.match, *additions.get(c.name, ()))})
            for c in policy.spec.classes
        )
        policy_spec = policy.spec.model_copy(update={"classes": classes})
        result.append(replace(loaded, policy=policy.model_copy(update={"spec": policy_spec})))
    return MergeResult(result, states, {k: tuple(v) for k, v in merged.items()})


def _over_limits(
    policy: QosPolicy,
    added: Mapping[str, Sequence[Match]],
    class_name: str,
    entries: Sequence[Match],
) -> str | None:
    """Why `entries` may not join class `class_name` of `policy` beside the entries
    `added` already (by class): the u32 filters they would take it to; None if they may."""
    in_class = [
        entry
        for cls in policy.spec.classes
        if cls.name == class_name
        for entry in (*cls.match, *added.get(class_name, ()))
    ]
    count = u32_filters_of([*in_class, *entries]).filters
    if count > MAX_U32_FILTERS_PER_CLASS:
        return (
            f"its match entries would take class {class_name!r} of policy "
            f"{policy.metadata.name!r} to {count} u32 filters; at most {MAX_U32_FILTERS_PER_CLASS}"
        )
    everything = [
        *(entry for cls in policy.spec.classes for entry in cls.match),
        *(entry for more in added.values() for entry in more),
        *entries,
    ]
    total = u32_filters_of(everything).filters
    if total > MAX_U32_FILTERS_PER_POLICY:
        return (
            f"its match entries would take policy {policy.metadata.name!r} to {total} u32 "
            f"filters; at most {MAX_U32_FILTERS_PER_POLICY}"
        )
    return None


@dataclass(frozen=True)
class Admission:
    """What a pass enforces: the file policies, then the API policies that may be enforced
    beside them, each with its assignments merged in; and why the other API objects may
    not be."""

    policies: list[LoadedPolicy]
    refused: dict[str, Precondition]
    # Each assignment's (state, message).
    assignments: dict[str, tuple[str, str]]
    # The documents of policies that assignments changed, as their source gave them.
    bases: dict[str, Mapping[str, Any]]


def admit(
    files: Sequence[LoadedPolicy],
    entries: Mapping[str, ApiEntry],
    *,
    interface_exists: Callable[[str], bool],
    cgroup_root: Path | None,
    cgroups_required: bool = True,
    waiting: Callable[[list[str]], str] | None = None,
) -> Admission:
    """The files win names and interfaces, then API policies in name order; then every
    assignment joins its class where its policy and cgroups are there.

    `cgroups_required`: an API policy naming a cgroup that is not there is refused (what
    an API call is told); a pass takes it without those rules instead (a cgroup that
    vanished after the policy was applied costs only its own rule, not the policy)."""
    file_names = {p.policy.metadata.name: p.file for p in files}
    owners = {policy_device(p.policy): p for p in files}
    admitted: list[LoadedPolicy] = []
    refused: dict[str, Precondition] = {}
    models = usable_models(entries)
    for name, model in sorted(models.items()):
        if name in file_names:
            reason = f"the name belongs to policy file {file_names[name]}"
            refused[name] = Precondition("SOURCE", name, reason)
            continue
        if not isinstance(model, QosPolicy):
            continue
        device = policy_device(model)
        owner = owners.get(device)
        if owner is not None:
            where = "file " + owner.file if owner.file != API_SOURCE else "the API"
            reason = owner_text(owner, where)
            refused[name] = Precondition("OWNERSHIP", "spec.interface", reason)
            continue
        loaded = LoadedPolicy(API_SOURCE, None, model)
        problems = check_host([loaded], interface_exists=interface_exists, cgroup_root=cgroup_root)
        if not cgroups_required:
            problems = [p for p in problems if p.path == "spec.interface"]
        if problems:
            kind = "INTERFACE" if problems[0].path == "spec.interface" else "CGROUP"
            refused[name] = Precondition(kind, problems[0].path, problems[0].reason)
            continue
        owners[device] = loaded
        admitted.append(loaded)
    assignments = [m for m in models.values() if isinstance(m, QosAssignment)]

    def exists(path: str) -> bool:
        return cgroup_root is not None and cgroup_exists(cgroup_root, path)

    merge = merge_assignments([*files, *admitted], assignments, exists, waiting)
    bases: dict[str, Mapping[str, Any]] = {
        p.policy.metadata.name: p.policy.model_dump(mode="json", by_alias=True, exclude_none=True)
        for p in [*files, *admitted]
        if p.policy.metadata.name in merge.merged
    }
    return Admission(merge.policies, refused, merge.states, bases)


def check_admitted(name: str, entry: ApiEntry, admission: Admission) -> None:
    """RefusedError when `admission` leaves API object `name` out for a reason the caller
    must fix first (a name or interface a file owns, an assignment to a policy or class
    this node does not have)."""
    if name in admission.refused:
        raise RefusedError([admission.refused[name]])
    model = entry.model()
    if not isinstance(model, QosAssignment):
        return
    targets = {p.policy.metadata.name: p.policy for p in admission.policies}
    target = targets.get(model.spec.policy)
    if target is None:
        reason = f"no policy named {model.spec.policy!r} on this node"
        raise RefusedError([Precondition("POLICY", "spec.policy", reason)])
    if model.spec.class_name not in {c.name for c in target.spec.classes}:
        reason = f"policy {model.spec.policy!r} has no class {model.spec.class_name!r}"
        raise RefusedError([Precondition("POLICY", "spec.className", reason)])
    state, message = admission.assignments.get(name, (ENFORCED, ""))
    if state == FAILED:  # its entries would take the class past a limit
        raise RefusedError([Precondition("LIMIT", "spec.match", message)])


def check_displaces_none(name: str, before: Admission, after: Admission) -> None:
    """RefusedError (OWNERSHIP) when API object `name` would take an interface from an
    API policy that holds it now. Among API policies the pass gives an interface to the
    first by name, so a newcomer named before the holder would otherwise tear the
    enforced policy down and take its place."""
    holders = {p.policy.metadata.name: p for p in before.policies}
    for other, problem in after.refused.items():
        holder = holders.get(other)
        if other != name and holder is not None and problem.kind == "OWNERSHIP":
            reason = owner_text(holder, "the API") + ", enforced now"
            raise RefusedError([Precondition("OWNERSHIP", "spec.interface", reason)])


def usable_models(entries: Mapping[str, ApiEntry]) -> dict[str, PolicyObject]:
    """The entries' models; one that no longer validates is logged and left out."""
    models: dict[str, PolicyObject] = {}
    for name, entry in entries.items():
        try:
            models[name] = entry.model()
        except FabricError as exc:
            log.error("API object %s unusable: %s", name, exc)
    return models


def assignment_target(entry: ApiEntry) -> str | None:
    """The policy an assignment joins; None for a policy."""
    if entry.kind != "QosAssignment":
        return None
    return str(entry.document.get("spec", {}).get("policy", ""))


@dataclass(frozen=True)
class PolicyView:
    """One policy or assignment as the API lists it."""

    name: str
    source: str  # file | api | fleet | slurm
    file: str
    kind: str
    # The object as its source gave it (YAML names).
    document: Mapping[str, Any]
    state: str  # enforced | pending | failed
    message: str = ""
    device: str = ""
    lease_ttl_s: float | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class ApiOutcome:
    """What an API call did (or, validating only, would do)."""

    view: PolicyView | None
    changes: tuple[str, ...]


# Each object's (state, message) after the last pass, and the device of each policy the
# pass enforced.
States = Mapping[str, tuple[str, str]]
Devices = Mapping[str, str]


def entry_view(entry: ApiEntry, states: States, devices: Devices, file: str = "") -> PolicyView:
    state, message = states.get(entry.name, (PENDING, "not reconciled yet"))
    return PolicyView(
        name=entry.name,
        source=entry.origin,
        file=file,
        kind=entry.kind,
        document=entry.document,
        state=state,
        message=message,
        device=devices.get(entry.name, ""),
        lease_ttl_s=entry.lease_ttl_s,
        expires_at=entry.expires_at,
    )


def file_view(loaded: LoadedPolicy, states: States, devices: Devices) -> PolicyView:
    name = loaded.policy.metadata.name
    state, message = states.get(name, (PENDING, "not reconciled yet"))
    return PolicyView(
        name=name,
        source="file",
        file=loaded.file,
        kind=loaded.policy.kind,
        document=loaded.policy.model_dump(mode="json", by_alias=True, exclude_none=True),
        state=state,
        message=message,
        device=devices.get(name, ""),
    )
