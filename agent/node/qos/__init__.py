"""Traffic-control QoS on the node: desired kernel state from policies, the planner, the
kernel backends and the reconcile loop. The policy model itself is shared
(`agent.common.policy`)."""
