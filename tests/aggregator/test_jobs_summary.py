"""Jobs in the fleet summary: a real agent uplink, fed snapshots of the simulated 8-GPU
node with a real job directory, reports the jobs and their GPUs to a real aggregator
(in process), where `fabricctl node` shows them; a summary over the job limit is dropped."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.aggregator.limits import MAX_JOBS, LimitError, check_summary
from agent.ctl import main as ctl
from agent.node.api.telemetry import SnapshotHub
from agent.node.uplink.stream import Uplink, UplinkSettings
from agent.proto.fabric.aggregator.v1 import aggregator_service_pb2 as pb
from tests.aggregator.inprocess import InProcessAggregator, aggregator
from tests.conftest import simulated_sampler
from tests.fakenvml import FakeNvml
from tests.node.uplink.test_uplink import FakePolicies


def eventually(check: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:g}s"
        time.sleep(0.05)


def summary_of(running: InProcessAggregator, node: str) -> pb.NodeSummary | None:
    """The node's latest summary; None before it registered and sent one."""
    nodes = running.unix_stub().ListNodes(pb.ListNodesRequest(), timeout=5).nodes
    found = [n for n in nodes if n.name == node and n.HasField("summary")]
    return found[0].summary if found else None


def test_the_fleet_summary_carries_each_job_and_its_gpus(
    fakenvml: FakeNvml, tmp_path: Path
) -> None:
    job_dir = tmp_path / "jobs"
    job_dir.mkdir(mode=0o755)
    job = job_dir / "slurm-job-42.json"
    job.write_text(
        json.dumps({"version": 1, "scheduler": "slurm", "job_id": "42", "user": "alice",
                    "gpus": ["0", "1"], "expires_at": 4102444800})
    )  # fmt: skip
    stop = threading.Event()
    with (
        aggregator(insecure_plaintext_agents=True) as running,
        simulated_sampler(fakenvml, tmp_path, "node-a", job_dir) as sampler,
    ):
        settings = UplinkSettings(
            target=running.target,
            node_name="node-a",
            labels={},
            capabilities=("jobs",),
            summary_interval_s=0.2,
            store_id_path=tmp_path / "fleet-store-id",
        )
        uplink = Uplink(settings, FakePolicies(), SnapshotHub(0.2))
        thread = threading.Thread(target=uplink.run, args=(stop,), daemon=True)
        thread.start()
        try:
            uplink.offer(sampler.sample(fakenvml.tick(advance_s=1.0)))
            eventually(
                lambda: (s := summary_of(running, "node-a")) is not None and s.jobs,
                "the job in the node's summary",
            )
            held = summary_of(running, "node-a")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = ctl.main(["--aggregator", running.target, "node", "node-a"])
            job.unlink()
            uplink.offer(sampler.sample(fakenvml.tick(advance_s=1.0)))
            eventually(
                lambda: (s := summary_of(running, "node-a")) is not None and not s.jobs,
                "the removed job gone from the node's summary",
            )
        finally:
            stop.set()
            thread.join(timeout=10)

    assert held is not None
    (carried,) = held.jobs
    assert (carried.scheduler, carried.job_id, carried.user) == ("slurm", "42", "alice")
    assert list(carried.gpu_indices) == [0, 1]
    assert carried.gpu_uuids[0] == "GPU-e220a839-7b1d-cdaf-a220-5ef5e89be831"
    assert carried.expires_at.seconds == 4102444800
    assert code == 0
    lines = out.getvalue().splitlines()
    gpu_rows = [line.split() for line in lines[lines.index("GPU") + 2 : lines.index("GPU") + 10]]
    assert [row[-2] for row in gpu_rows] == ["42", "42", "-", "-", "-", "-", "-", "-"]
    assert lines[lines.index("JOBS") + 2].split()[:3] == ["42", "alice", "0,1"]


def test_a_summary_with_more_jobs_than_the_limit_is_refused() -> None:
    summary = pb.NodeSummary()
    for n in range(MAX_JOBS + 1):
        summary.jobs.add(scheduler="slurm", job_id=str(n))

    with pytest.raises(LimitError, match=r"summary.jobs: 65 entries, at most 64"):
        check_summary(summary)
