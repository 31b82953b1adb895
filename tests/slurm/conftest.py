"""The session's Slurm cluster (tests/slurm/cluster.py), started on first use only.

`slurm_cluster` is the shared cluster itself; tests take `slurm`, which hands over an idle
node with no job and no hook, and puts it back that way afterwards (cancelling the test's
jobs, resuming a node its prolog drained). Tests that need real Slurm live in this folder.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ctl.conftest import sim_agent
from tests.slurm.cluster import SlurmCluster, missing_requirements

# The agent on the simulated GPU node, for jobs whose GPUs it attributes.
__all__ = ["sim_agent", "slurm", "slurm_cluster"]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    slurm_cluster.reset()
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.reset()
