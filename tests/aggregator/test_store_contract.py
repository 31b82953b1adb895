"""One contract for every Store: run against SQLite and against a real etcd."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent.aggregator.store import (
    MAX_DOCUMENT_BYTES,
    Assignment,
    Change,
    ChangeKind,
    DocumentTooLarge,
    RevisionConflict,
    Store,
    StoreError,
    StoreNotInitialised,
    open_store,
)
from agent.common.errors import ConfigError
from tests.aggregator.conftest import EtcdServer, run
from tests.conftest import free_port

POLICY: dict[str, Any] = {
    "apiVersion": "fabric.qos/v1alpha1",
    "kind": "QosPolicy",
    "metadata": {"name": "training"},
    "spec": {"interfaces": ["eth0"], "classes": [{"name": "bulk", "rate": "10Gbit"}]},
}


def with_store(url: str, body: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store(url)
        try:
            await body(store)
        finally:
            await store.close()

    run(main())


async def next_changes(changes: AsyncIterator[Change], count: int) -> list[Change]:
    return [await asyncio.wait_for(anext(changes), timeout=5) for _ in range(count)]


def test_assignment_put_get_list_delete_roundtrip(store_url: str) -> None:
    async def body(store: Store) -> None:
        before_s = time.time()
        put = await store.put_assignment(
            Assignment("training", POLICY, selector={"pool": "training"})
        )
        other = await store.put_assignment(Assignment("eval", POLICY))

        assert put.revision > 0
        assert put.policy == POLICY
        assert put.selector == {"pool": "training"}
        assert before_s <= put.created_unix_s == put.updated_unix_s <= time.time()
        assert await store.get_assignment("training") == put
        assert await store.list_assignments() == [other, put]

        assert await store.delete_assignment("training") is True
        assert await store.delete_assignment("training") is False
        assert await store.get_assignment("training") is None
        assert await store.list_assignments() == [other]

    with_store(store_url, body)


def test_revisions_increase_and_created_time_survives_updates(store_url: str) -> None:
    async def body(store: Store) -> None:
        first = await store.put_assignment(Assignment("training", POLICY))
        labels_revision = await store.set_node_labels("gpu-001", {"pool": "training"})
        second = await store.put_assignment(
            Assignment("training", POLICY, selector={"pool": "training"})
        )

        assert first.revision < labels_revision < second.revision
        assert second.created_unix_s == first.created_unix_s
        assert second.updated_unix_s >= first.updated_unix_s

    with_store(store_url, body)


def test_compare_and_swap(store_url: str) -> None:
    async def body(store: Store) -> None:
        created = await store.put_assignment(Assignment("training", POLICY), expected_revision=0)
        with pytest.raises(RevisionConflict) as exists:
            await store.put_assignment(Assignment("training", POLICY), expected_revision=0)
        updated = await store.put_assignment(
            Assignment("training", POLICY, selector={"pool": "a"}),
            expected_revision=created.revision,
        )
        with pytest.raises(RevisionConflict) as stale:
            await store.put_assignment(
                Assignment("training", POLICY, selector={"pool": "b"}),
                expected_revision=created.revision,
            )
        with pytest.raises(RevisionConflict):
            await store.delete_assignment("training", expected_revision=created.revision)
        with pytest.raises(RevisionConflict) as absent:
            await store.put_assignment(Assignment("missing", POLICY), expected_revision=7)
        deleted = await store.delete_assignment("training", expected_revision=updated.revision)

        assert exists.value.actual_revision == created.revision
        assert stale.value.actual_revision == updated.revision
        assert absent.value.actual_revision == 0
        assert "'missing'" in str(absent.value)
        assert deleted is True
        assert await store.get_assignment("training") is None

    with_store(store_url, body)


def test_node_labels(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.set_node_labels("gpu-001", {"pool": "training", "rack": "r1"})
        await store.set_node_labels("gpu-002", {})
        await store.set_node_labels("gpu-001", {"pool": "inference"})

        assert await store.node_labels("gpu-001") == {"pool": "inference"}
        assert await store.node_labels("gpu-002") == {}
        assert await store.node_labels("gpu-003") is None
        assert await store.list_nodes() == {"gpu-001": {"pool": "inference"}, "gpu-002": {}}

    with_store(store_url, body)


def test_a_forgotten_node_loses_its_labels_and_liveness_and_watchers_see_it(
    store_url: str,
) -> None:
    async def body(store: Store) -> None:
        await store.set_node_labels("gpu-001", {"pool": "training"})
        await store.set_node_labels("gpu-002", {"pool": "training"})
        await store.node_alive("gpu-001", ttl_s=5)
        async with store.watch() as changes:
            await store.forget_node("gpu-001")
            await store.forget_node("gpu-009")  # never known: no error, no change
            await store.set_node_labels("gpu-003", {})
            seen = await next_changes(changes, 2)

        assert [(c.kind, c.key, c.deleted) for c in seen] == [
            (ChangeKind.NODE_LABELS, "gpu-001", True),
            (ChangeKind.NODE_LABELS, "gpu-003", False),
        ]
        assert await store.list_nodes() == {"gpu-002": {"pool": "training"}, "gpu-003": {}}
        assert await store.live_nodes() == set()

    with_store(store_url, body)


def test_liveness(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.node_alive("gpu-001", ttl_s=1)
        await store.node_alive("gpu-002", ttl_s=1)
        await store.node_alive("gpu-003", ttl_s=1)
        assert await store.live_nodes() == {"gpu-001", "gpu-002", "gpu-003"}

        await store.node_gone("gpu-003")
        assert await store.live_nodes() == {"gpu-001", "gpu-002"}

        # gpu-001 keeps reporting, gpu-002 falls silent. etcd checks lease expiry every
        # 500 ms, so allow for that past the ttl.
        deadline = time.monotonic() + 5
        live = await store.live_nodes()
        while "gpu-002" in live and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await store.node_alive("gpu-001", ttl_s=1)
            live = await store.live_nodes()
        assert live == {"gpu-001"}

        await store.node_gone("gpu-001")
        assert await store.live_nodes() == set()

    with_store(store_url, body)


def test_node_alive_again_after_its_ttl_ran_out(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.node_alive("gpu-001", ttl_s=1)
        deadline = time.monotonic() + 5
        while await store.live_nodes() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await store.live_nodes() == set()

        await store.node_alive("gpu-001", ttl_s=1)

        assert await store.live_nodes() == {"gpu-001"}

    with_store(store_url, body)


def test_desired_state_survives_reopening(store_url: str) -> None:
    async def write(store: Store) -> None:
        await store.put_assignment(Assignment("training", POLICY, selector={"pool": "a"}))
        await store.set_node_labels("gpu-001", {"pool": "a"})

    async def read(store: Store) -> None:
        found = await store.get_assignment("training")
        assert found is not None
        assert found.selector == {"pool": "a"}
        assert await store.list_nodes() == {"gpu-001": {"pool": "a"}}

    with_store(store_url, write)
    with_store(store_url, read)


def test_watch_sees_writes_in_order(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.put_assignment(Assignment("before", POLICY))
        async with store.watch() as changes:
            put = await store.put_assignment(Assignment("training", POLICY))
            labels_revision = await store.set_node_labels("gpu-001", {"pool": "training"})
            await store.node_alive("gpu-001", ttl_s=5)  # liveness is not desired state
            await store.delete_assignment("training")

            seen = await next_changes(changes, 3)

        assert [(c.kind, c.key, c.deleted) for c in seen] == [
            (ChangeKind.ASSIGNMENT, "training", False),
            (ChangeKind.NODE_LABELS, "gpu-001", False),
            (ChangeKind.ASSIGNMENT, "training", True),
        ]
        assert seen[0].assignment == put
        assert seen[1].labels == {"pool": "training"}
        assert seen[1].revision == labels_revision
        assert seen[0].revision < seen[1].revision < seen[2].revision

    with_store(store_url, body)


def test_oversize_document_rejected(store_url: str) -> None:
    async def body(store: Store) -> None:
        huge = {**POLICY, "spec": {"padding": "x" * MAX_DOCUMENT_BYTES}}
        with pytest.raises(DocumentTooLarge, match=r"assignment 'huge'.*at most 524288"):
            await store.put_assignment(Assignment("huge", huge))
        assert await store.get_assignment("huge") is None

    with_store(store_url, body)


def test_unreachable_store_raises_store_error(unreachable_store_url: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(StoreError) as failed:
            await store.get_assignment("training")
        assert unreachable_store_url in str(failed.value)
        assert "get assignment 'training'" in str(failed.value)

    started_s = time.monotonic()
    with_store(unreachable_store_url, body)
    assert time.monotonic() - started_s < 10


def test_invalid_records_rejected() -> None:
    with pytest.raises(ValueError, match="not a DNS label"):
        Assignment("Has/Slash", POLICY)
    with pytest.raises(ValueError, match="label"):
        Assignment("ok", POLICY, selector={"pool": 1})  # type: ignore[dict-item]
    # What a store holds loads whatever an older version let through: the label grammar
    # is checked where selectors come in (test_fleet_e2e: a selector outside it).
    assert Assignment("ok", POLICY, selector={"pool": "a b"}).selector == {"pool": "a b"}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgres://db/state", "scheme must be one of etcd, sqlite"),
        ("/var/lib/state.db", "scheme must be one of"),
        ("sqlite://relative/state.db", "want sqlite:///absolute/path"),
        ("sqlite:///var/lib/", "want sqlite:///absolute/path"),
        ("etcd://", "endpoint '': want host:port"),
        ("etcd://127.0.0.1", "endpoint '127.0.0.1': want host:port"),
        ("etcd://127.0.0.1:99999", "want host:port"),
        ("etcd://127.0.0.1:2379?tls=1", "unknown option 'tls'"),
        ("etcd://127.0.0.1:2379?prefix=fabric", "prefix 'fabric'"),
        ("etcd://127.0.0.1:2379?timeout_s=0", "timeout_s '0'"),
        ("etcd://etcd-a:2379,etcd-b:2379", "several endpoints must be IP addresses"),
        ("etcd://127.0.0.1:2379,[::1]:2379", "mix IPv4 and IPv6"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as rejected:
        open_store(url)
    assert url in str(rejected.value)
    assert reason in str(rejected.value)


# --- etcd only: several replicas on one etcd ---


def test_two_etcd_replicas_see_each_others_writes(etcd_server: EtcdServer) -> None:
    url = f"etcd://127.0.0.1:{etcd_server.port}?prefix=/fabric-replicas-{free_port()}/"

    async def main() -> None:
        first, second = open_store(url), open_store(url)
        try:
            async with second.watch() as changes:
                put = await first.put_assignment(Assignment("training", POLICY))
                await first.set_node_labels("gpu-001", {"pool": "training"})
                await first.node_alive("gpu-001", ttl_s=5)

                seen = await next_changes(changes, 2)

            assert [c.assignment for c in seen[:1]] == [put]
            assert seen[1].labels == {"pool": "training"}
            assert await second.get_assignment("training") == put
            assert await second.live_nodes() == {"gpu-001"}
            with pytest.raises(RevisionConflict):
                await second.put_assignment(Assignment("training", POLICY), expected_revision=0)
        finally:
            await first.close()
            await second.close()

    run(main())


def test_etcd_fails_over_between_endpoints(etcd_server: EtcdServer) -> None:
    dead_port = free_port()
    url = f"etcd://127.0.0.1:{dead_port},127.0.0.1:{etcd_server.port}?prefix=/fabric-failover/"

    async def body(store: Store) -> None:
        await store.set_node_labels("gpu-001", {"pool": "training"})
        assert await store.node_labels("gpu-001") == {"pool": "training"}

    with_store(url, body)


def test_etcd_node_gone_through_another_replica_then_alive_again(
    etcd_server: EtcdServer,
) -> None:
    url = f"etcd://127.0.0.1:{etcd_server.port}?prefix=/fabric-gone-{free_port()}/"

    async def main() -> None:
        holder, other = open_store(url), open_store(url)
        try:
            await holder.node_alive("gpu-001", ttl_s=1)
            await other.node_gone("gpu-001")
            assert await holder.live_nodes() == set()

            await asyncio.sleep(0.3)  # past the refresh coalescing window (ttl / 4)
            await holder.node_alive("gpu-001", ttl_s=1)

            assert await other.live_nodes() == {"gpu-001"}
        finally:
            await holder.close()
            await other.close()

    run(main())


def test_identity_is_made_once_by_init_and_release_is_recorded(store_url: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(StoreNotInitialised):
            await store.identity()

        made = await store.identity(create=True)
        again = await store.identity(create=True)
        read = await store.identity()
        released = await store.release_kept()

        assert len(made.store_id) == 32 and not made.kept_released
        assert again == read == made
        assert released.store_id == made.store_id and released.kept_released
        assert (await store.identity()).kept_released

    with_store(store_url, body)
