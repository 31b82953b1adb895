"""Traffic-control QoS: the policy model (`agent.qos.policy`) and rate units.

Kept free of imports so `python -m agent.qos.policy` runs without a double import.
"""
