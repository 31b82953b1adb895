"""Agent configuration: one validated, frozen object with every default in one place.

Sources, later ones winning: the defaults below, a YAML file (`--config`), command-line
flags. YAML keys are the flag names with `_` for `-` (`metrics_listen` is
`--metrics-listen`). Every error names its source (file or `command line`) and key.
"""

from __future__ import annotations

import fnmatch
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from agent.common.addresses import parse_host_port
from agent.common.config import (
    GRPC_LISTEN_OFF,
    DaemonConfig,
    Duration,
    duration_within,
    load_model,
    tls_check,
)
from agent.common.labels import check_label, label_pair
from agent.common.security import read_certificates, read_key_for

# Interfaces that carry no fabric traffic of their own on a GPU node: loopback, container
# and pod veths, bridges created by container engines, and the agent's own IFB devices.
DEFAULT_INTERFACE_PATTERNS: tuple[str, ...] = ("*", "!lo", "!veth*", "!docker*", "!cni*", "!ifb*")


def _patterns(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",")]
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of glob patterns or a comma-separated string")
    patterns = tuple(str(p).strip() for p in value if str(p).strip())
    if not patterns:
        raise ValueError("must name at least one pattern")
    return patterns


def parse_labels(value: object) -> dict[str, str]:
    """'k=v,k2=v2' or a mapping -> {k: v}, each a label (agent/common/labels.py)."""
    if isinstance(value, str):
        return dict(label_pair(part) for part in value.split(",") if part.strip())
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of label: value or 'key=value,...'")
    # YAML reads `gpus: 8` as a number; the label is its text.
    labels = {
        key: str(text) if isinstance(text, int | float) and not isinstance(text, bool) else text
        for key, text in value.items()
    }
    for key, text in labels.items():
        check_label(key, text)
    return labels


Labels = Annotated[dict[str, str], BeforeValidator(parse_labels)]


class AgentConfig(DaemonConfig):
    """Every option of `fabric-agent run`, validated on construction; the listener, metrics
    and log options and their rules are DaemonConfig's."""

    # Prometheus endpoint; 9478 is the agent's metrics port (9479 is its gRPC port).
    metrics_listen: str = "0.0.0.0:9478"
    # The gRPC API (telemetry, QoS) for local orchestrator hooks, and on TCP for remote
    # clients (fabricctl, the aggregator); over TCP without mTLS, reads only.
    grpc_socket: Path = Path("/run/fabric-agent/agent.sock")
    grpc_listen: str = "0.0.0.0:9479"
    # Name this node reports under; the host name unless set.
    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    # Sampling period. 100 ms keeps NVML's driver lock free; 60 s is the staleness
    # operators already get from dcgm-exporter's 30 s default and no worse.
    interval: Annotated[Duration, AfterValidator(duration_within("100ms", "60s"))] = 1.0
    # A collector that has not returned by this fraction of the interval is left out of
    # the tick's snapshot (reported as timed out) so it cannot delay the others.
    collector_timeout_ratio: float = Field(default=0.8, gt=0.0, le=1.0)
    # Where NVML lives when it is not on the loader path (also the test driver).
    nvml_library: Path | None = None
    # Roots of the kernel's pseudo file systems, injectable for fixture trees.
    sysfs_root: Path = Path("/sys")
    # Glob patterns over interface names; '!' excludes. With no include pattern, all
    # interfaces are included before the excludes apply.
    interfaces: Annotated[tuple[str, ...], BeforeValidator(_patterns)] = DEFAULT_INTERFACE_PATTERNS
    # Persistent state: the QoS policies last applied, for restarts without a change.
    state_dir: Path = Path("/var/lib/fabric-agent")
    # QoS policy files (*.yaml); reloaded every reconcile pass and on SIGHUP.
    policy_dir: Path = Path("/etc/fabric-agent/policies")
    # How often the kernel is compared with the policies; drift is corrected within it.
    reconcile_interval: Annotated[Duration, AfterValidator(duration_within("100ms", "5m"))] = 5.0
    # Job files written by the scheduler's hooks (the Slurm prolog): each job's user,
    # GPUs, lease and QoS class; watched, and read at start (agent.node.jobs).
    job_dir: Path = Path("/run/fabric-agent/jobs")
    # On exit keep enforcing (a restart or upgrade never interrupts shaping) or remove
    # every qdisc, filter and table the agent owns.
    on_exit: Literal["keep", "remove"] = "keep"
    # Replace root qdiscs the agent does not own on every policy's interface.
    take_over: bool = False
    # cgroup2 mount the policies' cgroup paths are relative to; detected when unset.
    cgroup_root: Path | None = None
    # Collectors to run; empty means every collector that is enabled by default.
    collectors: tuple[str, ...] = ()
    # The fleet aggregator (HOST:PORT) to register with, send summaries to and take
    # fleet policies from; none by default (the node stands alone).
    aggregator: str | None = None
    # This node's labels, which the aggregator's policy selectors match (pool=training).
    labels: Labels = Field(default_factory=dict)
    # TLS to the aggregator: the CA of its certificate; with a client certificate and
    # key naming this node (CN or DNS SAN = node_name) for mTLS.
    aggregator_tls_ca: Path | None = None
    aggregator_tls_cert: Path | None = None
    aggregator_tls_key: Path | None = Field(default=None, validate_default=True)

    @field_validator("aggregator")
    @classmethod
    def _check_aggregator(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == GRPC_LISTEN_OFF:
            return None
        # The canonical HOST:PORT: what the uplink dials.
        return parse_host_port(value).target

    @field_validator("aggregator_tls_ca", "aggregator_tls_cert")
    @classmethod
    def _check_aggregator_pem(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if info.data.get("aggregator", "failed") is None:
            raise ValueError("set without aggregator")
        tls_check(lambda: read_certificates(value, str(info.field_name)))
        return value

    @field_validator("aggregator_tls_key")
    @classmethod
    def _check_aggregator_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "aggregator_tls_cert" not in info.data or "aggregator_tls_ca" not in info.data:
            return value
        cert = info.data["aggregator_tls_cert"]
        if (cert is None) != (value is None):
            raise ValueError("aggregator_tls_cert and aggregator_tls_key: set both or neither")
        if cert is not None and value is not None:
            if info.data["aggregator_tls_ca"] is None:
                raise ValueError("a client certificate needs aggregator_tls_ca")
            tls_check(lambda: read_key_for(cert, value, "aggregator_tls_key"))
        return value

    @property
    def collector_timeout_s(self) -> float:
        return self.interval * self.collector_timeout_ratio

    def interface_selected(self, name: str) -> bool:
        return interface_selected(self.interfaces, name)


def interface_selected(patterns: Sequence[str], name: str) -> bool:
    includes = [p for p in patterns if not p.startswith("!")] or ["*"]
    excludes = [p[1:] for p in patterns if p.startswith("!")]
    return any(fnmatch.fnmatchcase(name, p) for p in includes) and not any(
        fnmatch.fnmatchcase(name, p) for p in excludes
    )


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> AgentConfig:
    """Build the agent's config from an optional YAML file and flag overrides."""
    return load_model(AgentConfig, path, overrides)
