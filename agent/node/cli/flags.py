"""The `fabric-agent` flags that set AgentConfig fields, shared by `run`, `sample` and
the `policy` commands that must see the node as the daemon does."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path
from typing import Any

# Flags that map one-to-one onto AgentConfig fields (dest == field name).
_CONFIG_FLAGS: dict[str, str] = {
    "--interval": "sampling interval, e.g. 500ms, 1s (100ms..60s; default 1s)",
    "--metrics-listen": "HOST:PORT of the Prometheus endpoint (default 0.0.0.0:9478)",
    "--node-name": "name this node reports under (default: host name)",
    "--nvml-library": "path of libnvidia-ml.so.1 when it is not on the loader path",
    "--sysfs-root": "root of sysfs (default /sys)",
    "--interfaces": "comma-separated interface globs, '!' excludes "
    "(default *,!lo,!veth*,!docker*,!cni*,!ifb*)",
    "--state-dir": "directory for persistent state (default /var/lib/fabric-agent)",
    "--collectors": "comma-separated collectors to run (default: all)",
    "--collector-timeout-ratio": "share of the interval a collector may take before the "
    "tick goes on without it (default 0.8)",
    "--log-level": "debug, info, warning or error (default info)",
    "--grpc-socket": "unix socket of the gRPC API (default /run/fabric-agent/agent.sock)",
    "--grpc-socket-group": "group that may use the API socket (default: the agent's)",
    "--grpc-listen": "HOST:PORT of the gRPC API on TCP, or 'none' for no TCP listener "
    "(default 0.0.0.0:9479; read-only unless mTLS and allowed identities are set)",
    "--grpc-tls-cert": "PEM server certificate for TLS on --grpc-listen (with --grpc-tls-key; "
    "re-read on SIGHUP)",
    "--grpc-tls-key": "PEM private key of --grpc-tls-cert (unencrypted)",
    "--grpc-client-ca": "PEM CA bundle of client certificates: the TCP listener then "
    "requires one (mTLS)",
    "--grpc-allowed-identities": "comma-separated client certificate identities (subject CN, "
    "DNS or URI SAN) that may change QoS over TCP; needs --grpc-client-ca (default: none)",
    "--job-dir": "directory of the job files the Slurm hooks write "
    "(default /run/fabric-agent/jobs)",
    "--policy-dir": "directory of QoS policy files (default /etc/fabric-agent/policies)",
    "--reconcile-interval": "how often QoS is compared with the kernel (default 5s)",
    "--on-exit": "keep (default) or remove the agent's qdiscs and tables on exit",
    "--take-over": "true to replace root qdiscs the agent does not own (default false)",
    "--cgroup-root": "cgroup2 mount point (default: detected)",
    "--aggregator": "HOST:PORT of the fleet aggregator to register with (default: none)",
    "--labels": "this node's labels for fleet policy selectors, e.g. pool=training,rack=r7",
    "--aggregator-tls-ca": "PEM CA of the aggregator's certificate (TLS to the aggregator)",
    "--aggregator-tls-cert": "PEM client certificate naming this node (mTLS to the aggregator)",
    "--aggregator-tls-key": "PEM private key of --aggregator-tls-cert",
}


def add_config_flags(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """`--config` and the config flags (`only` those, when given)."""
    parser.add_argument("--config", type=Path, help="YAML file; flags override its values")
    for flag, help_text in _CONFIG_FLAGS.items():
        if only is None or flag in only:
            parser.add_argument(flag, help=help_text, default=None)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the flags on `args` set (None: not given)."""
    values: dict[str, Any] = {}
    for flag in _CONFIG_FLAGS:
        key = flag.removeprefix("--").replace("-", "_")
        value = getattr(args, key, None)
        if value is not None and key == "collectors":
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        values[key] = value
    return values
