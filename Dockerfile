# fabric-agent container image.
#   docker build -t fabric-agent .
#   docker run -d --name fabric-agent --network host --cap-add NET_ADMIN fabric-agent
# With the host's network namespace the container's /sys shows the host's links and
# RDMA devices, so no bind mount is needed.
# GPU access through the NVIDIA container toolkit: add
#   --runtime nvidia --gpus all -e NVIDIA_DRIVER_CAPABILITIES=utility
# (NVML lives in the "utility" capability; no CUDA libraries are needed).

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
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY systemd/agent.yaml /etc/fabric-agent/agent.yaml
VOLUME ["/var/lib/fabric-agent"]
EXPOSE 9478
ENTRYPOINT ["fabric-agent", "run", "--config", "/etc/fabric-agent/agent.yaml"]
