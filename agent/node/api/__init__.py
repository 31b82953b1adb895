"""gRPC servicers over the agent's snapshots: plain conversion in ``convert``, the
``fabric.v1.TelemetryService`` servicer and its snapshot hub in ``telemetry``."""
