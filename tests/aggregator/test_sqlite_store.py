"""What only the SQLite store does: its schema version and its in-process watch queue."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.aggregator.store import StoreError
from agent.aggregator.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.aggregator.conftest import run


def test_database_from_a_newer_aggregator_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SqliteStore(f"sqlite://{path}", str(path))

    async def main() -> None:
        try:
            with pytest.raises(StoreError, match="schema version 2 is newer"):
                await store.list_assignments()
        finally:
            await store.close()

    run(main())


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
