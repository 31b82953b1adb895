"""The central aggregator: the fleet view, policy fan-out and liveness over per-node agents."""
