"""The one plan path: from the policies to enforce to what must change in the kernel.

    policy files + API objects  --admit-->  policies (assignments merged)
        --desired_state-->  kernel objects  --plan (reads QosKernel)-->  Plan

The daemon's reconcile pass applies the plan (agent.node.qos.enforce); `fabric-agent
policy plan` prints it; the API's `PlanPolicy` and `validate_only` calls answer with it.
All of them build it here, with the same `QosSettings`, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.common.policy.model import LoadedPolicy, detect_cgroup2_root
from agent.node.cgroups import UNIFIED, cgroup_layout, waiting_reason
from agent.node.config import AgentConfig
from agent.node.qos.api_objects import Admission, ApiEntry, admit
from agent.node.qos.desired import DesiredState, KernelOptions, desired_state
from agent.node.qos.kernel import QosKernel
from agent.node.qos.nftrules import NFT_CGROUP_BASE
from agent.node.qos.planner import Plan, plan
from agent.node.qos.state import QosState


@dataclass(frozen=True)
class QosSettings:
    """Where policies and state live, and how far the agent may go."""

    policy_dir: Path
    state_dir: Path
    # Replace a root qdisc the agent does not own on every interface (a policy can also
    # ask for it with spec.takeOver).
    take_over: bool = False
    # The cgroup2 mount cgroup paths are relative to; None: not mounted.
    cgroup_root: Path | None = None
    # Work inside this network namespace (tests); None is the agent's own.
    netns: str | None = None
    # Where nft looks cgroup paths up (it always uses /sys/fs/cgroup; tests that render
    # tables for a fake kernel point it at their own tree).
    nft_cgroup_base: Path = NFT_CGROUP_BASE
    # A policy file is taken once its size and modification time have not changed for
    # this long: a file caught mid-write is not enforced as written.
    file_settle_s: float = 1.0
    # unified | hybrid | legacy | none: what an assignment waiting for a Slurm job's
    # cgroup says when the host cannot give jobs cgroups of their own.
    cgroup_layout: str = UNIFIED
    # The job files of the scheduler's hooks (agent.node.jobs); None: no jobs.
    job_dir: Path | None = None

    @classmethod
    def from_config(cls, config: AgentConfig) -> QosSettings:
        """The daemon's settings; `policy plan` takes them from the same config."""
        return cls(
            policy_dir=config.policy_dir,
            state_dir=config.state_dir,
            take_over=config.take_over,
            cgroup_root=config.cgroup_root or detect_cgroup2_root(),
            cgroup_layout=cgroup_layout(),
            job_dir=config.job_dir,
        )

    def waiting_reason(self, cgroups: list[str]) -> str:
        """What an assignment waiting for `cgroups` says (a Slurm scope that cannot
        appear on this host says why)."""
        return waiting_reason(self.cgroup_root, cgroups, self.cgroup_layout)

    def kernel_options(self, kernel: QosKernel) -> KernelOptions:
        """How policies become kernel objects here, with `kernel`'s leaf qdisc."""
        return KernelOptions(
            leaf_kind=kernel.capabilities().leaf_kind,
            cgroup_root=self.cgroup_root or NFT_CGROUP_BASE,
            nft_cgroup_base=self.nft_cgroup_base,
            take_over=self.take_over,
        )


@dataclass(frozen=True)
class PassPlan:
    """One pass's inputs as admitted, their kernel objects, and the plan."""

    admission: Admission
    desired: DesiredState
    plan: Plan


def plan_pass(
    files: Sequence[LoadedPolicy],
    entries: Mapping[str, ApiEntry],
    state: QosState,
    kernel: QosKernel,
    settings: QosSettings,
) -> PassPlan:
    """What enforcing the file policies `files` and the API objects `entries` would
    change, given what the agent last applied (`state`) and what `kernel` holds."""
    admission = admit(
        files,
        entries,
        interface_exists=kernel.interface_exists,
        cgroup_root=settings.cgroup_root,
        cgroups_required=False,
        waiting=settings.waiting_reason,
    )
    options = settings.kernel_options(kernel)
    desired = desired_state(
        admission.policies,
        previous_minors={name: p.minors for name, p in state.policies.items()},
        bases=admission.bases,
        options=options,
    )
    return PassPlan(admission, desired, plan(desired, kernel, state, options))
