"""The QoS fixtures (a reconciler on the fake kernel, its directories, its cgroup tree)
for the hostile-input tests."""

from tests.node.qos.conftest import cgroups, dirs, kernel, reconciler

__all__ = ["cgroups", "dirs", "kernel", "reconciler"]
