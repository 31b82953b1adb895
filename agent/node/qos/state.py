"""The QoS state the agent persists: what it last applied, per policy.

Written atomically (a temporary file, fsync, rename), so a crash leaves the previous
state or the new one, never a torn file. On restart the agent reads it to keep each
class on its handle, so the tree it plans equals the tree already in the kernel and
enforcement carries on without a single kernel change.

The file is a record the kernel and the policy files can rebuild, so an unusable one
(unreadable, not JSON, another version, a value out of range, over MAX_STATE_BYTES, a
directory in its place) never stops the agent: `Quarantine` renames it aside
(`qos-state.json.corrupt-<UTC time>`, the newest MAX_SET_ASIDE of each kept), logs why
and counts it, and the agent starts from the kernel as it finds it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from agent.common.errors import FabricError
from agent.common.files import FileTooLarge, NotRegularFile, read_regular, replace_atomically

log = logging.getLogger(__name__)

STATE_FILE = "qos-state.json"
VERSION = 1
# The agent's own files hold a few KiB per policy; anything this big is not one of them,
# and reading it whole would cost the agent its memory.
MAX_STATE_BYTES = 16 * 1024 * 1024
# HTB class minors as the tree model takes them (agent.node.qos.htb.HtbClass).
MAX_MINOR = 0xFFFE
DIRECTIONS = ("egress", "ingress")


class StateError(FabricError):
    """The state file exists but cannot be used."""


@dataclass(frozen=True)
class AppliedPolicy:
    """One policy as last applied: where it came from, the device its tree lives on, the
    class minors, and the policy document itself (YAML names)."""

    name: str
    file: str
    interface: str
    direction: str
    device: str
    minors: Mapping[str, int]
    # The policy as enforced: with the match entries of its assignments merged in.
    document: Mapping[str, Any] = field(default_factory=dict)
    # The policy as its source gave it, when assignments changed it; None: `document`.
    base: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "interface": self.interface,
            "direction": self.direction,
            "device": self.device,
            "minors": dict(self.minors),
            "document": dict(self.document),
            **({"base": dict(self.base)} if self.base is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> AppliedPolicy:
        """Raises StateError naming the field that is missing, of the wrong type or out
        of range."""
        if not isinstance(data, dict):
            raise StateError(f"a policy record is a {type(data).__name__}, not an object")
        name = text_field(data, "name")
        direction = text_field(data, "direction", name)
        if direction not in DIRECTIONS:
            raise StateError(f"policy {name}: direction {direction!r} is not egress or ingress")
        minors = data.get("minors")
        if not isinstance(minors, dict):
            raise StateError(f"policy {name}: minors is not an object")
        for cls_name, minor in minors.items():
            if type(minor) is not int or not 1 <= minor <= MAX_MINOR:
                raise StateError(
                    f"policy {name}: minor of class {cls_name} is {minor!r}, "
                    f"not an integer from 1 to {MAX_MINOR:#x}"
                )
        document = data.get("document", {})
        base = data.get("base")
        if not isinstance(document, dict) or not isinstance(base, dict | None):
            raise StateError(f"policy {name}: document or base is not an object")
        return cls(
            name=name,
            file=text_field(data, "file", name),
            interface=text_field(data, "interface", name),
            direction=direction,
            device=text_field(data, "device", name),
            minors=dict(minors),
            document=document,
            base=base,
        )


@dataclass(frozen=True)
class QosState:
    """Every applied policy, by name, and the nftables table as last loaded: its body and
    how the kernel listed it back (a restart compares the listing, rule handles included,
    to tell an untouched table from one to reload)."""

    policies: Mapping[str, AppliedPolicy] = field(default_factory=dict)
    nft_body: str = ""
    nft_listing: Any = None

    def minors(self, name: str) -> Mapping[str, int]:
        applied = self.policies.get(name)
        return applied.minors if applied else {}


def text_field(data: Mapping[str, Any], key: str, owner: str | None = None) -> str:
    """data[key] when it is a non-empty string; StateError naming it otherwise."""
    value = data.get(key)
    if not isinstance(value, str) or not value:
        where = f"policy {owner}: " if owner else ""
        raise StateError(f"{where}{key} is {value!r}, not a non-empty string")
    return value


def read_json(path: Path) -> Any:
    """The JSON value in state file `path`; None when there is no file. StateError when
    it cannot be used: not a regular file (a symbolic link included), over
    MAX_STATE_BYTES, not UTF-8, not JSON. NaN and Infinity parse (the fields that hold
    numbers refuse them). Other OSErrors (EACCES, EIO) propagate."""
    try:
        raw = read_regular(path, MAX_STATE_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotRegularFile:
        raise StateError(f"{path}: not a regular file") from None
    except FileTooLarge as exc:
        size = f"{exc.size} bytes, over" if exc.size is not None else "over"
        raise StateError(f"{path}: {size} the {MAX_STATE_BYTES} byte limit") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"{path}: not JSON: {exc}") from None


def check_version(path: Path, data: Any, what: str) -> dict[str, Any]:
    """`data` as the object of a version VERSION file; StateError otherwise."""
    if not isinstance(data, dict):
        raise StateError(f"{path}: a JSON {type(data).__name__}, not a {what} object")
    if data.get("version") != VERSION:
        raise StateError(f"{path}: version {data.get('version')!r}, not {VERSION}")
    return data


def load_state(state_dir: Path) -> QosState:
    """The persisted state; an empty one when there is none yet. StateError when the file
    cannot be used."""
    path = state_dir / STATE_FILE
    try:
        data = read_json(path)
    except OSError as exc:
        raise StateError(f"{path}: cannot read QoS state: {exc}") from None
    if data is None:
        return QosState()
    data = check_version(path, data, "QoS state")
    items = data.get("policies")
    if not isinstance(items, list):
        raise StateError(f"{path}: policies is not a list")
    try:
        policies = [AppliedPolicy.from_json(item) for item in items]
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None
    nft_body = data.get("nft_body", "")
    if not isinstance(nft_body, str):
        raise StateError(f"{path}: nft_body is not a string")
    return QosState({p.name: p for p in policies}, nft_body, data.get("nft_listing"))


# Set-aside copies kept of each state file: a start that finds it unusable every time
# (a restart loop) adds one a start, and the latest few are what an operator reads;
# without a bound, 16 MiB a start fills the disk.
MAX_SET_ASIDE = 5


class Quarantine:
    """Sets unusable state files aside, so that the agent starts without them and the
    operator can still read them; counts them by file name (a metric)."""

    def __init__(self, keep: int = MAX_SET_ASIDE) -> None:
        self.counts: Counter[str] = Counter()
        self.keep = keep

    def set_aside(self, path: Path, reason: str) -> Path | None:
        """Rename `path` to `<name>.corrupt-<UTC time>`, then remove the oldest of those
        past the newest `keep`; None when it cannot be (the state directory is
        read-only): it is then left where it is, and still unused."""
        self.counts[path.name] += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("%s; cannot set it aside (%s): starting without it", reason, exc)
            return None
        log.error("%s; set aside as %s: starting without it", reason, target.name)
        self._prune(path)
        return target

    def _prune(self, path: Path) -> None:
        # The UTC stamps sort as they were made.
        aside = sorted(path.parent.glob(f"{glob_escape(path.name)}.corrupt-*"))
        for old in aside[: max(len(aside) - self.keep, 0)]:
            if old.is_dir() and not old.is_symlink():
                continue  # a directory is not the agent's to empty
            try:
                old.unlink()
            except OSError as exc:
                log.warning("cannot remove %s, set aside earlier: %s", old, exc)


class StateSaveError(FabricError):
    """A state file could not be written: the directory is read-only, full, or gone."""

    def __init__(self, path: Path, exc: OSError) -> None:
        self.path = path
        self.errno = exc.errno
        name = errno.errorcode.get(exc.errno or 0, "")
        super().__init__(f"cannot save {path}: {name or 'error'} {exc.strerror or exc}")


def save_state(state_dir: Path, state: QosState) -> None:
    """Replace the state file atomically."""
    payload = {
        "version": VERSION,
        "policies": [state.policies[name].to_json() for name in sorted(state.policies)],
        "nft_body": state.nft_body,
        "nft_listing": state.nft_listing,
    }
    write_json_atomic(state_dir / STATE_FILE, payload)


def encode_json(payload: Any) -> bytes:
    """A state file's bytes for `payload`."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace `path` with `payload` as JSON: a temporary file, fsync, rename, and an
    fsync of the directory, so a crash leaves the old file or the new one. Raises
    StateSaveError (the file as it was) when the directory cannot take it, or (EFBIG)
    when it would be over MAX_STATE_BYTES: a file the next start would set aside."""
    data = encode_json(payload)
    try:
        if len(data) > MAX_STATE_BYTES:
            reason = f"{len(data)} bytes, over the {MAX_STATE_BYTES} byte limit"
            raise OSError(errno.EFBIG, reason, str(path))
        replace_atomically(path, data)
    except OSError as exc:
        raise StateSaveError(path, exc) from exc
