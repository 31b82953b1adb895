"""An aggregator (`AggregatorServer` over a `Fleet` and a real store) on its own event
loop thread, for tests that talk to it with real gRPC clients and real agent uplinks
without starting a process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent.aggregator.config import AggregatorConfig
from agent.aggregator.fleet import Fleet
from agent.aggregator.main import AggregatorServer
from agent.aggregator.metrics import FleetMetrics
from agent.aggregator.store import open_store
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc
from tests.pki import Issued

T = TypeVar("T")


class InProcessAggregator:
    """A started aggregator; `call` runs a function or coroutine on its loop."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.metrics = FleetMetrics()
        self._stopping: asyncio.Event | None = None
        self._ready: concurrent.futures.Future[AggregatorServer] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="aggregator", daemon=True)
        self._thread.start()
        self.server = self._ready.result(timeout=30)
        self.fleet: Fleet = self.server.fleet
        self._channels: list[grpc.Channel] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        store = open_store(self.config.store)
        fleet = Fleet(
            store, self.config.liveness, metrics=self.metrics, max_nodes=self.config.max_nodes
        )
        try:
            await fleet.start()
            server = AggregatorServer(self.config, fleet)
            await server.start()
        except BaseException as exc:
            await store.close()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(server)
        try:
            await self._stopping.wait()
            await server.stop(grace_s=0)
        finally:
            await fleet.stop()
            await store.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.tcp_port}"

    def call(self, work: Callable[[], T] | Coroutine[Any, Any, T], timeout_s: float = 10) -> T:
        """`work()` (or the coroutine) on the aggregator's loop, its result here."""
        if asyncio.iscoroutine(work):
            return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout_s)

        async def wrapped() -> T:
            return work()  # type: ignore[operator,no-any-return]

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout_s)

    def stub(
        self, client: Issued | None = None, ca: bytes | None = None
    ) -> pb_grpc.AggregatorServiceStub:
        """A client on TCP: plaintext, or TLS trusting `ca` with `client`'s certificate."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        if ca is None:
            channel = grpc.insecure_channel(self.target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                ca,
                client.key_pem if client else None,
                client.cert_pem if client else None,
            )
            channel = grpc.secure_channel(self.target, credentials, options=options)
        self._channels.append(channel)
        return pb_grpc.AggregatorServiceStub(channel)

    def unix_stub(self) -> pb_grpc.AggregatorServiceStub:
        channel = grpc.insecure_channel(f"unix:{self.config.grpc_socket}")
        self._channels.append(channel)
        return pb_grpc.AggregatorServiceStub(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
        self.loop.close()


@contextmanager
def aggregator(store: str = "sqlite://:memory:", **options: Any) -> Iterator[InProcessAggregator]:
    """An aggregator on loopback (a free port) with a short unix socket path; `options`
    are AggregatorConfig fields."""
    with tempfile.TemporaryDirectory(prefix="fabric-agg-") as directory:
        fields: dict[str, Any] = {
            "store": store,
            "grpc_socket": Path(directory) / "a.sock",
            "grpc_listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "replica_name": "test",
        }
        fields.update(options)
        running = InProcessAggregator(AggregatorConfig(**fields))
        try:
            yield running
        finally:
            running.close()
