"""The QoS state the agent persists: what it last applied, per policy.

Written atomically (a temporary file, fsync, rename), so a crash leaves the previous
state or the new one, never a torn file. On restart the agent reads it to keep each
class on its handle, so the tree it plans equals the tree already in the kernel and
enforcement carries on without a single kernel change.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.errors import FabricError

STATE_FILE = "qos-state.json"
VERSION = 1


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
    def from_json(cls, data: Mapping[str, Any]) -> AppliedPolicy:
        return cls(
            name=str(data["name"]),
            file=str(data["file"]),
            interface=str(data["interface"]),
            direction=str(data["direction"]),
            device=str(data["device"]),
            minors={str(k): int(v) for k, v in dict(data["minors"]).items()},
            document=dict(data.get("document", {})),
            base=dict(data["base"]) if data.get("base") is not None else None,
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


def load_state(state_dir: Path) -> QosState:
    """The persisted state; an empty one when there is none yet."""
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return QosState()
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read QoS state: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateError(f"{path}: not a version {VERSION} QoS state file")
    try:
        policies = [AppliedPolicy.from_json(item) for item in data["policies"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: malformed QoS state: {exc}") from None
    return QosState(
        {p.name: p for p in policies}, str(data.get("nft_body", "")), data.get("nft_listing")
    )


def save_state(state_dir: Path, state: QosState) -> None:
    """Replace the state file atomically."""
    payload = {
        "version": VERSION,
        "policies": [state.policies[name].to_json() for name in sorted(state.policies)],
        "nft_body": state.nft_body,
        "nft_listing": state.nft_listing,
    }
    write_json_atomic(state_dir / STATE_FILE, payload)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace `path` with `payload` as JSON: a temporary file, fsync, rename, and an
    fsync of the directory, so a crash leaves the old file or the new one."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable once the directory entry is.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
