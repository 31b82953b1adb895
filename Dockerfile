# fabric-agent container image: the agent, and fabricctl (from the same package) for
# health checks and for operators (`docker exec fabric-agent fabricctl telemetry`).
#   docker build -t fabric-agent .
#   docker run -d --name fabric-agent --network host --cgroupns host --cap-add NET_ADMIN \
#     -v /run/fabric-agent:/run/fabric-agent \
#     -v /var/lib/fabric-agent:/var/lib/fabric-agent \
#     -v /etc/fabric-agent/policies:/etc/fabric-agent/policies:ro \
#     --runtime nvidia --gpus all -e NVIDIA_DRIVER_CAPABILITIES=utility fabric-agent
# With the host's network namespace the container's /sys shows the host's links and
# RDMA devices, so no bind mount is needed; with the host's cgroup namespace
# /sys/fs/cgroup is the host's hierarchy, which cgroup matches (Slurm jobs) refer to.
# GPU access through the NVIDIA container toolkit (--runtime nvidia --gpus all):
# NVML lives in the "utility" driver capability; no CUDA libraries are needed.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# iproute2 and libnftables for traffic control; nothing else from Debian is needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 libnftables1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
# The one wheel installs both console scripts: fabric-agent and fabricctl.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && fabric-agent --version && fabricctl --version
COPY systemd/agent.yaml /etc/fabric-agent/agent.yaml
# State (the policies last applied, API policies and their leases); the API socket's
# directory, shared with the host so Slurm hooks and fabricctl on the host reach it.
VOLUME ["/var/lib/fabric-agent", "/run/fabric-agent"]
# 9478 Prometheus metrics, 9479 the gRPC API over TCP (read-only without mTLS).
EXPOSE 9478 9479
# grpc.health.v1 over the unix socket: SERVING once the agent has sampled and
# reconciled. Docker reads any non-zero status as unhealthy but reserves 2, so every
# failure (not serving 1, unreachable 3) is reported as 1.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "fabricctl --timeout 5s health || exit 1"]
ENTRYPOINT ["fabric-agent", "run", "--config", "/etc/fabric-agent/agent.yaml"]
