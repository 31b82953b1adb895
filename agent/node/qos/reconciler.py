"""The QoS reconciler: keep the kernel matching the policy files and the API objects.

Each pass reads the policy directory, plans against what the kernel holds
(agent.node.qos.pipeline, the same path `policy plan` and the API's dry runs take) and
applies the plan (agent.node.qos.enforce): the same policies twice make no kernel change,
one edited class changes only that class, and what someone removed behind the agent's
back comes back and is counted as drift.

Each policy file stands alone (agent.node.qos.files). A file that cannot be read or
parsed, or a policy in it that is refused (an interface this host lacks, a name or an
interface another file's policy holds), fails by itself: the policies that file last had in
the kernel stay as they were applied (listed FAILED with the reason), a policy never
applied is not enforced, and every other policy is enforced and repaired as usual. A
file still being written is not taken until it settles. Problems are logged when they
appear, change or go away, not on every pass.

Orchestrators apply policies and assignments through the API (`apply_object`,
`delete_object`, `renew_lease`). An API call takes the same lock as a pass and runs a
pass itself, so it returns once the kernel has its change, or with the error and the
kernel as it was.

The state files are written before an API call reports success; when they cannot be
(a read-only or full state directory) the call is undone in the kernel too and fails
with StateSaveError, so that no restart finds kernel objects nobody recorded. A pass
keeps enforcing the policy files meanwhile: it logs once that saving fails, counts each
failure, and saves again on every pass until it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.errors import FabricError
from agent.common.policy.model import (
    LoadedPolicy,
    ParseCache,
    PolicyObject,
    PolicyViolation,
    QosAssignment,
    cgroup_exists,
)
from agent.node.cgroups import slurm_scope_problem
from agent.node.jobs import Job, JobDirectory
from agent.node.qos.api_objects import (
    ENFORCED,
    FAILED,
    ORIGIN_API,
    ORIGIN_FLEET,
    ORIGIN_SLURM,
    PENDING,
    ApiEntry,
    ApiOutcome,
    ApiPolicyStore,
    LeaseError,
    NotFoundError,
    PolicyView,
    Precondition,
    RefusedError,
    admit,
    assignment_target,
    check_admitted,
    check_displaces_none,
    check_lease_ttl,
    check_origin,
    entry_view,
    file_view,
    new_entry,
)
from agent.node.qos.desired import DesiredPolicy, DesiredState
from agent.node.qos.enforce import enforce
from agent.node.qos.files import (
    FileRead,
    FileSet,
    FileSettler,
    file_set,
    kept_from_state,
    policy_files,
    read_files,
)
from agent.node.qos.kernel import (
    IFB_PREFIX,
    NFT_DEVICE,
    QosKernel,
    RemoveRedirect,
    RemoveTree,
    ifb_name,
)
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.pipeline import QosSettings, plan_pass
from agent.node.qos.planner import plan
from agent.node.qos.state import (
    STATE_FILE,
    QosState,
    Quarantine,
    StateError,
    StateSaveError,
    load_state,
    save_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What one reconcile pass did."""

    result: str  # success | invalid | error
    changes: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    violations: tuple[PolicyViolation, ...] = ()
    drift: Mapping[str, int] = field(default_factory=dict)
    # The errors by policy name (NFT_DEVICE: the nftables table).
    failed: Mapping[str, str] = field(default_factory=dict)


class Reconciler:
    """Owns the agent's traffic-control and nftables state on this host."""

    def __init__(
        self,
        settings: QosSettings,
        kernel: QosKernel | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jobs: JobDirectory | None = None,
    ) -> None:
        """`clock`: the wall clock policy files settle by (tests set it); `jobs`: the
        job directory (by default settings.job_dir's)."""
        self.settings = settings
        self.kernel = kernel if kernel is not None else NetlinkKernel(settings.netns)
        # Reentrant: an API call holds it across its admission checks and its pass.
        self._lock = threading.RLock()
        # Unusable state files are set aside: the kernel and the policy files rebuild.
        self.quarantine = Quarantine()
        try:
            self._state = load_state(settings.state_dir)
        except StateError as exc:
            self.quarantine.set_aside(settings.state_dir / STATE_FILE, str(exc))
            self._state = QosState()
        self.api = ApiPolicyStore(settings.state_dir, self.quarantine)
        if jobs is None and settings.job_dir is not None:
            jobs = JobDirectory(settings.job_dir)
        self.jobs = jobs
        # The cgroups (absolute paths) pending assignments and policies wait for, as of
        # the last pass; the watcher wakes a pass when one appears.
        self.waiting_cgroups: frozenset[Path] = frozenset()
        # Called after every pass (the watcher re-reads `waiting_cgroups`).
        self.after_pass: list[Callable[[], None]] = []
        # Failed saves by file name, and the error of each file not saved since.
        self.save_failures: Counter[str] = Counter()
        self._unsaved: dict[str, str] = {}
        # Whether a pass has compared the kernel's agent objects with what is claimed
        # (once, at start-up: left-overs of a run whose state was lost).
        self._orphans_checked = False
        # What the last pass enforced, and each policy's and assignment's (state, message).
        self._enforced: dict[str, DesiredPolicy] = {}
        self._states: dict[str, tuple[str, str]] = {}
        self._files = FileSet([], {}, (), {})
        self._parsed: ParseCache = {}
        self._settler = FileSettler(settings.file_settle_s, clock)
        self._settling = False
        # The errors of the last pass, by policy name (NFT_DEVICE: the table).
        self._last_failed: Mapping[str, str] = {}
        # What is wrong now, as last logged (subject, text): a problem is logged as it
        # appears or changes.
        self._reported: dict[str, tuple[str, str]] = {}
        self.lease_expirations = 0
        self.policy_counts: Counter[tuple[str, str]] = Counter()
        self.results: Counter[str] = Counter()
        self.drift: Counter[str] = Counter()
        self.first_pass = threading.Event()
        self.wake = threading.Event()

    # --- the loop ---

    @property
    def managed(self) -> tuple[DesiredPolicy, ...]:
        """The policies the last pass enforced, by name."""
        with self._lock:
            return tuple(self._enforced[name] for name in sorted(self._enforced))

    def reconcile(self) -> PassResult:
        """One pass: desired from the policy directory and the API, actual from the
        kernel."""
        with self._lock:
            outcome = self._pass()
        self.first_pass.set()
        return outcome

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Reconcile every `interval_s`, at once when `wake` is set (SIGHUP), when a
        lease runs out, and when a policy file being written has settled."""
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
                expiries = [self.api.next_expiry()]
                if self.jobs is not None:
                    expiries.append(self.jobs.next_expiry())
                settling = self._settling
            expiry = min((t for t in expiries if t is not None), default=None)
            if expiry is not None:
                wait_s = min(wait_s, expiry - time.time())
            if settling:
                # A file being written is taken once it settles, not a whole interval on.
                wait_s = min(wait_s, self.settings.file_settle_s)
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
            check_origin(self._entries().get(name), origin)
            entry = new_entry(obj, time.time(), ttl_s, origin)
            candidate = {**self._entries(), name: entry}
            # The policy files are read once: admission and the pass share the read.
            read = self._read()
            self._check(name, entry, candidate, read)
            self.api.check_room(entry)
            if validate_only:
                changes = self._dry_run(entry, candidate, read)
                return ApiOutcome(entry_view(entry, self._states, self._devices()), changes)
            previous = self.api.get(name)
            failed_before = self._last_failed
            self.api.put(entry)
            try:
                outcome = self._pass(read)
                failure = _failure(entry, outcome.failed, failed_before)
                if failure is not None:
                    raise RefusedError([Precondition("KERNEL", name, failure)])
                # Success only once a restart would find what the kernel now holds.
                self._raise_unsaved()
                self.api.save()
            except BaseException:
                # Whatever failed (the kernel refusing, an exception from the kernel
                # layer, a state file that cannot be written), back to what was
                # enforced before the call, in memory, in the kernel and on disk.
                self._undo(name, previous, read)
                raise
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
            return ApiOutcome(entry_view(entry, self._states, self._devices()), outcome.changes)

    def delete_object(
        self, name: str, *, validate_only: bool = False, origin: str = ORIGIN_API
    ) -> ApiOutcome:
        """Remove an API policy or assignment and what it put in the kernel."""
        with self._lock:
            entry = self._api_entry(name)
            job = self._job(entry)
            # The node's API may end a job's assignment (an operator's call); the fleet not.
            if job is None or origin != ORIGIN_API:
                check_origin(entry, origin)
            candidate = {n: e for n, e in self._entries().items() if n != name}
            if validate_only:
                return ApiOutcome(None, self._dry_run(entry, candidate, self._read(), refuse=False))
            if job is not None and self.jobs is not None:
                self.jobs.remove(job)
                outcome = self._pass()
                log.info(
                    "Slurm job assignment %s deleted (its job file %s removed)", name, job.path
                )
                return ApiOutcome(None, outcome.changes)
            self.api.remove(name)
            try:
                self.api.save()
            except StateSaveError:
                self.api.put(entry)  # nothing changed: the file still has it
                raise
            outcome = self._pass()
            log.info("API %s %s deleted: %d change(s)", entry.kind, name, len(outcome.changes))
            return ApiOutcome(None, outcome.changes)

    def renew_lease(self, name: str, ttl_s: float | None = None) -> PolicyView:
        """Move an API object's lease expiry to now + ttl_s (its own TTL when None)."""
        check_lease_ttl(ttl_s)
        with self._lock:
            entry = self._api_entry(name)
            job = self._job(entry)
            if job is not None and self.jobs is not None:
                job_ttl = ttl_s if ttl_s is not None else max(job.expires_at - job.written_at, 1.0)
                job = self.jobs.renew(job, time.time() + job_ttl)
                self.wake.set()
                return self._job_view(job)
            check_origin(entry, ORIGIN_API)
            ttl = ttl_s if ttl_s is not None else entry.lease_ttl_s
            if ttl is None:
                raise LeaseError(f"{name} has no lease to renew; give a lease TTL to add one")
            renewed = entry.renewed(time.time(), ttl)
            self.api.put(renewed)
            try:
                self.api.save()
            except StateSaveError:
                self.api.put(entry)
                raise
            entry = renewed
            self.wake.set()
            return entry_view(entry, self._states, self._devices())

    def plan_object(self, obj: PolicyObject) -> list[str]:
        """The kernel changes applying obj would make; raises RefusedError as apply does."""
        name = obj.metadata.name
        with self._lock:
            entry = new_entry(obj, time.time(), None)
            candidate = {**self._entries(), name: entry}
            read = self._read()
            self._check(name, entry, candidate, read)
            return list(self._dry_run(entry, candidate, read))

    def fleet_names(self) -> set[str]:
        """The API objects the fleet aggregator applied."""
        with self._lock:
            return {e.name for e in self.api.entries() if e.origin == ORIGIN_FLEET}

    def policies(self) -> list[PolicyView]:
        """Every file policy, then every API object, as of the last pass."""
        with self._lock:
            views = self._file_views()
            views.extend(
                entry_view(entry, self._states, self._devices()) for entry in self.api.entries()
            )
            views.extend(self._job_view(job) for job in self._jobs_with_qos())
            return views

    def remove_all(self) -> None:
        """Take every tree, ingress redirect and the nftables table down (--on-exit remove)."""
        with self._lock:
            options = self.settings.kernel_options(self.kernel)
            nothing = plan(DesiredState((), {}), self.kernel, self._state, options)
            done = enforce(nothing, self.kernel, self._state, enforced_before={})
            for name, error in sorted(done.errors.items()):
                log.error("QoS %s not removed: %s", name, error)
            self._enforced.clear()
            self._state = QosState()
            self._save_state(self._state)

    def close(self) -> None:
        self.kernel.close()

    # --- one pass ---

    def _pass(self, read: FileRead | None = None) -> PassResult:
        """`read`: the policy files as `_read` just returned them, to save reading twice."""
        self._expire_leases(time.time())
        if self.jobs is not None:
            self.jobs.refresh()
        read = read if read is not None else self._read()
        files = self._files = file_set(read, self._state)
        self._settling = bool(read.unsettled)
        entries = self._entries()
        planned = plan_pass(files.policies, entries, self._state, self.kernel, self.settings)
        done = enforce(planned.plan, self.kernel, self._state, enforced_before=self._enforced)
        if done.state != self._state or STATE_FILE in self._unsaved:
            self._save_state(done.state)
        self._state = done.state
        self._enforced = dict(done.enforced)
        if not self._orphans_checked and not read.violations and not done.errors:
            self._remove_orphans(done.state)
        states: dict[str, tuple[str, str]] = dict(planned.admission.assignments)
        for name, problem in planned.admission.refused.items():
            states[name] = (FAILED, problem.description)
        for loaded in planned.admission.policies:
            name = loaded.policy.metadata.name
            error = done.errors.get(name)
            stale = files.stale.get(name)
            waiting = planned.desired.waiting.get(name, "")
            if stale is not None:
                kept = "the version last applied stays" if name in done.enforced else ""
                text = "; ".join(t for t in (stale, kept, error) if t)
                states[name] = (FAILED, text)
            else:
                states[name] = (FAILED, error) if error is not None else (ENFORCED, waiting)
        self._states = states
        views = self._file_views()
        # Read by the qos collector every tick, without waiting for the lock.
        self.policy_counts = Counter(
            [("file", view.state) for view in views]
            + [
                (_count_source(entry), states.get(name, (PENDING, ""))[0])
                for name, entry in entries.items()
            ]
        )
        result = "invalid" if read.violations else "error" if done.errors else "success"
        self.results[result] += 1
        for device, count in done.drift.items():
            self.drift[device] += count
        self._last_failed = dict(done.errors)
        self._report(read, files, done.errors, self._slurm_problems(entries, states))
        self.waiting_cgroups = self._waiting_cgroups(planned.admission.policies, entries)
        for callback in self.after_pass:
            callback()
        return PassResult(
            result,
            done.changes,
            tuple(f"{name}: {error}" for name, error in done.errors.items()),
            tuple(read.violations),
            done.drift,
            done.errors,
        )

    def _file_views(self) -> list[PolicyView]:
        """The file policies as of the last pass: those enforced (or kept) by name, then
        those refused, then broken files that name no policy (listed by file)."""
        files = self._files
        devices = self._devices()
        ordered = sorted(files.policies, key=lambda p: p.policy.metadata.name)
        views = [file_view(loaded, self._states, devices) for loaded in ordered]
        for refusal in files.refused:
            failed = {refusal.name: (FAILED, refusal.reason)}
            views.append(file_view(refusal.loaded, failed, {}))
        for file, reason in sorted(files.unnamed.items()):
            views.append(PolicyView(Path(file).name, "file", file, "QosPolicy", {}, FAILED, reason))
        return views

    def _read(self) -> FileRead:
        paths = policy_files(self.settings.policy_dir)
        self._settler.forget_except(paths)
        return read_files(
            paths,
            interface_exists=self.kernel.interface_exists,
            cache=self._parsed,
            settled=self._settler.settled,
            kept=kept_from_state(self._state),
            incumbents=[(p.name, p.file) for p in self._state.policies.values()],
        )

    def _effective_files(self, read: FileRead) -> list[LoadedPolicy]:
        """The file policies a pass would enforce given `read`."""
        return file_set(read, self._state).policies

    def _devices(self) -> dict[str, str]:
        return {name: policy.device for name, policy in self._enforced.items()}

    def _entries(self) -> dict[str, ApiEntry]:
        """The API objects, and the assignments of the jobs (an API object's name wins)."""
        entries = {e.name: e for e in self._job_entries()}
        entries.update((e.name, e) for e in self.api.entries())
        return entries

    def _jobs_with_qos(self) -> list[Job]:
        return [] if self.jobs is None else [j for j in self.jobs.jobs() if j.qos is not None]

    def _job_entries(self) -> list[ApiEntry]:
        return [
            ApiEntry(
                name=job.name,
                kind="QosAssignment",
                document=job.assignment(),
                applied_at=job.written_at,
                lease_ttl_s=max(job.expires_at - job.written_at, 0.0),
                expires_at=job.expires_at,
                origin=ORIGIN_SLURM,
            )
            for job in self._jobs_with_qos()
        ]

    def _job(self, entry: ApiEntry) -> Job | None:
        if entry.origin != ORIGIN_SLURM or self.jobs is None:
            return None
        return self.jobs.find(entry.name)

    def _job_view(self, job: Job) -> PolicyView:
        entry = next(e for e in self._job_entries() if e.name == job.name)
        states = self._states
        if self.api.get(job.name) is not None:
            states = {job.name: (FAILED, f"the name {job.name} is held by an API object")}
        return entry_view(entry, states, self._devices(), file=str(job.path))

    def _slurm_problems(
        self, entries: Mapping[str, ApiEntry], states: Mapping[str, tuple[str, str]]
    ) -> dict[str, tuple[str, str]]:
        """Why jobs' cgroups cannot appear on this host (logged once, not per job)."""
        problems: dict[str, tuple[str, str]] = {}
        for name, entry in entries.items():
            if entry.origin != ORIGIN_SLURM or states.get(name, ("", ""))[0] != PENDING:
                continue
            for match in entry.document["spec"]["match"]:
                problem = slurm_scope_problem(
                    self.settings.cgroup_root, match["cgroup"], self.settings.cgroup_layout
                )
                if problem is not None:
                    problems[f"slurm {problem}"] = ("Slurm jobs cannot be classified", problem)
        return problems

    def _waiting_cgroups(
        self, policies: list[LoadedPolicy], entries: Mapping[str, ApiEntry]
    ) -> frozenset[Path]:
        """The cgroups named by the enforced policies and the assignments that are not
        there (absolute paths)."""
        root = self.settings.cgroup_root
        if root is None:
            return frozenset()
        names = {
            entry.cgroup
            for loaded in policies
            for cls in loaded.policy.spec.classes
            for entry in cls.match
            if entry.cgroup is not None
        }
        for entry in entries.values():
            if entry.kind == "QosAssignment":
                model = entry.model()
                assert isinstance(model, QosAssignment)
                names.update(m.cgroup for m in model.spec.match if m.cgroup is not None)
        return frozenset(root / name for name in names if not cgroup_exists(root, name))

    def _check(
        self, name: str, entry: ApiEntry, candidate: Mapping[str, ApiEntry], read: FileRead
    ) -> None:
        files = self._effective_files(read)
        admission = admit(
            files,
            candidate,
            interface_exists=self.kernel.interface_exists,
            cgroup_root=self.settings.cgroup_root,
        )
        check_admitted(name, entry, admission)
        before = admit(
            files,
            self._entries(),
            interface_exists=self.kernel.interface_exists,
            cgroup_root=self.settings.cgroup_root,
            cgroups_required=False,
        )
        check_displaces_none(name, before, admission)

    def _dry_run(
        self,
        entry: ApiEntry,
        candidate: Mapping[str, ApiEntry],
        read: FileRead,
        *,
        refuse: bool = True,
    ) -> tuple[str, ...]:
        """The changes a pass over `candidate` would make to what `entry` touches (its
        policy; an assignment's policy too) and to the nftables table. RefusedError when
        the pass would fail for it, as applying it would (`refuse`)."""
        planned = plan_pass(
            self._effective_files(read), candidate, self._state, self.kernel, self.settings
        )
        failure = _failure(entry, planned.plan.errors, self._last_failed) if refuse else None
        if failure is not None:
            raise RefusedError([Precondition("KERNEL", entry.name, failure)])
        target = assignment_target(entry)
        touched = {entry.name} if target is None else {entry.name, target}
        return tuple(planned.plan.lines(touched))

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
        if expired or self.api.path.name in self._unsaved:
            self._saved(self.api.path.name, self.api.save)

    def _remove_orphans(self, state: QosState) -> None:
        """Remove the trees, ingress redirects and IFB devices of the agent's that no
        policy claims (a state file lost or set aside, a crash between a kernel change
        and its save). Run after a pass that enforced every policy: what a policy claims
        that pass has adopted, so the rest is nobody's."""
        self._orphans_checked = True
        found = self.kernel.agent_objects()
        devices = {p.device for p in state.policies.values()}
        redirects = {p.interface for p in state.policies.values() if p.direction == "ingress"}
        steps: list[RemoveTree | RemoveRedirect] = []
        interfaces = set(found.redirects - redirects)
        for ifb in found.ifbs - devices - {ifb_name(i) for i in interfaces}:
            interface = ifb.removeprefix(IFB_PREFIX)
            if ifb_name(interface) == ifb:
                interfaces.add(interface)
            else:
                # A hashed name (a long interface name) does not say its interface.
                log.warning("IFB device %s is not claimed by any policy; left in place", ifb)
        steps.extend(RemoveRedirect(i) for i in sorted(interfaces))
        steps.extend(RemoveTree(d) for d in sorted(found.trees - devices - found.ifbs))
        for step in steps:
            try:
                self.kernel.apply(step)
            except FabricError as exc:
                log.error("removing %s that no policy claims failed: %s", step, exc)
                continue
            log.warning("removed %s: the agent's, and no policy claims it", _orphan_text(step))

    def _save_state(self, state: QosState) -> None:
        self._saved(STATE_FILE, lambda: save_state(self.settings.state_dir, state))

    def _saved(self, file: str, save: Callable[[], None]) -> None:
        """Save with `save`; a failure is logged when it starts and when it ends, and
        counted, never raised: a pass enforces whether or not its record can be kept."""
        try:
            save()
        except StateSaveError as exc:
            self.save_failures[file] += 1
            if self._unsaved.get(file) != str(exc):
                log.error("%s; enforcing on, saving again every pass", exc)
            self._unsaved[file] = str(exc)
            return
        if self._unsaved.pop(file, None) is not None:
            log.info("%s saved again", self.settings.state_dir / file)

    def _raise_unsaved(self) -> None:
        """StateSaveError when the last pass could not save the QoS state."""
        if STATE_FILE in self._unsaved:
            # Once more, for the error to raise (and in case the directory is back).
            save_state(self.settings.state_dir, self._state)
            self._unsaved.pop(STATE_FILE, None)

    def _undo(self, name: str, previous: ApiEntry | None, read: FileRead) -> None:
        """Put API object `name` back as it was (`previous`; None: absent) and enforce
        that; a failure of this pass is logged, the caller raises the original error."""
        if previous is None:
            self.api.remove(name)
        else:
            self.api.put(previous)
        try:
            self._pass(read)
        except Exception:
            log.exception("API %s: undoing a refused change failed", name)

    def _api_entry(self, name: str) -> ApiEntry:
        entry = self._entries().get(name)
        if entry is not None:
            return entry
        files = {p.policy.metadata.name: p.file for p in self._effective_files(self._read())}
        if name in files:
            reason = f"the policy comes from file {files[name]}: edit or remove the file"
            raise RefusedError([Precondition("SOURCE", name, reason)])
        raise NotFoundError(f"no API policy named {name!r}")

    def _report(
        self,
        read: FileRead,
        files: FileSet,
        errors: Mapping[str, str],
        others: Mapping[str, tuple[str, str]],
    ) -> None:
        """Log each problem as it appears or changes, and once when it is gone."""
        current: dict[str, tuple[str, str]] = dict(others)
        if read.left_out is not None:
            current["directory"] = ("QoS policy directory", str(read.left_out))
        for file, reason in read.broken.items():
            current[f"file {file}"] = (f"QoS policy file {file}", f"not taken: {reason}")
        for refusal in read.refused:
            key = f"policy {refusal.loaded.file} {refusal.name}"
            current[key] = (f"QoS policy {refusal.name}", f"refused: {refusal.violation}")
        for name, error in errors.items():
            what = "QoS nftables table" if name == NFT_DEVICE else f"QoS policy {name}"
            current[f"kernel {name}"] = (what, error)
        for key, (subject, text) in sorted(current.items()):
            if self._reported.get(key) != (subject, text):
                log.error("%s: %s%s", subject, text, _kept_note(key, files))
        for key in sorted(self._reported.keys() - current.keys()):
            log.info("%s: the problem is gone", self._reported[key][0])
        self._reported = current


def _count_source(entry: ApiEntry) -> str:
    """The source label of an API object in the policy counts."""
    return "slurm" if entry.origin == ORIGIN_SLURM else "api"


def _kept_note(key: str, files: FileSet) -> str:
    """What stays enforced despite the problem under `key`, for its log line."""
    kind, _, rest = key.partition(" ")
    if kind == "file":
        kept = sorted(
            p.policy.metadata.name
            for p in files.policies
            if p.file == rest and p.policy.metadata.name in files.stale
        )
        if len(kept) == 1:
            return f" (policy {kept[0]} stays as last applied)"
        if kept:
            return f" (policies {', '.join(kept)} stay as last applied)"
    elif kind == "policy" and rest.rsplit(" ", 1)[-1] in files.stale:
        return " (the version last applied stays enforced)"
    return ""


def _orphan_text(step: RemoveTree | RemoveRedirect) -> str:
    if isinstance(step, RemoveTree):
        return f"the HTB tree on {step.device}"
    return f"the ingress redirect of {step.interface} and IFB device {ifb_name(step.interface)}"


def _failure(entry: ApiEntry, errors: Mapping[str, str], before: Mapping[str, str]) -> str | None:
    """Why a pass with `entry` in it fails for `entry`: its policy's error (an
    assignment's: the policy it joins), or an error of the nftables table that the pass
    before did not have (`before`; one that was there already is not `entry`'s doing)."""
    name = assignment_target(entry) or entry.name
    if name in errors:
        return errors[name]
    table = errors.get(NFT_DEVICE)
    return table if table != before.get(NFT_DEVICE) else None
