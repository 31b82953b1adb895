"""`fabric.aggregator.v1.AggregatorService` on grpc.aio: thin over `Fleet`.

One servicer per listener, each with its access rules: the unix socket may do
everything; TCP without mTLS may read and hold agent streams; TCP with mTLS binds each
agent stream to a node name in the client certificate and keeps mutations for the
allowed identities.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from agent.aggregator.events import MAX_EVENT_WATCHERS, WatcherLimitError
from agent.aggregator.fleet import (
    MAX_OUTBOX_BYTES,
    MAX_WAIT_S,
    SNAPSHOT_TIMEOUT_S,
    AgentSession,
    Fleet,
    FleetFull,
    NodeAlreadyConnected,
    UnknownNode,
    UnknownPolicy,
)
from agent.aggregator.limits import (
    MAX_PAGE_BYTES,
    LimitError,
    RateLimiter,
    UnregisteredStreams,
    check_labels_size,
    check_register,
    peer_address,
)
from agent.aggregator.registry import QueryError
from agent.aggregator.store import Assignment, DocumentTooLarge, StoreError
from agent.aggregator.store.base import check_node_name
from agent.common.labels import check_labels
from agent.common.policy import documents as objects
from agent.common.policy.documents import model_from_request
from agent.common.policy.model import PolicyError
from agent.common.security import Authorizer, IdentityError, client_identities
from agent.common.status import invalid_status, rich_status
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name
# An agent that opens a stream must register within this long.
REGISTER_TIMEOUT_S = 10.0
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
DEFAULT_TOP_LIMIT, MAX_TOP_LIMIT = 10, 1000


@dataclass(frozen=True)
class Access:
    """What a listener's callers may do."""

    # Who may call ApplyPolicy and DeletePolicy.
    mutations: Authorizer
    # mTLS: an agent may only register under a name its certificate carries.
    bind_node_names: bool
    # TCP: agent streams without mTLS are refused (unless the operator allowed them).
    agents_need_mtls: bool = False
    # WatchEvents streams this listener may hold, and its name for refusals.
    max_watchers: int = MAX_EVENT_WATCHERS
    listener: str = "the TCP listener"


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(
        self, fleet: Fleet, access: Access, registrations: RateLimiter | None = None
    ) -> None:
        self._fleet = fleet
        self._access = access
        self._registrations = registrations
        self._unregistered = UnregisteredStreams()
        self._watchers = 0

    # --- agents ---

    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.AggregatorMessage],
    ) -> None:
        peer = peer_address(context.peer())
        refused = self._unregistered.admit(peer)
        if refused is not None:
            self._fleet.metrics.refused.labels("unregistered").inc()
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(refused)
            return
        try:
            first = await asyncio.wait_for(anext(request_iterator), REGISTER_TIMEOUT_S)
        except (StopAsyncIteration, TimeoutError):
            return
        finally:
            self._unregistered.release(peer)
        admitted = await self._admit(first, context)
        del first
        if isinstance(admitted, grpc.Status):
            # Ended with a status, not context.abort(): the abort's exception ties the
            # registration (up to the message limit, natively allocated) into a reference
            # cycle only the garbage collector frees, so a flood of refused
            # registrations grew the aggregator's memory by ~50 KiB each.
            context.set_code(admitted.code)
            context.set_details(admitted.details)
            if admitted.trailing_metadata:
                context.set_trailing_metadata(admitted.trailing_metadata)
            return
        session = admitted
        writer = asyncio.create_task(_write(session, context))
        reader = asyncio.create_task(self._read(session, request_iterator))
        replaced = asyncio.create_task(session.replaced.wait())
        overflowed = asyncio.create_task(session.overflowed.wait())
        tasks: set[asyncio.Task[object]] = {writer, reader, replaced, overflowed}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self._fleet.detach(session)
        if replaced in done:
            await context.abort(grpc.StatusCode.ABORTED, "replaced by a newer stream of this node")
        if overflowed in done:
            self._fleet.metrics.refused.labels("unread").inc()
            log.warning(
                "node %s did not read its stream: over %d MiB queued for it; stream ended, "
                "it resyncs when it registers again",
                session.node,
                MAX_OUTBOX_BYTES // (1024 * 1024),
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"over {MAX_OUTBOX_BYTES // (1024 * 1024)} MiB queued for this stream and not "
                "read: register again to resync",
            )
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if isinstance(failure, ValueError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure))
            if failure is not None:
                raise failure
        # The agent closed its side: the stream ends with OK.

    async def _admit(
        self,
        first: pb.AgentMessage,
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.AggregatorMessage],
    ) -> AgentSession | grpc.Status:
        """The session of a stream whose first message may register; else the status
        that refuses it (counted by reason)."""
        metrics = self._fleet.metrics
        if first.WhichOneof("kind") != "register":
            return _status(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be register")
        register = first.register
        if self._registrations is not None:
            refused = self._registrations.refusal(peer_address(context.peer()))
            if refused is not None:
                metrics.refused.labels("rate").inc()
                return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            check_node_name(register.node_name)
            check_labels("register", register.labels)
        except ValueError as exc:
            metrics.refused.labels("invalid").inc()
            return _status(grpc.StatusCode.INVALID_ARGUMENT, f"register: {exc}")
        try:
            check_register(register)
        except LimitError as exc:
            metrics.refused.labels("too_large").inc()
            return _field_status(exc.field, exc.reason)
        if self._access.agents_need_mtls and not self._access.bind_node_names:
            metrics.refused.labels("no_mtls").inc()
            return _status(
                grpc.StatusCode.UNAUTHENTICATED,
                "agent streams over TCP need mTLS (grpc_tls_cert, grpc_tls_key, "
                "grpc_client_ca): without client certificates anyone could register as "
                "any node; the aggregator's insecure_plaintext_agents option allows it",
            )
        if self._access.bind_node_names:
            try:
                names = client_identities(context)
            except IdentityError as exc:
                metrics.refused.labels("identity").inc()
                log.warning("refused agent stream for node %r: %s", register.node_name, exc)
                return _status(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            if register.node_name not in names:
                metrics.refused.labels("identity").inc()
                log.warning(
                    "refused agent stream: node name %r is not in its certificate (%s)",
                    register.node_name,
                    ", ".join(names) or "no identity",
                )
                return _status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"node name {register.node_name!r} is not in this client's certificate "
                    f"({', '.join(names) or 'no identity'}): an agent reports only for itself",
                )
        try:
            return await self._fleet.attach(register)
        except NodeAlreadyConnected as exc:
            return _status(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except FleetFull as exc:
            metrics.refused.labels("fleet_full").inc()
            return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def _read(
        self, session: AgentSession, request_iterator: AsyncIterator[pb.AgentMessage]
    ) -> None:
        async for message in request_iterator:
            await self._fleet.receive(session, message)

    # --- orchestrators: reads ---

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListNodesResponse:
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = await _page_after(request.page_token, context)
        page, more = await self._call(
            context, self._fleet.page(request.selector, request.statuses, after, size)
        )
        response = pb.ListNodesResponse()
        page_bytes = 0
        for index, view in enumerate(page):
            node = view.to_proto()
            # Each node costs its size plus a few bytes of framing.
            page_bytes += node.ByteSize() + 8
            if index > 0 and page_bytes > MAX_PAGE_BYTES:
                # The page ends early: the client asks for the rest with the token.
                more = True
                break
            response.nodes.append(node)
        if more:
            response.next_page_token = _page_token(response.nodes[-1].name)
        return response

    async def GetNode(
        self, request: pb.GetNodeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetNodeResponse:
        try:
            view = await self._call(context, self._fleet.node(request.name))
        except UnknownNode as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        response = pb.GetNodeResponse(node=view.to_proto())
        if request.full_snapshot:
            remaining = context.time_remaining()
            timeout_s = SNAPSHOT_TIMEOUT_S if remaining is None else max(0.1, remaining - 0.1)
            reply = await self._fleet.snapshot(request.name, min(timeout_s, SNAPSHOT_TIMEOUT_S))
            response.snapshot = reply.snapshot
            response.snapshot_error = reply.error
        return response

    async def QueryTop(
        self, request: pb.QueryTopRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.QueryTopResponse:
        entity = request.entity or pb.TOP_ENTITY_NODE
        limit = min(request.limit or DEFAULT_TOP_LIMIT, MAX_TOP_LIMIT)
        window_s = _seconds(request.window) if request.HasField("window") else None
        try:
            top = self._fleet.registry.top(
                entity, request.metric, limit, window_s=window_s, selector=request.selector
            )
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        entries = [pb.TopEntry(node=node, entity=key, value=value) for node, key, value in top]
        return pb.QueryTopResponse(entries=entries)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        access = self._access
        try:
            if self._watchers >= access.max_watchers:
                raise WatcherLimitError(access.max_watchers, f" on {access.listener}")
            subscription = self._fleet.events.subscribe(request.kinds, request.selector)
        except WatcherLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self._watchers += 1
        self._fleet.metrics.event_watchers.set(len(self._fleet.events))
        try:
            while (item := await subscription.next()) is not None:
                event, missed = item
                yield pb.WatchEventsResponse(event=event, missed=missed)
        finally:
            self._watchers -= 1
            subscription.close()
            self._fleet.metrics.event_watchers.set(len(self._fleet.events))

    # --- orchestrators: mutations ---

    async def ApplyPolicy(
        self, request: pb.ApplyPolicyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ApplyPolicyResponse:
        await self._authorize(context)
        try:
            model = model_from_request(request.object)
        except PolicyError as exc:
            await context.abort_with_status(invalid_status(exc))
        _, document = objects.document_from_object(request.object)
        try:
            check_labels("selector", request.selector)
            check_labels_size("selector", request.selector)
            assignment = Assignment(model.metadata.name, document, dict(request.selector))
        except ValueError as exc:
            await _abort_field(context, "selector", str(exc))
        wait_s = await _wait_seconds(request, context)
        try:
            revision, nodes = await self._call(
                context,
                self._fleet.apply(assignment, validate_only=request.validate_only, wait_s=wait_s),
            )
        except DocumentTooLarge as exc:
            await _abort_field(context, "object", str(exc))
        log.info(
            "fleet policy %s revision %d for selector %s: %d node(s)",
            assignment.name,
            revision,
            _selector_text(assignment.selector),
            len(nodes),
        )
        return pb.ApplyPolicyResponse(revision=revision, nodes=nodes)

    async def DeletePolicy(
        self, request: pb.DeletePolicyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.DeletePolicyResponse:
        await self._authorize(context)
        wait_s = await _wait_seconds(request, context)
        try:
            nodes = await self._call(context, self._fleet.delete(request.name, wait_s=wait_s))
        except UnknownPolicy as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("fleet policy %s deleted: %d node(s) held it", request.name, len(nodes))
        return pb.DeletePolicyResponse(nodes=nodes)

    async def ReleaseKeptPolicies(
        self,
        request: pb.ReleaseKeptPoliciesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.ReleaseKeptPoliciesResponse:
        await self._authorize(context)
        nodes = await self._call(context, self._fleet.release_kept())
        log.warning(
            "kept fleet policies released: agents drop the policies they kept from another "
            "store (%d node(s) keeping some here)",
            len(nodes),
        )
        return pb.ReleaseKeptPoliciesResponse(nodes=nodes)

    # --- helpers ---

    async def _authorize(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        refused = self._access.mutations.refusal(context)
        if refused is not None:
            await context.abort(*refused)

    async def _call(
        self, context: grpc.aio.ServicerContext[object, object], call: Awaitable[T]
    ) -> T:
        """A fleet call; a failed store is UNAVAILABLE (the client may retry)."""
        try:
            return await call
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"desired-state store: {exc}")


async def _write(
    session: AgentSession,
    context: grpc.aio.ServicerContext[pb.AgentMessage, pb.AggregatorMessage],
) -> None:
    while True:
        await context.write(await session.next_message())


def _status(code: grpc.StatusCode, details: str) -> grpc.Status:
    return _Status(code, details, ())


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _field_status(field: str, reason: str) -> grpc.Status:
    """INVALID_ARGUMENT naming `field`, with a google.rpc.BadRequest detail."""
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)
        ]
    )
    return rich_status(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}", detail)


async def _abort_field(
    context: grpc.aio.ServicerContext[Any, Any], field: str, reason: str
) -> NoReturn:
    await context.abort_with_status(_field_status(field, reason))


async def _wait_seconds(
    request: pb.ApplyPolicyRequest | pb.DeletePolicyRequest,
    context: grpc.aio.ServicerContext[object, object],
) -> float:
    """A mutation's `wait` (0 when unset); INVALID_ARGUMENT past MAX_WAIT_S."""
    wait_s = _seconds(request.wait) if request.HasField("wait") else 0.0
    if not 0 <= wait_s <= MAX_WAIT_S:
        await _abort_field(context, "wait", f"must be between 0 and {MAX_WAIT_S:g}s")
    return wait_s


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


# Page tokens are opaque to clients: the last name of the previous page, encoded.
def _page_token(last_name: str) -> str:
    return base64.urlsafe_b64encode(last_name.encode()).decode()


async def _page_after(token: str, context: grpc.aio.ServicerContext[object, object]) -> str:
    if not token:
        return ""
    try:
        name = base64.urlsafe_b64decode(token.encode()).decode()
        check_node_name(name)
    except (ValueError, UnicodeDecodeError):
        await _abort_field(context, "page_token", "not a token from a previous response")
    return name


def _selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(every node)"
