"""`fabricctl health [--service NAME]`: grpc.health.v1 Check against the agent, for
container health checks and scripts. Exit 0 SERVING, 1 anything else, 3 unreachable
(agent/common/exits.py).

An agent that does not serve grpc.health.v1 (UNIMPLEMENTED) counts as serving once it
answers GetSnapshot: a sampled snapshot is what the read-only API promises.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from agent.common.exits import ExitCode
from agent.proto.fabric.v1 import telemetry_service_pb2, telemetry_service_pb2_grpc


def check(channel: grpc.Channel, *, service: str, timeout_s: float) -> int:
    """Print the serving status; raises grpc.RpcError when the agent cannot answer."""
    # The generated HealthStub is untyped in types-grpcio; the method is one line.
    check_rpc = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    label = service or "agent"
    try:
        response = check_rpc(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return _by_snapshot(channel, label, timeout_s)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{label}: {status}")
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return ExitCode.OK if serving else ExitCode.NOT_SERVING


def _by_snapshot(channel: grpc.Channel, label: str, timeout_s: float) -> int:
    stub = telemetry_service_pb2_grpc.TelemetryServiceStub(channel)
    request = telemetry_service_pb2.GetSnapshotRequest(
        sections=[telemetry_service_pb2.SECTION_HOST]
    )
    try:
        stub.GetSnapshot(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        # UNAVAILABLE from a live server means "no sample yet"; a dead one raises the same
        # code, so tell them apart by whether the health call above got an answer: it did.
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"{label}: NOT_SERVING (no snapshot yet)")
            return ExitCode.NOT_SERVING
        raise
    print(f"{label}: SERVING (no grpc.health.v1; answered GetSnapshot)")
    return ExitCode.OK
