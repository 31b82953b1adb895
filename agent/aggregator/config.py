"""`fabric-aggregator run` configuration: one validated, frozen object with every default.

Sources as for the agent: the defaults below, a YAML file (`--config`), flags. The
listener options have the agent's names and rules (agent/node/config.py): the unix socket
serves everything; TCP without mTLS serves reads and agent streams; mutations over TCP
need mTLS and an allowed identity, and with mTLS an agent may only register under a
node name its certificate carries.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.aggregator.registry import Liveness
from agent.aggregator.store import parse_store_url
from agent.common.addresses import HostPort, parse_listen_address
from agent.common.config import (
    Duration,
    Identities,
    check_allowed_identities,
    check_client_ca,
    check_grpc_listen,
    check_log_level,
    check_tls_cert,
    check_tls_key,
    grpc_listen_address,
)
from agent.common.errors import ConfigError

DEFAULT_STORE = "sqlite:///var/lib/fabric-aggregator/state.db"


class AggregatorConfig(BaseModel):
    """Every option of `fabric-aggregator run`, validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # This replica's name in logs (several replicas may share one etcd).
    replica_name: str = Field(default_factory=socket.gethostname, min_length=1)
    # Desired state: sqlite:///path (one replica) or etcd://host:port[,...] (several).
    store: str = DEFAULT_STORE
    # Local orchestrator hooks and fabricctl on the aggregator's host: everything.
    grpc_socket: Path = Path("/run/fabric-aggregator/aggregator.sock")
    grpc_socket_group: str | None = None
    # Agents and remote clients; 9480 is the aggregator's port ('none': no TCP).
    grpc_listen: str = "0.0.0.0:9480"
    grpc_tls_cert: Path | None = Field(default=None, validate_default=True)
    grpc_tls_key: Path | None = Field(default=None, validate_default=True)
    grpc_client_ca: Path | None = Field(default=None, validate_default=True)
    grpc_allowed_identities: Identities = Field(default=(), validate_default=True)
    # The aggregator's own metrics (nodes by status, summaries, fan-out, store errors).
    metrics_listen: str = "0.0.0.0:9481"
    # Liveness: the summary interval agents are expected to keep, how many summaries a
    # node may miss before it is stale, and how long before a silent node is gone.
    summary_interval: Duration = 1.0
    stale_after_missed: int = Field(default=3, ge=1, le=1000)
    gone_after: Duration = 60.0
    log_level: str = "info"

    _check_grpc_listen = field_validator("grpc_listen")(check_grpc_listen)
    _check_tls_cert = field_validator("grpc_tls_cert")(check_tls_cert)
    _check_tls_key = field_validator("grpc_tls_key")(check_tls_key)
    _check_client_ca = field_validator("grpc_client_ca")(check_client_ca)
    _check_allowed_identities = field_validator("grpc_allowed_identities")(check_allowed_identities)
    _check_level = field_validator("log_level")(check_log_level)

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        try:
            parse_store_url(value)
        except ConfigError as exc:
            raise ValueError(exc.reason) from None
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator("summary_interval")
    @classmethod
    def _check_summary_interval(cls, value: float) -> float:
        if not 0.1 <= value <= 300.0:
            raise ValueError(f"must be between 100ms and 5m, got {value:g}s")
        return value

    @model_validator(mode="after")
    def _check_liveness(self) -> AggregatorConfig:
        stale_after_s = self.summary_interval * self.stale_after_missed
        if self.gone_after <= stale_after_s:
            raise ValueError(
                f"gone_after {self.gone_after:g}s must be longer than stale after "
                f"{stale_after_s:g}s (summary_interval x stale_after_missed)"
            )
        return self

    @property
    def liveness(self) -> Liveness:
        return Liveness(self.summary_interval, self.stale_after_missed, self.gone_after)

    @property
    def metrics_address(self) -> HostPort:
        return parse_listen_address(self.metrics_listen)

    @property
    def grpc_address(self) -> HostPort | None:
        return grpc_listen_address(self.grpc_listen)
