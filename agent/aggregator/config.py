"""`fabric-aggregator run` configuration: one validated, frozen object with every default.

Sources as for the agent: the defaults below, a YAML file (`--config`), flags. The
listener options are the agent's, names and rules (DaemonConfig, agent/common/config.py):
the unix socket serves everything; TCP without mTLS serves reads (and agent streams only
with insecure_plaintext_agents); mutations over TCP need mTLS and an allowed identity,
and with mTLS an agent may only register under a node name its certificate carries.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.aggregator.limits import (
    DEFAULT_MAX_NODES,
    DEFAULT_REGISTRATIONS_PER_PEER_S,
    DEFAULT_REGISTRATIONS_PER_S,
)
from agent.aggregator.registry import Liveness
from agent.aggregator.store import parse_store_url
from agent.common.config import DaemonConfig, Duration, duration_within
from agent.common.errors import ConfigError

DEFAULT_STORE = "sqlite:///var/lib/fabric-aggregator/state.db"


class AggregatorConfig(DaemonConfig):
    """Every option of `fabric-aggregator run`, validated on construction; the listener,
    metrics and log options and their rules are DaemonConfig's."""

    # The aggregator's own metrics (nodes by status, summaries, fan-out, store errors).
    metrics_listen: str = "0.0.0.0:9481"
    # Local orchestrator hooks and fabricctl on the aggregator's host: everything.
    grpc_socket: Path = Path("/run/fabric-aggregator/aggregator.sock")
    # Agents and remote clients; 9480 is the aggregator's port ('none': no TCP).
    grpc_listen: str = "0.0.0.0:9480"
    # This replica's name in logs (several replicas may share one etcd).
    replica_name: str = Field(default_factory=socket.gethostname, min_length=1)
    # Agent streams over TCP without mTLS: refused unless this is set, since anyone who
    # reaches the port could then register as any node, take its stream and its fleet
    # policies, and report for it. Logged as a WARNING at every start, and
    # fabric_aggregator_insecure_agent_streams is 1.
    insecure_plaintext_agents: bool = False
    # Desired state: sqlite:///path (one replica) or etcd://host:port[,...] (several).
    store: str = DEFAULT_STORE
    # Liveness: the summary interval agents are expected to keep, how many summaries a
    # node may miss before it is stale, and how long before a silent node is gone.
    # Bounded like the interval an agent may register (agent/aggregator/limits.py).
    summary_interval: Annotated[Duration, AfterValidator(duration_within("100ms", "5m"))] = 1.0
    stale_after_missed: int = Field(default=3, ge=1, le=1000)
    gone_after: Duration = 60.0
    # A gone node is forgotten this long after its last summary: its record and its
    # labels in the store go, so names that never come back do not fill max_nodes.
    forget_after: Duration = 7 * 24 * 3600.0

    # Nodes kept (connected, stale or gone); a new node name past this is refused.
    max_nodes: int = Field(default=DEFAULT_MAX_NODES, ge=1, le=1_000_000)
    # Agent registrations a second from one peer address, and in all (token buckets;
    # bursts in agent/aggregator/limits.py). Past them: RESOURCE_EXHAUSTED, retried.
    registrations_per_peer_s: float = Field(default=DEFAULT_REGISTRATIONS_PER_PEER_S, gt=0)
    registrations_per_s: float = Field(default=DEFAULT_REGISTRATIONS_PER_S, gt=0)

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        try:
            parse_store_url(value)
        except ConfigError as exc:
            raise ValueError(exc.reason) from None
        return value

    @model_validator(mode="after")
    def _check_liveness(self) -> AggregatorConfig:
        stale_after_s = self.summary_interval * self.stale_after_missed
        if self.gone_after <= stale_after_s:
            raise ValueError(
                f"gone_after {self.gone_after:g}s must be longer than stale after "
                f"{stale_after_s:g}s (summary_interval x stale_after_missed)"
            )
        if self.forget_after <= self.gone_after:
            raise ValueError(
                f"forget_after {self.forget_after:g}s must be longer than gone_after "
                f"{self.gone_after:g}s"
            )
        return self

    @property
    def liveness(self) -> Liveness:
        return Liveness(
            self.summary_interval, self.stale_after_missed, self.gone_after, self.forget_after
        )
