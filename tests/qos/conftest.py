"""Fixtures for the kernel QoS tests live in tests/conftest.py ("shaping")."""
