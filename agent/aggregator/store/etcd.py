"""The replicated store: etcd, through the asyncio client `aetcd`.

Several aggregator replicas on one etcd serve one fleet. Keys live under a prefix
(default `/fabric/`), values are compact JSON:

    <prefix>assignments/<name>   an assignment; its etcd mod_revision is its revision
    <prefix>labels/<node>        a node's labels
    <prefix>live/<node>          present while the node is live, attached to its lease
    <prefix>store/id             the store's id, made by `fabric-aggregator init`
    <prefix>store/kept_released  present once an operator released kept policies

Compare-and-swap is an etcd transaction comparing the key's mod_revision. Liveness is one
lease per node holding that single key, kept alive by keepalives rather than new leases;
when the lease runs out etcd deletes the key. Watches are etcd watches on the prefix, so
every replica sees every replica's writes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aetcd

from agent.aggregator.store.base import (
    Assignment,
    Change,
    ChangeKind,
    CorruptRecord,
    RefreshCoalescer,
    RevisionConflict,
    StoreError,
    StoreIdentity,
    StoreNotInitialised,
    check_node_name,
    decode_assignment,
    decode_labels,
    encode_assignment,
    encode_labels,
    new_store_id,
    skipping_corrupt,
    stored_store_id,
)
from agent.common.labels import check_labels

DEFAULT_PREFIX = "/fabric/"
DEFAULT_TIMEOUT_S = 5
# Listings come back in one response; gRPC's default 4 MiB receive limit would cap the
# desired state at a handful of large policies.
MAX_RECEIVE_BYTES = 128 * 1024 * 1024
# put_assignment without expected_revision retries a lost race; this many losses in a row
# mean something is rewriting the key in a loop.
_MAX_PUT_ATTEMPTS = 16


@dataclass(frozen=True)
class _HeldLease:
    lease_id: int
    ttl_s: int


class EtcdStore:
    """The Store on an etcd cluster (`etcd://host:port`)."""

    def __init__(
        self,
        url: str,
        host: str,
        port: int,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: int = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._client = aetcd.Client(
            host=host,
            port=port,
            timeout=timeout_s,
            options={"grpc.max_receive_message_length": MAX_RECEIVE_BYTES},
        )
        self._leases: dict[str, _HeldLease] = {}
        self._coalescer = RefreshCoalescer()

    @property
    def url(self) -> str:
        return self._url

    @contextmanager
    def _failing_as(self, operation: str) -> Iterator[None]:
        try:
            yield
        except aetcd.ClientError as exc:
            detail = str(exc) or "no detail from etcd"
            raise StoreError(self._url, operation, f"{type(exc).__name__}: {detail}") from exc

    def _key(self, kind: str, name: str) -> bytes:
        return f"{self._prefix}{kind}/{name}".encode()

    # --- assignments ---

    async def put_assignment(
        self, assignment: Assignment, expected_revision: int | None = None
    ) -> Assignment:
        if expected_revision is not None and expected_revision < 0:
            raise ValueError(f"expected_revision {expected_revision}: must be >= 0")
        now_s = time.time()
        # Encoded once here to reject an oversize document before a round trip.
        encode_assignment(assignment, now_s, now_s)
        key = self._key("assignments", assignment.name)
        tx = self._client.transactions
        with self._failing_as(f"put assignment {assignment.name!r}"):
            for _ in range(_MAX_PUT_ATTEMPTS):
                current = await self._client.get(key)
                actual = 0 if current is None else int(current.mod_revision)
                if expected_revision is not None and expected_revision != actual:
                    raise RevisionConflict(assignment.name, expected_revision, actual)
                created_s = now_s
                if current is not None:
                    # A garbled record is replaced: the write repairs it.
                    with contextlib.suppress(CorruptRecord):
                        created_s = decode_assignment(current.value, 0).created_unix_s
                record = encode_assignment(assignment, created_s, now_s)
                # mod_revision 0 compares equal for an absent key: create-only.
                succeeded, responses = await self._client.transaction(
                    compare=[tx.mod(key) == actual],
                    success=[tx.put(key, record), tx.get(key)],
                    failure=[],
                )
                if succeeded:
                    (_, written) = responses[1][0]
                    return decode_assignment(written.value, int(written.mod_revision))
                if expected_revision is not None:
                    latest = await self._client.get(key)
                    latest_revision = 0 if latest is None else int(latest.mod_revision)
                    raise RevisionConflict(assignment.name, expected_revision, latest_revision)
        raise StoreError(
            self._url,
            f"put assignment {assignment.name!r}",
            f"lost {_MAX_PUT_ATTEMPTS} races in a row to concurrent writers",
        )

    async def get_assignment(self, name: str) -> Assignment | None:
        with self._failing_as(f"get assignment {name!r}"):
            current = await self._client.get(self._key("assignments", name))
        if current is None:
            return None
        return decode_assignment(current.value, int(current.mod_revision))

    async def list_assignments(self) -> list[Assignment]:
        with self._failing_as("list assignments"):
            found = await self._client.get_prefix(
                self._key("assignments", ""), sort_order="ascend", sort_target="key"
            )
        assignments = []
        for kv in found:
            with skipping_corrupt(self._url, bytes(kv.key).decode(errors="replace")):
                assignments.append(decode_assignment(kv.value, int(kv.mod_revision)))
        return assignments

    async def delete_assignment(self, name: str, expected_revision: int | None = None) -> bool:
        if expected_revision is not None and expected_revision <= 0:
            raise ValueError(f"expected_revision {expected_revision}: must be > 0 to delete")
        key = self._key("assignments", name)
        tx = self._client.transactions
        with self._failing_as(f"delete assignment {name!r}"):
            if expected_revision is None:
                return await self._client.delete(key) is not None
            succeeded, responses = await self._client.transaction(
                compare=[tx.mod(key) == expected_revision],
                success=[tx.delete(key)],
                failure=[tx.get(key)],
            )
        if not succeeded:
            found = responses[0]
            actual = int(found[0][1].mod_revision) if found else 0
            raise RevisionConflict(name, expected_revision, actual)
        return True

    # --- node labels ---

    async def set_node_labels(self, node: str, labels: Mapping[str, str]) -> int:
        check_node_name(node)
        check_labels(f"node {node!r}", labels)
        record = encode_labels(node, labels)
        with self._failing_as(f"set labels of node {node!r}"):
            written = await self._client.put(self._key("labels", node), record)
        return int(written.header.revision)

    async def node_labels(self, node: str) -> dict[str, str] | None:
        with self._failing_as(f"get labels of node {node!r}"):
            current = await self._client.get(self._key("labels", node))
        return None if current is None else decode_labels(current.value)

    async def list_nodes(self) -> dict[str, dict[str, str]]:
        prefix = self._key("labels", "")
        with self._failing_as("list nodes"):
            found = await self._client.get_prefix(prefix, sort_order="ascend", sort_target="key")
        nodes = {}
        for kv in found:
            key = bytes(kv.key).decode(errors="replace")
            with skipping_corrupt(self._url, key):
                nodes[key[len(self._key("labels", "").decode()) :]] = decode_labels(kv.value)
        return nodes

    # --- liveness: one lease per node, holding one key ---

    async def node_alive(self, node: str, ttl_s: int) -> None:
        check_node_name(node)
        if ttl_s < 1:
            raise ValueError(f"node {node!r}: ttl_s {ttl_s}: must be >= 1")
        now_s = time.monotonic()
        if not self._coalescer.due(node, ttl_s, now_s):
            return
        key = self._key("live", node)
        held = self._leases.get(node)
        with self._failing_as(f"mark node {node!r} alive"):
            if held is not None and held.ttl_s == ttl_s:
                reply = await self._client.refresh_lease(held.lease_id)
                # TTL 0: the lease ran out before this keepalive; grant a new one below.
                if reply is not None and int(reply.TTL) > 0:
                    # The key can be gone while the lease lives (node_gone from a replica
                    # that held no lease for the node): put it back on the same lease.
                    if await self._client.get(key) is None:
                        await self._client.put(key, b"{}", lease=held.lease_id)
                    self._coalescer.refreshed(node, ttl_s, now_s)
                    return
            lease = await self._client.lease(ttl_s)
            await self._client.put(key, b"{}", lease=lease.id)
            self._leases[node] = _HeldLease(int(lease.id), ttl_s)
            if held is not None:
                # A changed ttl: the key moved to the new lease; the old one holds nothing.
                await self._revoke(held.lease_id)
        self._coalescer.refreshed(node, ttl_s, now_s)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._client.revoke_lease(lease_id)
        except aetcd.ClientError as exc:
            # A lease that already ran out is what revoking wanted.
            if "lease not found" not in str(exc):
                raise

    async def live_nodes(self) -> set[str]:
        prefix = self._key("live", "")
        with self._failing_as("list live nodes"):
            found = await self._client.get_prefix(prefix, keys_only=True)
        return {kv.key[len(prefix) :].decode() for kv in found}

    async def node_gone(self, node: str) -> None:
        """Revoke this replica's lease for the node, which deletes its key. A replica that
        holds no lease for the node deletes the key itself."""
        self._coalescer.forget(node)
        held = self._leases.pop(node, None)
        with self._failing_as(f"mark node {node!r} gone"):
            if held is not None:
                await self._revoke(held.lease_id)
            else:
                await self._client.delete(self._key("live", node))

    async def forget_node(self, node: str) -> None:
        await self.node_gone(node)
        with self._failing_as(f"forget node {node!r}"):
            await self._client.delete(self._key("labels", node))

    # --- identity ---

    async def identity(self, *, create: bool = False) -> StoreIdentity:
        key = self._key("store", "id")
        tx = self._client.transactions
        with self._failing_as("read the store identity"):
            current = await self._client.get(key)
            if current is None:
                if not create:
                    raise StoreNotInitialised(
                        self._url,
                        "identity",
                        f"no store id under {self._prefix} (never initialised, or the "
                        "prefix was wiped): refusing to start with no desired state; "
                        f"`fabric-aggregator init --store {self._url}` makes a new store",
                    )
                # Create-only: two replicas initialising at once agree on one id.
                await self._client.transaction(
                    compare=[tx.version(key) == 0],
                    success=[tx.put(key, new_store_id().encode())],
                    failure=[],
                )
                current = await self._client.get(key)
            released = await self._client.get(self._key("store", "kept_released"))
        if current is None:
            raise StoreError(self._url, "read the store identity", "the store id vanished")
        store_id = stored_store_id(self._url, bytes(current.value))
        return StoreIdentity(store_id, released is not None)

    async def release_kept(self) -> StoreIdentity:
        with self._failing_as("release kept policies"):
            await self._client.put(self._key("store", "kept_released"), b"1")
        return await self.identity()

    # --- watch ---

    def _change(self, event: Any) -> Change | None:
        key = bytes(event.kv.key).decode(errors="replace")[len(self._prefix) :]
        kind, _, name = key.partition("/")
        revision = int(event.kv.mod_revision)
        deleted = event.kind == aetcd.EventKind.DELETE
        if kind == "assignments":
            assignment = None if deleted else decode_assignment(event.kv.value, revision)
            return Change(ChangeKind.ASSIGNMENT, name, revision, assignment=assignment)
        if kind == "labels":
            labels = None if deleted else decode_labels(event.kv.value)
            return Change(ChangeKind.NODE_LABELS, name, revision, labels=labels)
        return None  # liveness and identity keys: not desired state

    async def _changes(self, watch: Any) -> AsyncIterator[Change]:
        with self._failing_as("watch"):
            async for event in watch:
                change = None
                with skipping_corrupt(self._url, bytes(event.kv.key).decode(errors="replace")):
                    change = self._change(event)
                if change is not None:
                    yield change

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[Change]]:
        with self._failing_as("watch"):
            watch = await self._client.watch_prefix(self._prefix.encode())
        try:
            yield self._changes(watch)
        finally:
            await watch.cancel()

    async def close(self) -> None:
        """Close the connection. Leases are left to run out rather than revoked: nodes of
        a replica that stops reconnect to another, which takes their liveness over."""
        await self._client.close()
