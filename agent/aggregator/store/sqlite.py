"""The embedded store: one SQLite file, for a single aggregator replica.

Every statement runs on one worker thread that owns the connection, so writes are
serialized in the order they were called and the event loop never blocks on the disk.
Watches see this store object's own writes only: two processes on one file would each
miss the other's changes, which is why several replicas need the etcd store.

Liveness is kept in memory, not in the file: it describes this process's agent streams,
which a restart ends anyway (the agents register again within seconds), and with no
other replica to read it a write per node per quarter ttl would be the store's busiest
work for nothing (17 % of the aggregator's CPU at 10,000 nodes when it was written).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from agent.aggregator.store.base import (
    Assignment,
    Change,
    ChangeKind,
    CorruptRecord,
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

T = TypeVar("T")

SCHEMA_VERSION = 3

# Schema by version; opening a database at an older version runs the steps after it.
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE revision_counter (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        );
        INSERT INTO revision_counter (id, revision) VALUES (1, 0);
        CREATE TABLE assignments (
            name TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            revision INTEGER NOT NULL
        );
        CREATE TABLE node_labels (
            node TEXT PRIMARY KEY,
            labels TEXT NOT NULL,
            revision INTEGER NOT NULL
        );
        CREATE TABLE node_liveness (
            node TEXT PRIMARY KEY,
            expires_unix_s REAL NOT NULL
        );
    """,
    # Liveness moved to memory.
    2: "DROP TABLE node_liveness;",
    # The store's identity (store_id, kept_released): written by identity(create=True).
    3: "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
}

# A watch consumer this far behind has stopped consuming; its watch ends with a
# StoreError rather than holding every later change in memory.
WATCH_QUEUE_LIMIT = 10_000
# How long a writer waits for another connection's lock (another process on the file).
_BUSY_TIMEOUT_MS = 5_000


class SqliteStore:
    """The Store on a SQLite file (`sqlite:///abs/path.db`) or in memory (`:memory:`)."""

    def __init__(
        self,
        url: str,
        path: str,
        watch_queue_limit: int = WATCH_QUEUE_LIMIT,
        *,
        create: bool = True,
    ) -> None:
        self._url = url
        self._path = path
        # Whether a missing file may be made (init, tests); `run` opens existing stores only.
        self._create = create
        self._watch_queue_limit = watch_queue_limit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._connection: sqlite3.Connection | None = None  # the worker thread's only
        self._watchers: set[_Watcher] = set()
        # Node -> when its liveness runs out (monotonic seconds).
        self._live: dict[str, float] = {}

    @property
    def url(self) -> str:
        return self._url

    # --- the worker thread ---

    async def _run(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def in_worker() -> T:
            try:
                return work(self._connect())
            except sqlite3.Error as exc:
                raise StoreError(self._url, operation, str(exc)) from exc

        return await loop.run_in_executor(self._executor, in_worker)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        existed = self._path == ":memory:" or os.path.exists(self._path)
        if not existed and not self._create:
            raise StoreNotInitialised(
                self._url,
                "open",
                f"{self._path} does not exist: `fabric-aggregator init --store {self._url}` "
                "makes a new, empty store",
            )
        # Autocommit mode: every write below opens its own BEGIN IMMEDIATE transaction.
        connection = sqlite3.connect(self._path, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if existed and self._path != ":memory:":
                self._check_schema(connection)
            connection.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL is durable against a process crash, not a power loss;
            # desired state is re-applied by operators and agents re-register.
            connection.execute("PRAGMA synchronous = NORMAL")
            self._migrate(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _check_schema(self, connection: sqlite3.Connection) -> None:
        """An existing file must hold the aggregator's schema: one emptied to 0 bytes,
        truncated or replaced would otherwise be given a new, empty schema, and every
        agent would remove its fleet policies."""
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            size = os.path.getsize(self._path)
            raise StoreNotInitialised(
                self._url,
                "open",
                f"{self._path} exists ({size} bytes) but holds no aggregator schema "
                "(emptied, truncated or not an aggregator store): refusing to start with "
                "no desired state. Restore it from a backup, or move it aside and run "
                f"`fabric-aggregator init --store {self._url}` for a new store (agents "
                "then keep the fleet policies they hold until `fabricctl fleet "
                "release-kept`)",
            )

    def _migrate(self, connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this aggregator's {SCHEMA_VERSION}"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _write(
        self,
        connection: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        write: Callable[[int], tuple[T, Change | None]],
    ) -> T:
        """Run `write(next_revision)` in one transaction; publish its change after commit.

        The change is handed to the loop from this thread, right after the commit, so
        watchers receive changes in commit (= revision) order.
        """
        connection.execute("BEGIN IMMEDIATE")
        try:
            (revision,) = connection.execute(
                "UPDATE revision_counter SET revision = revision + 1 WHERE id = 1 "
                "RETURNING revision"
            ).fetchone()
            result, change = write(int(revision))
            if change is None:
                connection.execute("ROLLBACK")
            else:
                connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        if change is not None:
            loop.call_soon_threadsafe(self._publish, change)
        return result

    # --- assignments ---

    async def put_assignment(
        self, assignment: Assignment, expected_revision: int | None = None
    ) -> Assignment:
        if expected_revision is not None and expected_revision < 0:
            raise ValueError(f"expected_revision {expected_revision}: must be >= 0")
        loop = asyncio.get_running_loop()
        now_s = time.time()
        # Encoded once here to reject an oversize document before touching the database.
        encode_assignment(assignment, now_s, now_s)

        def write(connection: sqlite3.Connection) -> Assignment:
            def in_transaction(revision: int) -> tuple[Assignment, Change | None]:
                row = connection.execute(
                    "SELECT record, revision FROM assignments WHERE name = ?",
                    (assignment.name,),
                ).fetchone()
                actual = 0 if row is None else int(row[1])
                if expected_revision is not None and expected_revision != actual:
                    raise RevisionConflict(assignment.name, expected_revision, actual)
                created_s = now_s
                if row is not None:
                    # A garbled record is replaced: the write repairs it.
                    with contextlib.suppress(CorruptRecord):
                        created_s = decode_assignment(row[0], 0).created_unix_s
                record = encode_assignment(assignment, created_s, now_s)
                connection.execute(
                    "INSERT INTO assignments (name, record, revision) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET "
                    "record = excluded.record, revision = excluded.revision",
                    (assignment.name, record.decode(), revision),
                )
                stored = decode_assignment(record, revision)
                return stored, Change(
                    ChangeKind.ASSIGNMENT, assignment.name, revision, assignment=stored
                )

            return self._write(connection, loop, in_transaction)

        return await self._run(f"put assignment {assignment.name!r}", write)

    async def get_assignment(self, name: str) -> Assignment | None:
        def read(connection: sqlite3.Connection) -> Assignment | None:
            row = connection.execute(
                "SELECT record, revision FROM assignments WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else decode_assignment(row[0], int(row[1]))

        return await self._run(f"get assignment {name!r}", read)

    async def list_assignments(self) -> list[Assignment]:
        def read(connection: sqlite3.Connection) -> list[Assignment]:
            rows = connection.execute(
                "SELECT name, record, revision FROM assignments ORDER BY name"
            ).fetchall()
            assignments = []
            for name, record, revision in rows:
                with skipping_corrupt(self._url, f"assignment {name!r}"):
                    assignments.append(decode_assignment(record, int(revision)))
            return assignments

        return await self._run("list assignments", read)

    async def delete_assignment(self, name: str, expected_revision: int | None = None) -> bool:
        if expected_revision is not None and expected_revision <= 0:
            raise ValueError(f"expected_revision {expected_revision}: must be > 0 to delete")
        loop = asyncio.get_running_loop()

        def write(connection: sqlite3.Connection) -> bool:
            def in_transaction(revision: int) -> tuple[bool, Change | None]:
                row = connection.execute(
                    "SELECT revision FROM assignments WHERE name = ?", (name,)
                ).fetchone()
                actual = 0 if row is None else int(row[0])
                if expected_revision is not None and expected_revision != actual:
                    raise RevisionConflict(name, expected_revision, actual)
                if row is None:
                    return False, None
                connection.execute("DELETE FROM assignments WHERE name = ?", (name,))
                return True, Change(ChangeKind.ASSIGNMENT, name, revision)

            return self._write(connection, loop, in_transaction)

        return await self._run(f"delete assignment {name!r}", write)

    # --- identity ---

    async def identity(self, *, create: bool = False) -> StoreIdentity:
        def read(connection: sqlite3.Connection) -> StoreIdentity:
            connection.execute("BEGIN IMMEDIATE")
            try:
                meta = dict(connection.execute("SELECT key, value FROM store_meta").fetchall())
                if "store_id" not in meta:
                    if not create:
                        raise StoreNotInitialised(
                            self._url,
                            "identity",
                            "the store has no store id: `fabric-aggregator init --store "
                            f"{self._url}` gives it one",
                        )
                    meta["store_id"] = new_store_id()
                    connection.execute(
                        "INSERT INTO store_meta (key, value) VALUES ('store_id', ?)",
                        (meta["store_id"],),
                    )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            store_id = stored_store_id(self._url, meta["store_id"])
            return StoreIdentity(store_id, meta.get("kept_released") == "1")

        return await self._run("read the store identity", read)

    async def release_kept(self) -> StoreIdentity:
        def write(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO store_meta (key, value) VALUES ('kept_released', '1') "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )

        await self._run("release kept policies", write)
        return await self.identity()

    # --- node labels ---

    async def set_node_labels(self, node: str, labels: Mapping[str, str]) -> int:
        check_node_name(node)
        check_labels(f"node {node!r}", labels)
        record = encode_labels(node, labels)
        loop = asyncio.get_running_loop()

        def write(connection: sqlite3.Connection) -> int:
            def in_transaction(revision: int) -> tuple[int, Change | None]:
                connection.execute(
                    "INSERT INTO node_labels (node, labels, revision) VALUES (?, ?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET "
                    "labels = excluded.labels, revision = excluded.revision",
                    (node, record.decode(), revision),
                )
                return revision, Change(
                    ChangeKind.NODE_LABELS, node, revision, labels=decode_labels(record)
                )

            return self._write(connection, loop, in_transaction)

        return await self._run(f"set labels of node {node!r}", write)

    async def node_labels(self, node: str) -> dict[str, str] | None:
        def read(connection: sqlite3.Connection) -> dict[str, str] | None:
            row = connection.execute(
                "SELECT labels FROM node_labels WHERE node = ?", (node,)
            ).fetchone()
            return None if row is None else decode_labels(row[0])

        return await self._run(f"get labels of node {node!r}", read)

    async def list_nodes(self) -> dict[str, dict[str, str]]:
        def read(connection: sqlite3.Connection) -> dict[str, dict[str, str]]:
            rows = connection.execute("SELECT node, labels FROM node_labels ORDER BY node")
            nodes = {}
            for node, labels in rows:
                with skipping_corrupt(self._url, f"labels of node {node!r}"):
                    nodes[node] = decode_labels(labels)
            return nodes

        return await self._run("list nodes", read)

    # --- liveness: a deadline per node, in this process's memory (see the docstring) ---

    async def node_alive(self, node: str, ttl_s: int) -> None:
        check_node_name(node)
        if ttl_s < 1:
            raise ValueError(f"node {node!r}: ttl_s {ttl_s}: must be >= 1")
        self._live[node] = time.monotonic() + ttl_s

    async def live_nodes(self) -> set[str]:
        now_s = time.monotonic()
        return {node for node, expires_s in self._live.items() if expires_s > now_s}

    async def node_gone(self, node: str) -> None:
        self._live.pop(node, None)

    async def forget_node(self, node: str) -> None:
        self._live.pop(node, None)
        loop = asyncio.get_running_loop()

        def write(connection: sqlite3.Connection) -> None:
            def in_transaction(revision: int) -> tuple[None, Change | None]:
                deleted = connection.execute("DELETE FROM node_labels WHERE node = ?", (node,))
                if deleted.rowcount == 0:
                    return None, None
                return None, Change(ChangeKind.NODE_LABELS, node, revision)

            self._write(connection, loop, in_transaction)

        await self._run(f"forget node {node!r}", write)

    # --- watch ---

    def _publish(self, change: Change) -> None:
        for watcher in list(self._watchers):
            watcher.offer(change)

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[Change]]:
        watcher = _Watcher(self._url, self._watch_queue_limit)
        self._watchers.add(watcher)
        try:
            yield watcher.changes()
        finally:
            self._watchers.discard(watcher)

    async def close(self) -> None:
        def disconnect() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, disconnect)
        finally:
            self._executor.shutdown(wait=True)
            for watcher in list(self._watchers):
                watcher.offer(None)


class _Watcher:
    """One watch's queue. None in the queue ends the watch (the store closed)."""

    def __init__(self, url: str, limit: int) -> None:
        self._url = url
        self._limit = limit
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._overflowed = False

    def offer(self, change: Change | None) -> None:
        if change is not None and self._queue.qsize() >= self._limit:
            self._overflowed = True
            return
        self._queue.put_nowait(change)

    async def changes(self) -> AsyncIterator[Change]:
        while True:
            if self._overflowed and self._queue.empty():
                raise StoreError(
                    self._url,
                    "watch",
                    f"the consumer fell more than {self._limit} changes behind; "
                    "watch again and re-list",
                )
            change = await self._queue.get()
            if change is None:
                return
            yield change
