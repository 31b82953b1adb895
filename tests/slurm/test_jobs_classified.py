"""Real Slurm jobs through the project's prolog and epilog, with the real agent enforcing
a policy on a veth in a namespace: the job's traffic in its class from its first
interval, the class gone with the epilog, an agent that is down or hung while the hooks
run, and FABRIC_STRICT; and a job's GPUs attributed by the agent on the simulated GPU
node.

The agent runs in the veth's namespace entered with nsenter (it keeps the host's cgroup
mounts, which nftables resolves job cgroups against); the job's iperf3 enters the same
namespace with nsenter, which keeps its cgroup: the job's socket is in the job's
cgroup, as any job's is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VethPair, iperf3_intervals
from tests.ctl.conftest import RealAgent, run_fabricctl
from tests.slurm.cluster import SlurmCluster
from tests.slurm.node import (
    BEST_EFFORT_MBIT,
    CLASSIFIED_MBIT,
    Node,
    Server,
    agent_node,
    hooks,
    install_hooks,
    intervals_mbit,
    iperf3_job,
    job_file,
    sent_bytes,
    wait_started,
    waiting_job,
)


@pytest.fixture
def node(shaped_pair: VethPair) -> Iterator[Node]:
    with agent_node(shaped_pair) as instance:
        yield instance


@pytest.fixture
def server(shaped_pair: VethPair) -> Iterator[Server]:
    instance = Server(shaped_pair)
    try:
        yield instance
    finally:
        instance.close()


def test_a_jobs_traffic_is_in_its_class_from_its_first_interval_and_leaves_with_the_epilog(
    slurm: SlurmCluster, node: Node, server: Server
) -> None:
    node.start()
    node.wait_for("serving", lambda: "training-node" in node.policies())
    hooks(node, slurm)
    before = node.class_bytes()

    job_id = slurm.submit(iperf3_job(node.pair, 3), time_limit="10")
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=60)

    report = slurm.job_output(job_id)
    intervals = intervals_mbit(report)
    after = node.class_bytes()
    gained = {handle: after[handle] - before.get(handle, 0) for handle in after}
    # Leaves: collectives is the first class (fa:10), best-effort the second.
    collectives, best_effort = gained["fa:10"], gained["fa:11"]
    print(
        f"job {job_id}: Mbit/s per 0.5 s {[round(v) for v in intervals]}; class bytes "
        f"collectives {collectives}, best-effort {best_effort}, sent {sent_bytes(report)}"
    )
    # The first half second already ran at the job class's rate, not best-effort's.
    assert intervals[0] > CLASSIFIED_MBIT, intervals
    assert min(intervals) > CLASSIFIED_MBIT, intervals
    assert collectives >= 0.95 * sent_bytes(report)
    assert best_effort < 0.05 * collectives

    # The epilog removed the job file, and the agent the job's assignment.
    node.wait_for("epilog done", lambda: not job_file(node, job_id).exists())
    node.wait_for("assignment gone", lambda: f"slurm-job-{job_id}" not in node.policies())

    # A flow outside any job stays best-effort.
    server.close()
    outside = iperf3_intervals(node.pair, 2, 0.5)
    assert max(outside[1:]) < BEST_EFFORT_MBIT * 1.5, outside


def test_the_lease_is_the_time_limit_plus_the_margin_and_says_so(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    hooks(node, slurm)
    flag = tmp_path / "go"
    submitted = time.time()
    job_id = slurm.submit(waiting_job(flag), time_limit="1:30:00", gres="gpu:2")
    wait_started(node, flag)
    document = json.loads(job_file(node, job_id).read_text())
    flag.touch()
    assert document["qos"]["cgroup"] == slurm.job_cgroup(job_id)
    assert document["gpus"] == ["0", "1"]
    assert document["user"] == "root"
    assert "1:30:00" in document["lease"] and "squeue" in document["lease"]
    assert submitted + 5400 + 3600 - 5 <= document["expires_at"] <= time.time() + 5400 + 3600


def test_an_agent_down_during_the_prolog_classifies_the_job_when_it_is_back(
    slurm: SlurmCluster, node: Node, server: Server, tmp_path: Path
) -> None:
    hooks(node, slurm)  # no agent runs
    flag = tmp_path / "go"
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit(iperf3_job(node.pair, 2, wait_for=flag), time_limit="10")
    wait_started(node, flag)
    assert job_file(node, job_id).exists(), slurm.log_since(slurm.slurmd_log, offset)

    started = node.start()
    enforced = node.wait_for("enforced", lambda: node.state_of(f"slurm-job-{job_id}") == "enforced")
    print(f"agent start to the job enforced: {(enforced - started) * 1000:.0f} ms")
    flag.touch()
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=60)
    intervals = intervals_mbit(slurm.job_output(job_id))
    assert min(intervals) > CLASSIFIED_MBIT, intervals


def test_a_hung_agent_delays_neither_hook_and_catches_up_when_it_runs_again(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    node.start()
    node.wait_for("serving", lambda: "training-node" in node.policies())
    hooks(node, slurm)
    node.pause()
    try:
        flag = tmp_path / "go"
        submitted = time.monotonic()
        job_id = slurm.submit(waiting_job(flag), time_limit="10")
        # The old prolog waited 10 s on a hung agent before giving up.
        assert wait_started(node, flag) - submitted < 8
        assert job_file(node, job_id).exists()
    finally:
        node.resume()
    node.wait_for("enforced", lambda: node.state_of(f"slurm-job-{job_id}") == "enforced")

    node.pause()
    try:
        flag.touch()
        slurm.wait_job_state(job_id, "COMPLETED", timeout_s=30)
        node.wait_for("epilog done", lambda: not job_file(node, job_id).exists(), timeout_s=8)
    finally:
        node.resume()
    node.wait_for("assignment gone", lambda: f"slurm-job-{job_id}" not in node.policies())


def test_strict_mode_holds_a_job_that_cannot_be_classified_and_says_why(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    empty = tmp_path / "cgroup2"
    empty.mkdir()
    hooks(node, slurm, FABRIC_STRICT="1", FABRIC_CGROUP_ROOT=str(empty))
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit("true\n", time_limit="5")
    slurm.wait_job(
        job_id, lambda job: "held" in job.fields.get("Reason", "").lower() or
        job.fields.get("Reason") == "launch_failed_requeued_held", "held", timeout_s=30,
    )  # fmt: skip
    log = slurm.log_since(slurm.slurmd_log, offset)
    assert "prolog failed" in log and "looked for Slurm's cgroup v2 scope" in log
    assert not job_file(node, job_id).exists()


def test_without_strict_mode_the_job_runs_and_the_log_says_why_it_has_no_class(
    slurm: SlurmCluster, node: Node, tmp_path: Path
) -> None:
    empty = tmp_path / "cgroup2"
    empty.mkdir()
    hooks(node, slurm, FABRIC_CGROUP_ROOT=str(empty))
    offset = slurm.log_offset(slurm.slurmd_log)
    job_id = slurm.submit("true\n", time_limit="5")
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=30)
    log = slurm.log_since(slurm.slurmd_log, offset)
    assert "looked for Slurm's cgroup v2 scope" in log
    document = (
        json.loads(job_file(node, job_id).read_text()) if job_file(node, job_id).exists() else {}
    )
    assert "qos" not in document


def test_a_jobs_gpus_are_attributed_in_metrics_until_its_epilog(
    slurm: SlurmCluster, sim_agent: RealAgent, tmp_path: Path
) -> None:
    # The agent on the simulated 8-GPU node reads tmp_path/jobs; no class for the job.
    install_hooks(slurm, tmp_path, tmp_path / "jobs")
    flag = tmp_path / "go"
    job_id = slurm.submit(waiting_job(flag), time_limit="10", gres="gpu:2")

    def attributed() -> list[str]:
        result = run_fabricctl("--agent", sim_agent.target, "telemetry", "--section", "jobs",
                               "-o", "json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        jobs = json.loads(result.stdout).get("jobs", [])
        return [index for job in jobs if job["jobId"] == job_id for index in job["gpuIndices"]]

    deadline = time.monotonic() + 30
    while attributed() != [0, 1]:
        assert time.monotonic() < deadline, attributed()
        time.sleep(0.1)
    flag.touch()
    slurm.wait_job_state(job_id, "COMPLETED", timeout_s=30)
    while attributed():
        assert time.monotonic() < deadline + 30
        time.sleep(0.1)
