"""The QoS policy model every program shares: documents (`QosPolicy`, `QosAssignment`),
their validation, rate and port units, and the mapping to and from the API messages.

Kept free of imports so `python -m agent.common.policy.model` runs without a double import.
"""
