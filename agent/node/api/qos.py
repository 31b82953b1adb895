"""``fabric.v1.QosService``: API policies beside the policy files, with leases.

Thin over the reconciler's API (`Reconciler.apply_object` and friends): this module
turns messages into policy documents and back (agent.common.policy.documents), validates them with
the same model as the files, and maps the reconciler's errors to status codes with
their details: INVALID_ARGUMENT carries google.rpc.BadRequest field violations with the
file validation's field paths, FAILED_PRECONDITION a google.rpc.PreconditionFailure.
Mutations, and PlanPolicy (planning costs the agent memory and time), ask the listener's
`Authorizer` first; a refusal names the listener.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import NoReturn, Protocol

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2

from agent.common.errors import FabricError
from agent.common.policy import documents as objects
from agent.common.policy.documents import REQUEST_SOURCE, model_from_request
from agent.common.policy.model import (
    PolicyError,
    PolicyObject,
    QosPolicy,
    parse_document,
)
from agent.common.security import Authorizer
from agent.common.status import (
    MAX_MESSAGE_CHARS,
    MAX_PRECONDITIONS,
    clip,
    invalid_status,
    rich_status,
)
from agent.node.api import convert
from agent.node.api.telemetry import SnapshotSource
from agent.node.collectors.qos import QOS_CLASSES, QosClassSample
from agent.node.qos.api_objects import (
    ENFORCED,
    FAILED,
    PENDING,
    ApiOutcome,
    LeaseError,
    NotFoundError,
    PolicyView,
    RefusedError,
)
from agent.node.qos.kernel import KernelStateConflict
from agent.node.qos.state import StateSaveError
from agent.proto.fabric.v1 import qos_service_pb2, qos_service_pb2_grpc

log = logging.getLogger(__name__)

# A mutation needs this much of its deadline left to start: once begun it runs to the
# end (the kernel is never left half way), so it must not start just to be cut off.
MIN_MUTATION_TIME_S = 0.2
# PlanPolicy calls planning at once (over both listeners): a plan holds a parsed document
# and the planner's copy of the trees. More wait PLAN_WAIT_S, then RESOURCE_EXHAUSTED.
MAX_CONCURRENT_PLANS = 2
PLAN_WAIT_S = 1.0

_STATES = {
    ENFORCED: qos_service_pb2.POLICY_STATE_ENFORCED,
    PENDING: qos_service_pb2.POLICY_STATE_PENDING,
    FAILED: qos_service_pb2.POLICY_STATE_FAILED,
}
_SOURCES = {
    "file": qos_service_pb2.POLICY_SOURCE_FILE,
    "api": qos_service_pb2.POLICY_SOURCE_API,
    "fleet": qos_service_pb2.POLICY_SOURCE_FLEET,
    "slurm": qos_service_pb2.POLICY_SOURCE_SLURM,
}


class QosBackend(Protocol):
    """What the servicer needs of the reconciler."""

    def apply_object(
        self, obj: PolicyObject, *, ttl_s: float | None = None, validate_only: bool = False
    ) -> ApiOutcome: ...

    def delete_object(self, name: str, *, validate_only: bool = False) -> ApiOutcome: ...

    def renew_lease(self, name: str, ttl_s: float | None = None) -> PolicyView: ...

    def plan_object(self, obj: PolicyObject) -> list[str]: ...

    def policies(self) -> list[PolicyView]: ...


# --- plain functions ---------------------------------------------------------------------


def ttl_seconds(ttl: duration_pb2.Duration, present: bool) -> float | None:
    if not present:
        return None
    return ttl.seconds + ttl.nanos / 1e9


def view_to_proto(view: PolicyView) -> qos_service_pb2.PolicyInfo:
    info = qos_service_pb2.PolicyInfo(
        name=view.name,
        source=_SOURCES.get(view.source, qos_service_pb2.POLICY_SOURCE_UNSPECIFIED),
        file=view.file,
        state=_STATES.get(view.state, qos_service_pb2.POLICY_STATE_UNSPECIFIED),
        message=view.message,
        device=view.device,
    )
    try:
        # A policy file that could not be parsed has no document to carry.
        if view.document:
            info.object.CopyFrom(objects.encode_document(view.document))
    except objects.ObjectError as exc:
        # A document the model accepted always fits the message; say so if not.
        log.error("policy %s does not fit fabric.v1.PolicyObject: %s", view.name, exc)
    if view.expires_at is not None:
        info.lease_expire_time.CopyFrom(_timestamp(view.expires_at))
    if view.lease_ttl_s is not None:
        info.lease_ttl.CopyFrom(_duration(view.lease_ttl_s))
    return info


def class_statuses(
    view: PolicyView, policies: Sequence[PolicyView], samples: Sequence[QosClassSample]
) -> list[qos_service_pb2.ClassStatus]:
    """The classes of a policy (of an assignment: the class it joins) with their
    counters from the latest sample."""
    target, only = view, None
    if view.kind == "QosAssignment":
        spec = view.document.get("spec", {})
        only = str(spec.get("className", ""))
        target = next((p for p in policies if p.name == spec.get("policy")), view)
        if target is view:
            return []
    model = parse_document(target.document, REQUEST_SOURCE)
    if not isinstance(model, QosPolicy):
        return []
    counters = {s.class_name: s for s in samples if s.policy == target.name}
    result = []
    for cls in model.effective_classes():
        if only is not None and cls.name != only:
            continue
        status = qos_service_pb2.ClassStatus(
            name=cls.name,
            device=target.device,
            priority=cls.priority,
            rate_bps=cls.rate_bps,
            ceil_bps=cls.ceil_bps,
        )
        sample = counters.get(cls.name)
        if sample is not None:
            status.device = sample.device
            status.minor = sample.minor
            status.sent_bytes = sample.sent_bytes
            status.sent_packets = sample.sent_packets
            status.dropped_packets = sample.dropped_packets
            status.overlimits = sample.overlimits
            status.backlog_bytes = sample.backlog_bytes
            if sample.rate_bps is not None:
                status.throughput_bps = sample.rate_bps
        result.append(status)
    return result


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


# --- errors as statuses ------------------------------------------------------------------


def refused_status(exc: RefusedError) -> grpc.Status:
    """FAILED_PRECONDITION with a PreconditionFailure per problem."""
    detail = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=p.kind, subject=clip(p.subject), description=clip(p.description)
            )
            for p in exc.problems[:MAX_PRECONDITIONS]
        ]
    )
    message = clip(str(exc), MAX_MESSAGE_CHARS)
    return rich_status(grpc.StatusCode.FAILED_PRECONDITION, message, detail)


def _abort_with(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _abort_for(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, PolicyError):
        _abort_with(context, invalid_status(exc))
    if isinstance(exc, RefusedError):
        _abort_with(context, refused_status(exc))
    if isinstance(exc, LeaseError):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="lease_ttl", description=str(exc))
            ]
        )
        _abort_with(context, rich_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), detail))
    if isinstance(exc, NotFoundError):
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, KernelStateConflict):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, StateSaveError):
        # The reconciler undid the change: retrying once the directory is writable works.
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; the change was undone")
    log.error("QoS API: %s", exc)
    context.abort(grpc.StatusCode.INTERNAL, str(exc))


def _check_time(context: grpc.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining < MIN_MUTATION_TIME_S:
        context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{remaining * 1000:.0f} ms of the deadline left; a QoS change needs "
            f"{MIN_MUTATION_TIME_S * 1000:.0f} ms to start",
        )


# --- the servicer ------------------------------------------------------------------------


class QosServicer(qos_service_pb2_grpc.QosServiceServicer):
    def __init__(
        self,
        backend: QosBackend,
        source: SnapshotSource,
        authorizer: Authorizer,
        plans: threading.Semaphore | None = None,
        listener: str = "this listener",
    ) -> None:
        self._backend = backend
        self._source = source
        self._authorizer = authorizer
        self._plans = (
            plans if plans is not None else threading.BoundedSemaphore(MAX_CONCURRENT_PLANS)
        )
        self._listener = listener

    def _authorize(self, method: str, context: grpc.ServicerContext) -> None:
        """Abort `method` when the listener's authorizer refuses the caller."""
        refused = self._authorizer.refusal(context)
        if refused is not None:
            code, message = refused
            context.abort(code, f"{method} is refused on {self._listener}: {message}")

    def ApplyPolicy(
        self, request: qos_service_pb2.ApplyPolicyRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.ApplyPolicyResponse:
        self._authorize("ApplyPolicy", context)
        try:
            model = model_from_request(request.object)
            ttl = ttl_seconds(request.lease_ttl, request.HasField("lease_ttl"))
            if not request.validate_only:
                _check_time(context)
            outcome = self._backend.apply_object(
                model, ttl_s=ttl, validate_only=request.validate_only
            )
        except (FabricError, ValueError) as exc:
            _abort_for(context, exc)
        response = qos_service_pb2.ApplyPolicyResponse(changes=list(outcome.changes))
        if outcome.view is not None:
            response.policy.CopyFrom(view_to_proto(outcome.view))
        return response

    def RenewLease(
        self, request: qos_service_pb2.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.RenewLeaseResponse:
        self._authorize("RenewLease", context)
        try:
            ttl = ttl_seconds(request.lease_ttl, request.HasField("lease_ttl"))
            view = self._backend.renew_lease(request.name, ttl)
        except (FabricError, ValueError) as exc:
            _abort_for(context, exc)
        return qos_service_pb2.RenewLeaseResponse(policy=view_to_proto(view))

    def DeletePolicy(
        self, request: qos_service_pb2.DeletePolicyRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.DeletePolicyResponse:
        self._authorize("DeletePolicy", context)
        try:
            if not request.validate_only:
                _check_time(context)
            outcome = self._backend.delete_object(request.name, validate_only=request.validate_only)
        except (FabricError, ValueError) as exc:
            _abort_for(context, exc)
        return qos_service_pb2.DeletePolicyResponse(changes=list(outcome.changes))

    def ListPolicies(
        self, request: qos_service_pb2.ListPoliciesRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.ListPoliciesResponse:
        infos = [view_to_proto(view) for view in self._backend.policies()]
        try:
            page, token = convert.page(infos, request.page_size, request.page_token)
        except convert.PageTokenError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return qos_service_pb2.ListPoliciesResponse(policies=page, next_page_token=token)

    def GetPolicyStatus(
        self, request: qos_service_pb2.GetPolicyStatusRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.GetPolicyStatusResponse:
        try:
            policies = self._backend.policies()
            view = next((p for p in policies if p.name == request.name), None)
            if view is None:
                raise NotFoundError(f"no QoS policy named {request.name!r}")
            snapshot = self._source.latest()
            samples = snapshot.samples(QOS_CLASSES) if snapshot else ()
            classes = class_statuses(view, policies, samples)
        except (FabricError, ValueError) as exc:
            _abort_for(context, exc)
        return qos_service_pb2.GetPolicyStatusResponse(policy=view_to_proto(view), classes=classes)

    def PlanPolicy(
        self, request: qos_service_pb2.PlanPolicyRequest, context: grpc.ServicerContext
    ) -> qos_service_pb2.PlanPolicyResponse:
        self._authorize("PlanPolicy", context)
        if not self._plans.acquire(timeout=PLAN_WAIT_S):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_CONCURRENT_PLANS} plans are running, the most the agent runs at once; "
                "retry later",
            )
        try:
            model = model_from_request(request.object)
            changes = self._backend.plan_object(model)
        except (FabricError, ValueError) as exc:
            _abort_for(context, exc)
        finally:
            self._plans.release()
        return qos_service_pb2.PlanPolicyResponse(changes=changes)


def add_to_server(
    server: grpc.Server,
    backend: QosBackend,
    source: SnapshotSource,
    authorizer: Authorizer,
    plans: threading.Semaphore | None = None,
    listener: str = "this listener",
) -> None:
    """Register fabric.v1.QosService over backend (the agent's Reconciler) on server;
    mutations and plans are allowed as `authorizer` decides, plans `plans` at a time
    (a semaphore the listeners share), and refusals name `listener`."""
    qos_service_pb2_grpc.add_QosServiceServicer_to_server(
        QosServicer(backend, source, authorizer, plans, listener), server
    )
