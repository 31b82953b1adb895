"""The QoS reconciler: make the kernel match the policies in the policy directory.

Desired state is every policy file in `policy_dir`; actual state is what netlink and
nftables report. Each pass reads both, applies only the difference (the same policies
twice make no kernel change; one edited class changes only that class), corrects drift
(a class, filter, qdisc or the nftables table someone removed) and counts it, and
persists what it applied. A policy directory that fails validation changes nothing:
what is enforced stays enforced until the files are valid again. A kernel failure
half-way through one interface rolls that interface back (agent.qos.tc.apply) and is
reported; the other interfaces are still reconciled.
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

from agent.errors import FabricError
from agent.qos import htb, ifb, nftrules, tc
from agent.qos.desired import build_tree
from agent.qos.nftables import Nftables, NftablesBackend, NftError
from agent.qos.policy import (
    LoadedPolicy,
    PolicyViolation,
    QosPolicy,
    check_host,
    load_policy_files,
)
from agent.qos.state import AppliedPolicy, QosState, load_state, save_state

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
        self._lock = threading.Lock()
        self._state = load_state(settings.state_dir)
        self._managed: dict[str, ManagedPolicy] = {}
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
        """One pass: desired from the policy directory, actual from the kernel."""
        with self._lock:
            outcome = self._pass()
        self.results[outcome.result] += 1
        for device, count in outcome.drift.items():
            self.drift[device] += count
        self.first_pass.set()
        return outcome

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Reconcile every `interval_s`, or at once when `wake` is set (SIGHUP)."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.reconcile()
            except Exception:
                # A bug must not end enforcement of what is already in place.
                log.exception("QoS reconcile pass failed")
                self.results["error"] += 1
            self.wake.wait(max(0.0, interval_s - (time.monotonic() - started)))
            self.wake.clear()

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

    def _pass(self) -> PassResult:
        loaded, violations = self._load()
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
        changes, errors, drift = self._enforce(loaded)
        if errors and result == "success":
            result = "error"
        return PassResult(result, tuple(changes), tuple(errors), tuple(violations), drift)

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
            try:
                policy = QosPolicy.model_validate(applied.document, by_alias=True, by_name=False)
            except ValueError as exc:
                log.error("state of policy %s unusable, not enforced: %s", applied.name, exc)
                continue
            policies.append(LoadedPolicy(applied.file, None, policy))
        return policies

    def _enforce(
        self, loaded: Sequence[LoadedPolicy]
    ) -> tuple[list[str], list[str], dict[str, int]]:
        changes: list[str] = []
        errors: list[str] = []
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
                errors.append(f"{name}: {exc}")
                log.error("QoS policy %s (%s): %s", name, item.file, exc)
                if previous is not None:
                    applied_now[name] = previous
                continue
            applied_now[name] = AppliedPolicy(
                name, item.file, spec.interface, spec.direction, device, desired.minors, document
            )
            managed[name] = ManagedPolicy(policy, item.file, device, desired.minors)
        for name, applied in self._state.policies.items():
            if name not in wanted:
                try:
                    self._remove(applied)
                    changes.append(f"{name}: removed from {applied.device}")
                    log.info("QoS policy %s removed from %s", name, applied.device)
                except FabricError as exc:
                    errors.append(f"{name}: {exc}")
                    applied_now[name] = applied
        try:
            reloaded, drifted = self._sync_nft([(m.policy, m.minors) for m in managed.values()])
            if reloaded:
                changes.append("nftables table reloaded")
            if drifted:
                drift[NFT_DEVICE] += 1
                log.warning("QoS drift in the nftables table corrected")
        except FabricError as exc:
            errors.append(f"nftables: {exc}")
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
