"""The aggregator's own /metrics: its health and load, never a copy of the nodes' series
(those are scraped from the agents themselves)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb

# Summary delay: from the agent's sampling time to the summary in the fleet view. The
# agent's own tick and the network come first, so the low buckets are milliseconds.
_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Fan-out: from ApplyPolicy's store write to the last connected node's report.
_FANOUT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

STATUS_LABELS = {
    pb.NODE_STATUS_CONNECTED: "connected",
    pb.NODE_STATUS_STALE: "stale",
    pb.NODE_STATUS_UNREACHABLE: "unreachable",
}


def event_label(kind: pb.EventKind.ValueType) -> str:
    return pb.EventKind.Name(kind).removeprefix("EVENT_KIND_").lower()


class FleetMetrics:
    """Every metric of one aggregator process, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.nodes = Gauge(
            "fabric_aggregator_nodes",
            "Nodes this replica has seen, by liveness status",
            ["status"],
            registry=r,
        )
        self.streams = Gauge(
            "fabric_aggregator_agent_streams", "Agent streams open on this replica", registry=r
        )
        self.summaries = Counter(
            "fabric_aggregator_summaries",
            "Node summaries received (rate: summaries per second)",
            registry=r,
        )
        self.summary_delay = Histogram(
            "fabric_aggregator_summary_delay_seconds",
            "From a summary's sampling time on the agent to its place in the fleet view",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.registrations = Counter(
            "fabric_aggregator_registrations",
            "Agent registrations (connects and reconnects)",
            registry=r,
        )
        self.refused = Counter(
            "fabric_aggregator_agents_refused",
            "Agent streams refused, by reason",
            ["reason"],
            registry=r,
        )
        self.insecure_agent_streams = Gauge(
            "fabric_aggregator_insecure_agent_streams",
            "1 when agent streams are accepted on TCP without mTLS "
            "(insecure_plaintext_agents): any peer may register as any node",
            registry=r,
        )
        self.summaries_dropped = Counter(
            "fabric_aggregator_summaries_dropped",
            "Node summaries dropped: over a bound (too_large) or with a value that is not "
            "finite or out of range (invalid); docs/api.md lists the bounds",
            ["reason"],
            registry=r,
        )
        self.events = Counter(
            "fabric_aggregator_events", "Fleet events raised, by kind", ["kind"], registry=r
        )
        self.fanout = Histogram(
            "fabric_aggregator_fanout_seconds",
            "From a fleet policy's store write to the last connected matching node's report",
            buckets=_FANOUT_BUCKETS,
            registry=r,
        )
        self.policy_reports = Counter(
            "fabric_aggregator_policy_reports",
            "Policy reports from agents, by outcome",
            ["outcome"],
            registry=r,
        )
        self.store_errors = Counter(
            "fabric_aggregator_store_errors",
            "Failed operations on the desired-state store, by operation",
            ["operation"],
            registry=r,
        )
        self.kept_policies = Gauge(
            "fabric_aggregator_kept_policies",
            "Fleet policies connected nodes keep from another store (fabricctl fleet "
            "release-kept lets them go)",
            registry=r,
        )
        self.assignments = Gauge(
            "fabric_aggregator_assignments", "Fleet policy assignments in the store", registry=r
        )
        self.event_watchers = Gauge(
            "fabric_aggregator_event_watchers", "Open WatchEvents streams", registry=r
        )
        for label in STATUS_LABELS.values():
            self.nodes.labels(label)
        for label in ("too_large", "invalid"):
            self.summaries_dropped.labels(label)
        for label in ("applied", "failed", "removed", "kept", "invalid"):
            self.policy_reports.labels(label)
