"""The QoS reconciler: make the kernel match the policies in the policy directory.

Desired state is every policy file in `policy_dir`; actual state is what netlink and
nftables report. Each pass reads both, applies only the difference (the same policies
twice make no kernel change; one edited class changes only that class), corrects drift
(a class, filter, qdisc or the nftables table someone removed) and counts it, and
persists what it applied. A policy directory that fails validation changes nothing:
what is enforced stays enforced until the files are valid again. A kernel failure
half-way through one interface rolls that interface back (agent.node.qos.tc.apply) and is
reported; the other interfaces are still reconciled.

Beside the files, orchestrators apply policies and assignments through the API
(`apply_object`, `delete_object`, `renew_lease`; see agent.node.qos.api_policies). An API
call takes the same lock as a pass and runs a pass itself, so it returns once the
kernel has its change, or with the error and the kernel as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent.common.errors import FabricError
from agent.common.policy.model import (
    LoadedPolicy,
    PolicyObject,
    PolicyViolation,
    QosAssignment,
    QosPolicy,
    check_host,
    load_policy_files,
)
from agent.node.qos import htb, ifb, nftrules, tc
from agent.node.qos.api_policies import (
    API_SOURCE,
    ENFORCED,
    FAILED,
    ORIGIN_API,
    ORIGIN_FLEET,
    PENDING,
    ApiEntry,
    ApiPolicyStore,
    LeaseError,
    NotFoundError,
    Precondition,
    RefusedError,
    check_lease_ttl,
    check_origin,
    merge_assignments,
    new_entry,
)
from agent.node.qos.desired import allocate_minors, build_tree
from agent.node.qos.nftables import Nftables, NftablesBackend, NftError
from agent.node.qos.state import AppliedPolicy, QosState, load_state, save_state

log = logging.getLogger(__name__)

POLICY_SUFFIXES = (".yaml", ".yml")
# drift_corrections_total's device label for the agent's nftables table.
NFT_DEVICE = "nftables"


@dataclass(frozen=True)
class QosSettings:
    """Where policies and state live, and how far the reconciler may go."""

    policy_dir: Path
    state_dir: Path
    # Replace a root qdisc the agent does not own on every interface (a policy can also
    # ask for it with spec.takeOver).
    take_over: bool = False
    cgroup_root: Path | None = None
    # Work inside this network namespace (tests); None is the agent's own.
    netns: str | None = None


@dataclass(frozen=True)
class PassResult:
    """What one reconcile pass did."""

    result: str  # success | invalid | error
    changes: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    violations: tuple[PolicyViolation, ...] = ()
    drift: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ManagedPolicy:
    """A policy the reconciler enforces, with the device and class minors it uses."""

    policy: QosPolicy
    file: str
    device: str
    minors: Mapping[str, int]


@dataclass(frozen=True)
class PolicyView:
    """One policy or assignment as the API lists it."""

    name: str
    source: str  # file | api | fleet
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


def plan_changes(
    policy: QosPolicy,
    *,
    previous_minors: Mapping[str, int] | None,
    leaf_kind: str,
    netns: str | None = None,
    take_over: bool = False,
) -> tuple[list[str], Mapping[str, int]]:
    """The kernel changes enforcing `policy` would make (its ingress redirect, its HTB
    tree), changing nothing, and the class minors it would use. Raises TcError, e.g.
    KernelStateConflict when someone else's root qdisc is in the way."""
    spec = policy.spec
    lines: list[str] = []
    device = spec.interface
    if spec.direction == "ingress":
        redirect = ifb.read_ingress_redirect(spec.interface, netns=netns)
        device = redirect.ifb
        if not redirect.complete:
            lines.append(f"+ ingress redirect {spec.interface} -> {device} (IFB)")
    desired = build_tree(
        policy, device=device, leaf_kind=leaf_kind, previous_minors=previous_minors
    )
    actual = None
    if spec.direction == "egress" or tc.device_exists(device, netns=netns):
        actual = tc.read_tree(device, netns=netns, take_over=spec.take_over or take_over)
    lines.extend(str(change) for change in htb.plan(desired.tree, actual))
    return lines, desired.minors


class Reconciler:
    """Owns the agent's traffic-control and nftables state on this host."""

    def __init__(
        self,
        settings: QosSettings,
        *,
        nft_factory: Callable[[], NftablesBackend] | None = None,
        capabilities: tc.TcCapabilities | None = None,
    ) -> None:
        self.settings = settings
        self._nft_factory = nft_factory or (lambda: Nftables(netns=settings.netns))
        self._nft: NftablesBackend | None = None
        self._capabilities = capabilities
        # Reentrant: an API call holds it across its admission checks and its pass.
        self._lock = threading.RLock()
        self._state = load_state(settings.state_dir)
        self.api = ApiPolicyStore(settings.state_dir)
        self._managed: dict[str, ManagedPolicy] = {}
        # Each policy's and assignment's state after the last pass: (state, message).
        self._states: dict[str, tuple[str, str]] = {}
        self._file_policies: list[LoadedPolicy] = []
        self.lease_expirations = 0
        self.policy_counts: Counter[tuple[str, str]] = Counter()
        self._last_good: list[LoadedPolicy] | None = None
        self._reported: set[str] = set()
        # What was last loaded into the nftables table, and how it read back.
        self._nft_body: str | None = self._state.nft_body or None
        self._nft_listing: Any = self._state.nft_listing
        self.results: Counter[str] = Counter()
        self.drift: Counter[str] = Counter()
        self.first_pass = threading.Event()
        self.wake = threading.Event()

    # --- public ---

    @property
    def managed(self) -> tuple[ManagedPolicy, ...]:
        with self._lock:
            return tuple(self._managed[name] for name in sorted(self._managed))

    def reconcile(self) -> PassResult:
        """One pass: desired from the policy directory and the API, actual from the
        kernel."""
        with self._lock:
            outcome = self._pass()
            self.results[outcome.result] += 1
            for device, count in outcome.drift.items():
                self.drift[device] += count
        self.first_pass.set()
        return outcome

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Reconcile every `interval_s`, at once when `wake` is set (SIGHUP), and when
        a lease runs out."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.reconcile()
            except Exception:
                # A bug must not end enforcement of what is already in place.
                log.exception("QoS reconcile pass failed")
                self.results["error"] += 1
            wait_s = interval_s - (time.monotonic() - started)
            with self._lock:
                expiry = self.api.next_expiry()
            if expiry is not None:
                wait_s = min(wait_s, expiry - time.time())
            self.wake.wait(max(0.0, wait_s))
            self.wake.clear()

    # --- the API ---

    def apply_object(
        self,
        obj: PolicyObject,
        *,
        ttl_s: float | None = None,
        validate_only: bool = False,
        origin: str = ORIGIN_API,
    ) -> ApiOutcome:
        """Create or replace an API policy or assignment and enforce it. Raises
        RefusedError (with nothing changed) when the node cannot take it, or when an
        object of that name came from the other origin (local API or fleet)."""
        check_lease_ttl(ttl_s)
        name = obj.metadata.name
        with self._lock:
            check_origin(self.api.get(name), origin)
            now = time.time()
            entry = new_entry(obj, now, ttl_s, origin)
            candidate = {**{e.name: e for e in self.api.entries()}, name: entry}
            # The policy files are read once: admission and the pass share the read.
            read = self._load()
            files = self._effective_files(read)
            self._admit_or_refuse(name, candidate, files)
            if validate_only:
                changes = self._plan(candidate, {name}, files)
                return ApiOutcome(self._view_of(entry), tuple(changes))
            previous = self.api.get(name)
            self.api.put(entry)
            outcome = self._pass(read)
            self.results[outcome.result] += 1
            failure = self._failure_for(entry, outcome)
            if failure is not None:
                # Back to what was enforced before the call.
                if previous is None:
                    self.api.remove(name)
                else:
                    self.api.put(previous)
                self._pass(read)
                raise RefusedError([Precondition("KERNEL", name, failure)])
            self.api.save()
            if ttl_s is not None:
                # The run loop's wait was set before this lease existed.
                self.wake.set()
            log.info(
                "API %s %s applied%s: %d change(s)",
                entry.kind,
                name,
                f" with a {ttl_s:g}s lease" if ttl_s else "",
                len(outcome.changes),
            )
            return ApiOutcome(self._view_of(entry), outcome.changes)

    def delete_object(
        self, name: str, *, validate_only: bool = False, origin: str = ORIGIN_API
    ) -> ApiOutcome:
        """Remove an API policy or assignment and what it put in the kernel."""
        with self._lock:
            entry = self._api_entry(name)
            check_origin(entry, origin)
            candidate = {e.name: e for e in self.api.entries() if e.name != name}
            if validate_only:
                files = self._effective_files(self._load())
                changes = self._plan(candidate, {name}, files, removing=entry)
                return ApiOutcome(None, tuple(changes))
            self.api.remove(name)
            self.api.save()
            outcome = self._pass()
            self.results[outcome.result] += 1
            log.info("API %s %s deleted: %d change(s)", entry.kind, name, len(outcome.changes))
            return ApiOutcome(None, outcome.changes)

    def renew_lease(self, name: str, ttl_s: float | None = None) -> PolicyView:
        """Move an API object's lease expiry to now + ttl_s (its own TTL when None)."""
        check_lease_ttl(ttl_s)
        with self._lock:
            entry = self._api_entry(name)
            check_origin(entry, ORIGIN_API)
            ttl = ttl_s if ttl_s is not None else entry.lease_ttl_s
            if ttl is None:
                raise LeaseError(f"{name} has no lease to renew; give a lease TTL to add one")
            entry = entry.renewed(time.time(), ttl)
            self.api.put(entry)
            self.api.save()
            self.wake.set()
            return self._view_of(entry)

    def plan_object(self, obj: PolicyObject) -> list[str]:
        """The kernel changes applying obj would make; raises RefusedError as apply does."""
        name = obj.metadata.name
        with self._lock:
            entry = new_entry(obj, time.time(), None)
            candidate = {**{e.name: e for e in self.api.entries()}, name: entry}
            files = self._effective_files(self._load())
            self._admit_or_refuse(name, candidate, files)
            return self._plan(candidate, {name}, files)

    def fleet_names(self) -> set[str]:
        """The API objects the fleet aggregator applied."""
        with self._lock:
            return {e.name for e in self.api.entries() if e.origin == ORIGIN_FLEET}

    def policies(self) -> list[PolicyView]:
        """Every file policy, then every API object, as of the last pass."""
        with self._lock:
            views = [
                self._file_view(loaded)
                for loaded in sorted(self._file_policies, key=lambda p: p.policy.metadata.name)
            ]
            views.extend(self._view_of(entry) for entry in self.api.entries())
            return views

    def remove_all(self) -> None:
        """Take every tree, ingress redirect and the nftables table down (--on-exit remove)."""
        with self._lock:
            for applied in list(self._state.policies.values()):
                self._remove(applied)
            self._managed.clear()
            self._sync_nft([])
            self._state = QosState()
            save_state(self.settings.state_dir, self._state)

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    # --- one pass ---

    def _pass(
        self, read: tuple[list[LoadedPolicy], list[PolicyViolation]] | None = None
    ) -> PassResult:
        """`read`: the policy files as `_load` just returned them, to save reading twice."""
        self._expire_leases(time.time())
        loaded, violations = read if read is not None else self._load()
        result = "success"
        if violations:
            self._report_violations(violations)
            result = "invalid"
            if self._last_good is None:
                self._last_good = self._from_state()
            loaded = self._last_good
        else:
            if self._reported:
                log.info("QoS policies in %s are valid again", self.settings.policy_dir)
                self._reported.clear()
            self._last_good = loaded
        self._file_policies = list(loaded)
        entries = {e.name: e for e in self.api.entries()}
        admitted, refused = self._admit(loaded, entries)
        assignments = [m for m in self._models(entries).values() if isinstance(m, QosAssignment)]
        merge = merge_assignments([*loaded, *admitted], assignments, self._cgroup_exists)
        bases = {
            p.policy.metadata.name: p.policy.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
            for p in [*loaded, *admitted]
            if p.policy.metadata.name in merge.merged
        }
        changes, errors, drift = self._enforce(merge.policies, bases)
        states: dict[str, tuple[str, str]] = dict(merge.states)
        for name, problem in refused.items():
            states[name] = (FAILED, problem.description)
        for loaded_policy in merge.policies:
            name = loaded_policy.policy.metadata.name
            states[name] = (FAILED, errors[name]) if name in errors else (ENFORCED, "")
        self._states = states
        # Read by the qos collector every tick, without waiting for the lock.
        self.policy_counts = Counter(
            [("file", states.get(p.policy.metadata.name, (PENDING, ""))[0]) for p in loaded]
            + [("api", states.get(name, (PENDING, ""))[0]) for name in entries]
        )
        if errors and result == "success":
            result = "error"
        return PassResult(
            result,
            tuple(changes),
            tuple(f"{name}: {error}" for name, error in errors.items()),
            tuple(violations),
            drift,
        )

    def _expire_leases(self, now: float) -> None:
        expired = self.api.expired(now)
        for entry in expired:
            self.api.remove(entry.name)
            self.lease_expirations += 1
            log.warning(
                "lease of API %s %s ran out (TTL %gs, not renewed): removing it",
                entry.kind,
                entry.name,
                entry.lease_ttl_s or 0.0,
            )
        if expired:
            self.api.save()

    def _models(self, entries: Mapping[str, ApiEntry]) -> dict[str, PolicyObject]:
        models: dict[str, PolicyObject] = {}
        for name, entry in entries.items():
            try:
                models[name] = entry.model()
            except FabricError as exc:
                log.error("API object %s unusable: %s", name, exc)
        return models

    def _admit(
        self, files: Sequence[LoadedPolicy], entries: Mapping[str, ApiEntry]
    ) -> tuple[list[LoadedPolicy], dict[str, Precondition]]:
        """The API policies that may be enforced beside the file policies, and why each
        other one may not: the files win names and interfaces, then API policies in
        name order."""
        file_names = {p.policy.metadata.name: p.file for p in files}
        owners = {(p.policy.spec.interface, p.policy.spec.direction): p for p in files}
        admitted: list[LoadedPolicy] = []
        refused: dict[str, Precondition] = {}
        for name, model in sorted(self._models(entries).items()):
            if name in file_names:
                reason = f"the name belongs to policy file {file_names[name]}"
                refused[name] = Precondition("SOURCE", name, reason)
                continue
            if not isinstance(model, QosPolicy):
                continue
            spec = model.spec
            owner = owners.get((spec.interface, spec.direction))
            if owner is not None:
                where = "file " + owner.file if owner.file != API_SOURCE else "the API"
                reason = (
                    f"{spec.interface} {spec.direction} is owned by policy "
                    f"{owner.policy.metadata.name!r} from {where}"
                )
                refused[name] = Precondition("OWNERSHIP", "spec.interface", reason)
                continue
            loaded = LoadedPolicy(API_SOURCE, None, model)
            problems = check_host(
                [loaded],
                interface_exists=self._interface_exists,
                cgroup_root=self.settings.cgroup_root,
            )
            if problems:
                kind = "INTERFACE" if problems[0].path == "spec.interface" else "CGROUP"
                refused[name] = Precondition(kind, problems[0].path, problems[0].reason)
                continue
            owners[(spec.interface, spec.direction)] = loaded
            admitted.append(loaded)
        return admitted, refused

    def _admit_or_refuse(
        self, name: str, entries: Mapping[str, ApiEntry], files: Sequence[LoadedPolicy]
    ) -> None:
        admitted, refused = self._admit(files, entries)
        if name in refused:
            raise RefusedError([refused[name]])
        model = entries[name].model()
        if isinstance(model, QosAssignment):
            targets = {p.policy.metadata.name: p.policy for p in [*files, *admitted]}
            target = targets.get(model.spec.policy)
            if target is None:
                reason = f"no policy named {model.spec.policy!r} on this node"
                raise RefusedError([Precondition("POLICY", "spec.policy", reason)])
            if model.spec.class_name not in {c.name for c in target.spec.classes}:
                reason = f"policy {model.spec.policy!r} has no class {model.spec.class_name!r}"
                raise RefusedError([Precondition("POLICY", "spec.className", reason)])

    def _effective_files(
        self, read: tuple[list[LoadedPolicy], list[PolicyViolation]]
    ) -> list[LoadedPolicy]:
        """The file policies a pass would enforce given `read`: the valid set, else the
        last valid one."""
        loaded, violations = read
        if violations:
            return list(self._last_good or self._from_state())
        return loaded

    def _failure_for(self, entry: ApiEntry, outcome: PassResult) -> str | None:
        """The error a pass reported for what entry changes, if any."""
        state, message = self._states.get(entry.name, (FAILED, "not enforced"))
        if entry.kind == "QosAssignment":
            target = str(entry.document.get("spec", {}).get("policy", ""))
            target_state, target_message = self._states.get(target, (ENFORCED, ""))
            if target_state == FAILED:
                return target_message
            return message if state == FAILED else None
        if state == FAILED:
            return message
        nft_error = next((e for e in outcome.errors if e.startswith(f"{NFT_DEVICE}:")), None)
        return nft_error

    def _api_entry(self, name: str) -> ApiEntry:
        entry = self.api.get(name)
        if entry is not None:
            return entry
        files = {p.policy.metadata.name: p.file for p in self._effective_files(self._load())}
        if name in files:
            reason = f"the policy comes from file {files[name]}: edit or remove the file"
            raise RefusedError([Precondition("SOURCE", name, reason)])
        raise NotFoundError(f"no API policy named {name!r}")

    def _view_of(self, entry: ApiEntry) -> PolicyView:
        state, message = self._states.get(entry.name, (PENDING, "not reconciled yet"))
        managed = self._managed.get(entry.name)
        return PolicyView(
            name=entry.name,
            source=entry.origin,
            file="",
            kind=entry.kind,
            document=entry.document,
            state=state,
            message=message,
            device=managed.device if managed else "",
            lease_ttl_s=entry.lease_ttl_s,
            expires_at=entry.expires_at,
        )

    def _file_view(self, loaded: LoadedPolicy) -> PolicyView:
        name = loaded.policy.metadata.name
        state, message = self._states.get(name, (PENDING, "not reconciled yet"))
        managed = self._managed.get(name)
        document = loaded.policy.model_dump(mode="json", by_alias=True, exclude_none=True)
        return PolicyView(
            name=name,
            source="file",
            file=loaded.file,
            kind=loaded.policy.kind,
            document=document,
            state=state,
            message=message,
            device=managed.device if managed else "",
        )

    def _cgroup_exists(self, path: str) -> bool:
        root = self.settings.cgroup_root
        return root is not None and (root / path).is_dir()

    def _plan(
        self,
        entries: Mapping[str, ApiEntry],
        names: set[str],
        files: Sequence[LoadedPolicy],
        *,
        removing: ApiEntry | None = None,
    ) -> list[str]:
        """The changes a pass over `files` and `entries` would make to the policies
        `names` and the policies their assignments join, and to the nftables table."""
        admitted, _refused = self._admit(files, entries)
        assignments = [m for m in self._models(entries).values() if isinstance(m, QosAssignment)]
        merge = merge_assignments([*files, *admitted], assignments, self._cgroup_exists)
        touched = set(names)
        for entry in [*(entries[n] for n in names if n in entries), removing]:
            if entry is not None and entry.kind == "QosAssignment":
                touched.add(str(entry.document.get("spec", {}).get("policy", "")))
        lines: list[str] = []
        if removing is not None and removing.kind == "QosPolicy":
            applied = self._state.policies.get(removing.name)
            if applied is not None:
                lines.append(f"{removing.name}: - HTB tree on {applied.device}")
        with_minors: list[tuple[QosPolicy, Mapping[str, int]]] = []
        leaf_kind = self._leaf_kind()
        for item in merge.policies:
            name = item.policy.metadata.name
            previous = self._state.policies.get(name)
            minors = previous.minors if previous else None
            if name not in touched:
                classes = [c.name for c in item.policy.spec.classes]
                with_minors.append((item.policy, allocate_minors(classes, minors or {})))
                continue
            changes, minors_now = plan_changes(
                item.policy,
                previous_minors=minors,
                leaf_kind=leaf_kind,
                netns=self.settings.netns,
                take_over=self.settings.take_over,
            )
            lines.extend(f"{name}: {change}" for change in changes)
            with_minors.append((item.policy, minors_now))
        root = self.settings.cgroup_root or Path("/sys/fs/cgroup")
        body = nftrules.render_table(with_minors, cgroup_root=root)
        if body != (self._nft_body or ""):
            table = f"{nftrules.TABLE_FAMILY} {nftrules.TABLE_NAME}"
            lines.append(f"nftables table {table}: {'reload' if body.strip() else 'delete'}")
        return lines

    def _load(self) -> tuple[list[LoadedPolicy], list[PolicyViolation]]:
        directory = self.settings.policy_dir
        files = sorted(
            p for p in directory.glob("*") if p.suffix in POLICY_SUFFIXES and p.is_file()
        ) if directory.is_dir() else []  # fmt: skip
        loaded, violations = load_policy_files(files)
        if not violations:
            violations.extend(
                check_host(
                    loaded,
                    interface_exists=self._interface_exists,
                    cgroup_root=self.settings.cgroup_root,
                )
            )
        return loaded, violations

    def _from_state(self) -> list[LoadedPolicy]:
        """The policies last applied, rebuilt from the state file (a restart into an
        invalid policy directory keeps enforcing them)."""
        policies = []
        for applied in self._state.policies.values():
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

    def _enforce(
        self, loaded: Sequence[LoadedPolicy], bases: Mapping[str, Mapping[str, Any]]
    ) -> tuple[list[str], dict[str, str], dict[str, int]]:
        """Apply each policy's tree and the nftables table. `bases`: the documents
        of policies that assignments changed, as their source gave them. Returns the
        changes, the errors by policy name (NFT_DEVICE for the table) and the drift."""
        changes: list[str] = []
        errors: dict[str, str] = {}
        drift: Counter[str] = Counter()
        wanted = {item.policy.metadata.name: item for item in loaded}
        applied_now: dict[str, AppliedPolicy] = {}
        managed: dict[str, ManagedPolicy] = {}
        for name, item in wanted.items():
            policy, spec = item.policy, item.policy.spec
            previous = self._state.policies.get(name)
            document = policy.model_dump(mode="json", by_alias=True, exclude_none=True)
            try:
                device = spec.interface
                if spec.direction == "ingress":
                    device = ifb.ensure_ingress_redirect(spec.interface, netns=self.settings.netns)
                desired = build_tree(
                    policy,
                    device=device,
                    leaf_kind=self._leaf_kind(),
                    previous_minors=previous.minors if previous else None,
                )
                actual = tc.read_tree(
                    device,
                    netns=self.settings.netns,
                    take_over=spec.take_over or self.settings.take_over,
                )
                plan = htb.plan(desired.tree, actual)
                if plan:
                    tc.apply(plan, netns=self.settings.netns, before=actual)
                    changes.extend(f"{name}: {change}" for change in plan)
                    unchanged = previous is not None and dict(previous.document) == document
                    if unchanged and self._managed.get(name) is not None:
                        drift[device] += 1
                        log.warning("QoS drift on %s corrected: %d change(s)", device, len(plan))
                    else:
                        log.info(
                            "QoS policy %s applied on %s: %d change(s)", name, device, len(plan)
                        )
            except FabricError as exc:
                errors[name] = str(exc)
                log.error("QoS policy %s (%s): %s", name, item.file, exc)
                if previous is not None:
                    applied_now[name] = previous
                continue
            applied_now[name] = AppliedPolicy(
                name,
                item.file,
                spec.interface,
                spec.direction,
                device,
                desired.minors,
                document,
                bases.get(name),
            )
            managed[name] = ManagedPolicy(policy, item.file, device, desired.minors)
        in_use = {m.device for m in managed.values()}
        for name, applied in self._state.policies.items():
            if name in wanted:
                continue
            if applied.device in in_use:
                # Renamed, or handed to another policy: its tree is that policy's now.
                continue
            try:
                self._remove(applied)
                changes.append(f"{name}: removed from {applied.device}")
                log.info("QoS policy %s removed from %s", name, applied.device)
            except FabricError as exc:
                errors[name] = str(exc)
                applied_now[name] = applied
        try:
            reloaded, drifted = self._sync_nft([(m.policy, m.minors) for m in managed.values()])
            if reloaded:
                changes.append("nftables table reloaded")
            if drifted:
                drift[NFT_DEVICE] += 1
                log.warning("QoS drift in the nftables table corrected")
        except FabricError as exc:
            errors[NFT_DEVICE] = str(exc)
            log.error("QoS nftables table: %s", exc)
        state = QosState(applied_now, self._nft_body or "", self._nft_listing)
        if state != self._state:
            save_state(self.settings.state_dir, state)
        self._state = state
        self._managed = managed
        return changes, errors, dict(drift)

    def _sync_nft(
        self, policies: Sequence[tuple[QosPolicy, Mapping[str, int]]]
    ) -> tuple[bool, bool]:
        """Load the agent's table when its content differs from what should be there.
        Returns (reloaded or removed, the difference was drift)."""
        root = self.settings.cgroup_root or Path("/sys/fs/cgroup")
        body = nftrules.render_table(policies, cgroup_root=root)
        family, table = nftrules.TABLE_FAMILY, nftrules.TABLE_NAME
        if not body.strip():
            # Nothing to classify: a host without libnftables (or a run without
            # CAP_NET_ADMIN and no policies) never needs it.
            self._nft_body, self._nft_listing = "", None
            try:
                nft = self._nft_backend()
                if nft.list_table(family, table) is None:
                    return False, False
            except NftError:
                return False, False
            return nft.delete_table(family, table), False
        nft = self._nft_backend()
        listing = nft.list_table(family, table)
        if body == self._nft_body and listing == self._nft_listing:
            return False, False
        drifted = body == self._nft_body
        nft.replace_table(family, table, body)
        self._nft_body = body
        self._nft_listing = nft.list_table(family, table)
        return True, drifted

    def _nft_backend(self) -> NftablesBackend:
        if self._nft is None:
            self._nft = self._nft_factory()
        return self._nft

    def _remove(self, applied: AppliedPolicy) -> None:
        tc.remove_tree(applied.device, netns=self.settings.netns)
        if applied.direction == "ingress":
            ifb.remove_ingress_redirect(applied.interface, netns=self.settings.netns)

    def _leaf_kind(self) -> str:
        if self._capabilities is None:
            caps = tc.detect_capabilities()
            self._capabilities = caps
            found = [f.name for f in dataclasses.fields(caps) if getattr(caps, f.name)]
            missing = [f.name for f in dataclasses.fields(caps) if not getattr(caps, f.name)]
            log.info(
                "traffic control: kernel has %s; lacks %s; leaf qdisc %s",
                ", ".join(found) or "nothing usable",
                ", ".join(missing) or "nothing",
                caps.leaf_kind,
            )
        return self._capabilities.leaf_kind

    def _interface_exists(self, name: str) -> bool:
        with IPRoute(netns=self.settings.netns) if self.settings.netns else IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    def _report_violations(self, violations: Sequence[PolicyViolation]) -> None:
        """Log the violations when they change, not on every pass."""
        current = {str(v) for v in violations}
        if current != self._reported:
            for text in sorted(current - self._reported):
                log.error("QoS policy rejected, nothing changed: %s", text)
            self._reported = current
