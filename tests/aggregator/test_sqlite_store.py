"""What only the SQLite store does: its schema version and its in-process watch queue."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.aggregator.store import StoreError
from agent.aggregator.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.aggregator.conftest import run


def test_database_from_a_newer_aggregator_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SqliteStore(f"sqlite://{path}", str(path))

    async def main() -> None:
        try:
            with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
                await store.list_assignments()
        finally:
            await store.close()

    run(main())


def test_a_version_1_database_is_migrated_and_keeps_its_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(_MIGRATIONS[1])
        connection.execute(
            "INSERT INTO node_labels (node, labels, revision) VALUES ('gpu-001', '{}', 1)"
        )
        connection.execute("PRAGMA user_version = 1")
    store = SqliteStore(f"sqlite://{path}", str(path))

    async def main() -> None:
        try:
            assert await store.list_nodes() == {"gpu-001": {}}
            await store.node_alive("gpu-001", ttl_s=5)
            assert await store.live_nodes() == {"gpu-001"}
        finally:
            await store.close()

    run(main())
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    assert "node_liveness" not in tables and version == SCHEMA_VERSION


def test_watch_consumer_that_falls_behind_is_told(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(f"sqlite://{path}", str(path), watch_queue_limit=2)

    async def main() -> None:
        try:
            async with store.watch() as changes:
                for node in ("gpu-001", "gpu-002", "gpu-003"):
                    await store.set_node_labels(node, {})
                await asyncio.sleep(0)  # let the published changes land

                queued = [(await anext(changes)).key, (await anext(changes)).key]
                with pytest.raises(StoreError, match="fell more than 2 changes behind"):
                    await anext(changes)

            assert queued == ["gpu-001", "gpu-002"]
        finally:
            await store.close()

    run(main())
