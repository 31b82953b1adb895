"""The operator's policy files: the policy directory read and checked against this host,
file by file, and the policies last applied from files, rebuilt from the state (what a
broken file or one still being written keeps enforced).

Each file stands alone: one that cannot be read or parsed, or a policy naming an
interface this host lacks or a device, interface or name another policy holds (the one
enforced already, else the earlier file), is refused by itself, and every other file's
policies are taken as read. A file is taken
once it is complete: its size and modification time unchanged for a settle time (a
writer caught mid-write would otherwise be enforced as written, a truncated document
included); until then the version read before stands. A read takes the directory up to
MAX_POLICY_FILES files and MAX_POLICY_DIRECTORY_BYTES, in name order; past that, files
are not read, and what was applied from them stays as last applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.common.policy.limits import format_bytes
from agent.common.policy.model import (
    LoadedPolicy,
    ParseCache,
    PolicyError,
    PolicyViolation,
    QosPolicy,
    load_policies,
    read_policy_text,
)
from agent.node.qos.api_objects import API_SOURCE
from agent.node.qos.desired import owner_text, policy_device
from agent.node.qos.state import QosState

log = logging.getLogger(__name__)

POLICY_SUFFIXES = (".yaml", ".yml")
# What one pass reads of the policy directory, in name order. A node enforces a policy
# per interface and direction, a few kilobytes each: a thousand files of that are 4 MiB.
# Files within the 1 MiB document limit each still cost their parse, about 0.4 s a MiB
# (a file of comments alike), and the parse cache holds their text: 200 such files took
# 105 s to read and 465 MiB, so the directory as a whole is bounded too. Past either
# bound a file is not read; what was applied from it stays enforced as last applied.
MAX_POLICY_FILES = 1024
MAX_POLICY_DIRECTORY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Refusal:
    """A policy of a readable file that is not taken, and why."""

    loaded: LoadedPolicy
    violation: PolicyViolation

    @property
    def name(self) -> str:
        return self.loaded.policy.metadata.name

    @property
    def reason(self) -> str:
        return _reason(self.violation)


@dataclass(frozen=True)
class FileRead:
    """What a read of the policy files found.

    `policies`: those that may be enforced as read; `violations`: every problem found
    (none: every policy may be enforced); `refused`: the policies of readable files left
    out; `broken`: the files none of whose policies could be read (unreadable, not YAML,
    a document the model refuses), with their reasons; `unsettled`: files still
    changing, whose previous version stands (those never read before: not read yet);
    `left_out`: the directory's files past MAX_POLICY_FILES or
    MAX_POLICY_DIRECTORY_BYTES, not read, as one violation (also in `violations`)."""

    policies: list[LoadedPolicy]
    violations: list[PolicyViolation]
    refused: tuple[Refusal, ...] = ()
    broken: Mapping[str, str] = field(default_factory=dict)
    unsettled: tuple[str, ...] = ()
    left_out: PolicyViolation | None = None


def policy_files(directory: Path) -> list[Path]:
    """The entries of `directory` named as policy files, in name order; none when it does
    not exist. Entries that are not readable files (a symlink loop or one to nothing, a
    FIFO, a directory) are in the list: reading them reports why, where skipping them
    would drop a policy without a word. Dotfiles are an editor's or a config manager's
    work in progress (`.node.yaml.swp`, `.node.yaml`), as are other suffixes
    (`node.yaml.tmp`): they are never read."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".")
    )


class FileSettler:
    """Which files are complete: a file is taken once its size and modification time
    (and inode: a rename puts a new one in place) have not changed for `settle_s`, by
    their age or as seen across passes. `clock`: wall-clock seconds (tests set it)."""

    def __init__(self, settle_s: float, clock: Callable[[], float]) -> None:
        self.settle_s = settle_s
        self._clock = clock
        # Path -> (signature, when this signature was first seen).
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}

    def settled(self, path: Path) -> bool:
        if self.settle_s <= 0:
            return True
        try:
            st = path.stat()
        except OSError:
            return True  # the read reports it
        now = self._clock()
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        seen = self._seen.get(str(path))
        if seen is None or seen[0] != signature:
            seen = (signature, now)
            self._seen[str(path)] = seen
        age_s = now - st.st_mtime_ns / 1e9
        return age_s >= self.settle_s or now - seen[1] >= self.settle_s

    def forget_except(self, paths: Sequence[Path]) -> None:
        keep = {str(p) for p in paths}
        for name in set(self._seen) - keep:
            del self._seen[name]


def read_files(
    paths: Sequence[Path],
    *,
    interface_exists: Callable[[str], bool],
    cache: ParseCache | None = None,
    settled: Callable[[Path], bool] | None = None,
    kept: Callable[[Collection[str]], Sequence[LoadedPolicy]] = lambda files: (),
    incumbents: Collection[tuple[str, str]] = (),
) -> FileRead:
    """Load and check each file on its own: the model, then ownership against the
    policies `kept` returns for the files that cannot be taken (those stay enforced
    from the state, and hold their names and devices) and the files before it, then
    the interface on this host. `cache`: each file's text and parse from the last
    read, updated in place; `settled`: whether a file may be taken now (else its cached
    version is, or none); `incumbents`: the (name, file) of the policies enforced now,
    which keep their names and interfaces against files that claim them later.

    cgroups are not checked: a missing one costs only its own nftables rule until it
    appears (agent.node.qos.nftrules)."""
    cache = cache if cache is not None else {}
    parsed: ParseCache = {}
    candidates: list[LoadedPolicy] = []
    violations: list[PolicyViolation] = []
    broken: dict[str, str] = {}
    unsettled: list[str] = []
    budget = _DirectoryBudget()
    for path in paths:
        name = str(path)
        if budget.full:
            budget.left_out.append(name)
            continue
        previous = cache.get(name)
        if settled is not None and not settled(path):
            if previous is not None and not budget.take(previous[0]):
                budget.left_out.append(name)
                continue
            unsettled.append(name)
            if previous is None:
                continue
            entry = previous
        else:
            try:
                text = read_policy_text(path)
            except PolicyError as exc:
                budget.take("")
                violations.extend(exc.violations)
                broken[name] = "; ".join(_reason(v) for v in exc.violations)
                continue
            if not budget.take(text):
                budget.left_out.append(name)
                continue
            if previous is not None and previous[0] == text:
                entry = previous
            else:
                try:
                    entry = (text, load_policies(text, name))
                except PolicyError as exc:
                    entry = (text, exc)
        parsed[name] = entry
        if isinstance(entry[1], PolicyError):
            violations.extend(entry[1].violations)
            broken[name] = "; ".join(_reason(v) for v in entry[1].violations)
        else:
            candidates.extend(entry[1])
    left_out = budget.violation(paths) if budget.left_out else None
    if left_out is not None:
        violations.append(left_out)
        # Only the files something was applied from are named: their policies stay as
        # last applied, with why. The others are one problem of the directory, however
        # many they are.
        applied = {p.file for p in kept(budget.left_out)}
        for name in budget.left_out:
            if name in applied:
                broken[name] = budget.reason
    cache.clear()
    cache.update(parsed)
    unread = [f for f in unsettled if f not in parsed]
    taken, refused = admit_files(candidates, kept([*broken, *unread]), interface_exists, incumbents)
    violations.extend(r.violation for r in refused)
    return FileRead(taken, violations, tuple(refused), broken, tuple(unsettled), left_out)


class _DirectoryBudget:
    """The files and bytes one read of the policy directory takes, in name order, and the
    files left out past them."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.left_out: list[str] = []

    @property
    def full(self) -> bool:
        """Whether no file after this one is read: the count is reached, or a file did not
        fit in the bytes left."""
        return self.files >= MAX_POLICY_FILES or bool(self.left_out)

    def take(self, text: str) -> bool:
        """Whether a file of `text` (an unreadable file: "") fits."""
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if self.full or self.bytes + size > MAX_POLICY_DIRECTORY_BYTES:
            return False
        self.files += 1
        self.bytes += size
        return True

    @property
    def reason(self) -> str:
        return (
            f"not read: the policy directory is read up to {MAX_POLICY_FILES} files and "
            f"{format_bytes(MAX_POLICY_DIRECTORY_BYTES)}, in name order"
        )

    def violation(self, paths: Sequence[Path]) -> PolicyViolation:
        first = Path(self.left_out[0])
        return PolicyViolation(
            str(first.parent),
            "",
            f"{len(self.left_out)} of {len(paths)} policy files {self.reason}, "
            f"from {first.name} on",
        )


def admit_files(
    candidates: Sequence[LoadedPolicy],
    kept: Sequence[LoadedPolicy],
    interface_exists: Callable[[str], bool],
    incumbents: Collection[tuple[str, str]] = (),
) -> tuple[list[LoadedPolicy], list[Refusal]]:
    """The candidates that may be enforced beside `kept`: a name, an (interface,
    direction) or a device already held goes to the first holder, and an interface this
    host lacks is refused. `incumbents` ((name, file) enforced now) come first, then the
    others in file order: a file added later never takes what is enforced."""
    first = set(incumbents)
    candidates = sorted(candidates, key=lambda p: (p.policy.metadata.name, p.file) not in first)
    names: dict[str, LoadedPolicy] = {p.policy.metadata.name: p for p in kept}
    claims: dict[tuple[str, str], LoadedPolicy] = {_claim(p): p for p in kept}
    devices: dict[str, LoadedPolicy] = {policy_device(p.policy): p for p in kept}
    taken: list[LoadedPolicy] = []
    refused: list[Refusal] = []
    for loaded in candidates:
        spec, name = loaded.policy.spec, loaded.policy.metadata.name
        problem: tuple[str, str] | None = None
        if name in names:
            problem = (
                "metadata.name",
                f"policy name {name!r} is also used in {_where(names[name])}",
            )
        elif _claim(loaded) in claims:
            other = claims[_claim(loaded)]
            problem = (
                "spec.interface",
                f"{spec.interface} {spec.direction} is already owned by policy "
                f"{other.policy.metadata.name!r} in {_where(other)}",
            )
        elif policy_device(loaded.policy) in devices:
            # An egress policy on another one's IFB: the devices collide.
            other = devices[policy_device(loaded.policy)]
            problem = ("spec.interface", owner_text(other, _where(other)))
        elif not interface_exists(spec.interface):
            problem = ("spec.interface", f"unknown interface {spec.interface!r} on this host")
        if problem is not None:
            refused.append(Refusal(loaded, loaded.violation(*problem)))
            continue
        names[name] = loaded
        claims[_claim(loaded)] = loaded
        devices[policy_device(loaded.policy)] = loaded
        taken.append(loaded)
    return taken, refused


def _where(loaded: LoadedPolicy) -> str:
    if loaded.document is None:
        return loaded.file
    return f"{loaded.file} (document {loaded.document})"


def _reason(violation: PolicyViolation) -> str:
    """The violation without its file (the caller names the file once)."""
    parts = []
    if violation.line is not None:
        parts.append(f"line {violation.line}:{violation.column}")
    if violation.document is not None:
        parts.append(f"document {violation.document}")
    if violation.path:
        parts.append(violation.path)
    return ": ".join([*parts, violation.reason])


def _claim(loaded: LoadedPolicy) -> tuple[str, str]:
    return loaded.policy.spec.interface, loaded.policy.spec.direction


@dataclass(frozen=True)
class FileSet:
    """The file policies a pass enforces and what it cannot take of the files.

    `policies`: those taken as read, then those kept as last applied (`stale`, by name,
    with why their file is not taken). `refused`: the policies of readable files that
    are not enforced at all (never applied, or their last version could not stay);
    `unnamed`: broken files that name no policy the agent had applied from them."""

    policies: list[LoadedPolicy]
    stale: Mapping[str, str]
    refused: tuple[Refusal, ...]
    unnamed: Mapping[str, str]


def kept_from_state(state: QosState) -> Callable[[Collection[str]], list[LoadedPolicy]]:
    """For `read_files`: the policies last applied from the given files."""

    def kept(files: Collection[str]) -> list[LoadedPolicy]:
        wanted = set(files)
        return [p for p in policies_from_state(state) if p.file in wanted]

    return kept


def file_set(read: FileRead, state: QosState) -> FileSet:
    """What of `read` a pass enforces, given what the agent last applied (`state`)."""
    applied = {p.policy.metadata.name: p for p in policies_from_state(state)}
    unread = [f for f in read.unsettled if f not in _files(read)]
    stale: dict[str, str] = {}
    kept: list[LoadedPolicy] = []
    unnamed: dict[str, str] = {}
    for file in [*read.broken, *unread]:
        mine = [p for p in applied.values() if p.file == file]
        reason = read.broken.get(file)
        if reason is None:
            kept.extend(mine)  # still being written: the version applied stands
            continue
        if not mine:
            unnamed[file] = reason
        for policy in mine:
            kept.append(policy)
            stale[policy.policy.metadata.name] = f"{file}: {reason}"
    holders = [*read.policies, *kept]
    names = {p.policy.metadata.name for p in holders}
    devices = {policy_device(p.policy) for p in holders}
    refused: list[Refusal] = []
    for refusal in read.refused:
        before = applied.get(refusal.name)
        if (
            before is not None
            and before.file == refusal.loaded.file
            and refusal.name not in names
            and policy_device(before.policy) not in devices
        ):
            kept.append(before)
            names.add(refusal.name)
            devices.add(policy_device(before.policy))
            stale[refusal.name] = str(refusal.violation)
            continue
        refused.append(refusal)
    return FileSet([*read.policies, *kept], stale, tuple(refused), unnamed)


def _files(read: FileRead) -> set[str]:
    return {p.file for p in read.policies} | {r.loaded.file for r in read.refused}


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
