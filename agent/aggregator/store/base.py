"""The aggregator's desired-state store: records, errors and the `Store` interface.

Desired state is small and changes rarely: policy assignments with their node selectors,
node labels, and which nodes are live. Telemetry never goes here (it belongs in
Prometheus). Two implementations share one contract test suite
(tests/aggregator/test_store_contract.py): SQLite for a single aggregator replica and
etcd for several replicas serving one fleet.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.common.errors import FabricError
from agent.common.labels import check_label_types

log = logging.getLogger(__name__)

# etcd refuses requests over 1.5 MiB; a third of that leaves room for the request's own
# framing and keeps every stored value far from the limit whichever backend holds it.
MAX_DOCUMENT_BYTES = 512 * 1024

# Assignment names are DNS labels, like the policies' own metadata.name.
_ASSIGNMENT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Node names are host names (DNS subdomains); `/` can never appear, so a name is safe as
# the last component of an etcd key.
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9._]{0,251}[A-Za-z0-9])?$")


class StoreError(FabricError):
    """The store's backend could not be reached or failed an operation."""

    def __init__(self, url: str, operation: str, reason: str) -> None:
        super().__init__(f"store {url}: {operation}: {reason}")
        self.url = url
        self.operation = operation
        self.reason = reason


class StoreNotInitialised(StoreError):
    """A store `fabric-aggregator init` has not made (or one that lost what it made: a
    SQLite file emptied to 0 bytes, an etcd prefix wiped). The aggregator refuses to run
    on it: an empty desired state would have every agent remove its fleet policies."""


@dataclass(frozen=True)
class StoreIdentity:
    """Who a store is: a random id made once, at init, that agents remember as the
    store that gave them their fleet policies; and whether an operator has released
    the policies agents kept from other stores (`fabricctl fleet release-kept`)."""

    store_id: str
    kept_released: bool = False


def new_store_id() -> str:
    return secrets.token_hex(16)


_STORE_ID = re.compile(r"^[0-9a-f]{32}$")


def stored_store_id(url: str, raw: bytes | str) -> str:
    """The store id as read back; StoreError when it is not one that init makes (a
    damaged store, or a value something else wrote): agents remember this id, and it
    must not be garbage."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if not _STORE_ID.match(text):
        raise StoreError(
            url, "read the store identity", f"store id {text[:40]!r} is not one init makes"
        )
    return text


class RevisionConflict(FabricError):
    """A compare-and-swap lost: the record's revision is not the one the caller expected.
    Mapped to gRPC ABORTED: the caller re-reads and retries."""

    def __init__(self, name: str, expected_revision: int, actual_revision: int) -> None:
        actual = "absent" if actual_revision == 0 else f"at revision {actual_revision}"
        super().__init__(f"assignment {name!r}: expected revision {expected_revision}, {actual}")
        self.name = name
        self.expected_revision = expected_revision
        self.actual_revision = actual_revision


class DocumentTooLarge(FabricError):
    """A record encodes to more than MAX_DOCUMENT_BYTES. Mapped to INVALID_ARGUMENT."""

    def __init__(self, what: str, size_bytes: int) -> None:
        super().__init__(
            f"{what}: {size_bytes} bytes encoded, the store accepts at most {MAX_DOCUMENT_BYTES}"
        )
        self.what = what
        self.size_bytes = size_bytes


def check_node_name(node: str) -> None:
    """Raise ValueError unless `node` is a host name."""
    if not isinstance(node, str) or not _NODE_NAME.match(node):
        raise ValueError(f"node name {node!r}: not a host name")


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether `labels` carry every label of `selector` with its value (an empty
    selector matches everything): the one rule of fleet policies, listings and events."""
    return all(labels.get(key) == value for key, value in selector.items())


@dataclass(frozen=True)
class Assignment:
    """A policy document assigned to the nodes whose labels match `selector`.

    `policy` is a fabric.qos/v1alpha1 QosPolicy or QosAssignment document as its YAML
    names it. `selector` matches a node when every label in it has the given value on the
    node; an empty selector matches every node. `revision`, `created_unix_s` and
    `updated_unix_s` are the store's: set on write, ignored when passed in.
    """

    name: str
    policy: Mapping[str, Any]
    selector: Mapping[str, str] = field(default_factory=dict)
    revision: int = 0
    created_unix_s: float = 0.0
    updated_unix_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ASSIGNMENT_NAME.match(self.name):
            raise ValueError(f"assignment name {self.name!r}: not a DNS label")
        if not isinstance(self.policy, Mapping):
            raise ValueError(f"assignment {self.name!r}: policy: must be a mapping")
        # The grammar is checked where selectors come in (the service); what is stored
        # already must load whatever an older version let through.
        check_label_types(f"assignment {self.name!r}: selector", self.selector)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with `labels` is selected."""
        return selector_matches(self.selector, labels)


class ChangeKind(enum.Enum):
    ASSIGNMENT = "assignment"
    NODE_LABELS = "node_labels"


@dataclass(frozen=True)
class Change:
    """One write seen by a watch. `key` is the assignment or node name; the new value is
    in `assignment` or `labels` according to `kind`, and both are None for a delete."""

    kind: ChangeKind
    key: str
    revision: int
    assignment: Assignment | None = None
    labels: Mapping[str, str] | None = None

    @property
    def deleted(self) -> bool:
        return self.assignment is None and self.labels is None


class Store(Protocol):
    """Desired state and liveness of one fleet.

    Every method raises StoreError when the backend fails; none swallows a failure.
    """

    @property
    def url(self) -> str:
        """The URL the store was opened with, for messages and metrics."""
        ...

    async def put_assignment(
        self, assignment: Assignment, expected_revision: int | None = None
    ) -> Assignment:
        """Create or replace an assignment; return it with the store's revision and times.

        With `expected_revision` the write is a compare-and-swap: 0 means the assignment
        must not exist yet, any other value must be its current revision; otherwise
        RevisionConflict. DocumentTooLarge when the record is over MAX_DOCUMENT_BYTES.
        """
        ...

    async def get_assignment(self, name: str) -> Assignment | None: ...

    async def list_assignments(self) -> list[Assignment]:
        """Every assignment, sorted by name."""
        ...

    async def delete_assignment(self, name: str, expected_revision: int | None = None) -> bool:
        """Delete an assignment; False when there was none. With `expected_revision` (> 0)
        the assignment must be at that revision, otherwise RevisionConflict."""
        ...

    async def set_node_labels(self, node: str, labels: Mapping[str, str]) -> int:
        """Replace a node's labels; return the write's revision."""
        ...

    async def node_labels(self, node: str) -> dict[str, str] | None:
        """A node's labels, None for a node the store has never seen."""
        ...

    async def list_nodes(self) -> dict[str, dict[str, str]]:
        """Every node with labels, node name -> labels."""
        ...

    async def node_alive(self, node: str, ttl_s: int) -> None:
        """Mark a node live for `ttl_s` seconds from now.

        A node stays in live_nodes() while this is called at intervals under 3/4 of
        `ttl_s`: calls closer together than `ttl_s / 4` may be coalesced into one refresh,
        so that a summary per second per node does not mean a backend write per second.
        """
        ...

    async def live_nodes(self) -> set[str]:
        """Nodes marked live whose ttl has not run out."""
        ...

    async def node_gone(self, node: str) -> None:
        """Remove a node from live_nodes() now."""
        ...

    async def forget_node(self, node: str) -> None:
        """Delete the node's labels (watchers see them deleted) and its liveness; a node
        the store does not know is no error."""
        ...

    async def identity(self, *, create: bool = False) -> StoreIdentity:
        """The store's identity. Without `create`, StoreNotInitialised when the store has
        none (never initialised, or lost); with it, a store without one gets a new id
        (what `fabric-aggregator init` does)."""
        ...

    async def release_kept(self) -> StoreIdentity:
        """Record that agents may drop the fleet policies they kept from other stores."""
        ...

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[Change]]:
        """Changes to assignments and node labels, in revision order, from the moment
        the context is entered until it exits.

        To follow the state without a gap, enter the watch first, then list: every change
        carries the full new value, so applying the queued changes after the listing
        converges on the store's state.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; other calls are invalid afterwards."""
        ...


# --- record encoding, shared by the backends: compact JSON, size-checked ---


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_assignment(
    assignment: Assignment, created_unix_s: float, updated_unix_s: float
) -> bytes:
    """The stored form of an assignment (revision excluded: the backend keeps it)."""
    try:
        raw = _compact_json(
            {
                "name": assignment.name,
                "policy": assignment.policy,
                "selector": dict(assignment.selector),
                "created_unix_s": created_unix_s,
                "updated_unix_s": updated_unix_s,
            }
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"assignment {assignment.name!r}: policy: not JSON: {exc}") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"assignment {assignment.name!r}", len(raw))
    return raw


class CorruptRecord(ValueError):
    """A stored value that does not decode to its record (a damaged store, or a value
    written under the store's keys by something else)."""


def decode_assignment(raw: bytes | str, revision: int) -> Assignment:
    """The assignment of a stored value; CorruptRecord when it is not one."""
    try:
        record = json.loads(raw)
        return Assignment(
            name=record["name"],
            policy=record["policy"],
            selector=record["selector"],
            revision=revision,
            created_unix_s=float(record["created_unix_s"]),
            updated_unix_s=float(record["updated_unix_s"]),
        )
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptRecord(f"not an assignment record: {type(exc).__name__}: {exc}") from exc


def encode_labels(node: str, labels: Mapping[str, str]) -> bytes:
    raw = _compact_json(dict(labels))
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(f"labels of node {node!r}", len(raw))
    return raw


def decode_labels(raw: bytes | str) -> dict[str, str]:
    """The labels of a stored value; CorruptRecord when they are not labels."""
    try:
        labels = json.loads(raw)
        if not isinstance(labels, dict):
            raise TypeError(f"a JSON {type(labels).__name__}, not an object")
        check_label_types("labels", labels)
    except (ValueError, TypeError) as exc:
        raise CorruptRecord(f"not a labels record: {type(exc).__name__}: {exc}") from exc
    return labels


@contextmanager
def skipping_corrupt(url: str, key: str) -> Iterator[None]:
    """Around decoding one record of a listing or watch: a value that does not decode is
    logged and left out, so one bad key costs only itself. Its last good value, if this
    replica had one, stays in use; writing the record again repairs it."""
    try:
        yield
    except CorruptRecord as exc:
        log.error("%s: %s: %s; left out", url, key, exc)


class RefreshCoalescer:
    """Decides which node_alive() calls reach the backend: the first, one after the ttl
    changes, and then at most one per quarter ttl (see Store.node_alive)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float]] = {}

    def due(self, node: str, ttl_s: int, now_s: float) -> bool:
        last = self._last.get(node)
        return last is None or last[0] != ttl_s or now_s - last[1] >= ttl_s / 4

    def refreshed(self, node: str, ttl_s: int, now_s: float) -> None:
        self._last[node] = (ttl_s, now_s)

    def forget(self, node: str) -> None:
        self._last.pop(node, None)
