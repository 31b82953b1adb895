"""What the host's cgroup layout means for classifying jobs by cgroup.

nftables matches a socket's cgroup v2 ancestry, so a job can be classified only where
the scheduler puts it in a cgroup v2 group of its own. On a hybrid host (cgroup v1
controllers mounted beside cgroup2, RHEL 8 and many HPC sites) Slurm's cgroup/v2 plugin
refuses to start ("Hybrid mode is not supported"), and `autodetect` picks cgroup/v1,
which leaves every job in the cgroup2 root: nothing can tell one job from another. The
agent says so wherever an assignment waits for such a cgroup, instead of waiting
silently.
"""

from __future__ import annotations

import re
from pathlib import Path

UNIFIED, HYBRID, LEGACY, NONE = "unified", "hybrid", "legacy", "none"
# The scope Slurm's cgroup/v2 plugin makes for its step daemons: `slurmstepd.scope`, or
# `<NodeName>_slurmstepd.scope` where Slurm is built with --enable-multiple-slurmd
# (Debian's).
SLURM_SCOPE = re.compile(r"^(?:.+_)?slurmstepd\.scope$")


def cgroup_layout(mountinfo: Path = Path("/proc/self/mountinfo")) -> str:
    """unified (cgroup2 alone), hybrid (cgroup2 beside v1 controllers), legacy (v1
    only) or none, from the mount table."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return NONE
    kinds = {line.partition(" - ")[2].split()[:1][0] for line in lines if " - " in line}
    v2, v1 = "cgroup2" in kinds, "cgroup" in kinds
    if v2:
        return HYBRID if v1 else UNIFIED
    return LEGACY if v1 else NONE


LAYOUT_ADVICE = (
    "Slurm's cgroup/v2 plugin refuses hybrid hosts and cgroup/v1 leaves every job in the "
    "cgroup2 root, so jobs cannot be classified by cgroup here; boot with "
    "systemd.unified_cgroup_hierarchy=1 for a unified cgroup v2 host"
)


def slurm_scope_problem(root: Path | None, cgroup: str, layout: str) -> str | None:
    """Why a Slurm job cgroup `cgroup` can never appear (no slurmstepd scope, this
    layout); None when it may (the scope is there, or the path is not Slurm's)."""
    parts = Path(cgroup).parts
    for depth, part in enumerate(parts):
        if SLURM_SCOPE.match(part):
            scope = Path(*parts[: depth + 1])
            break
    else:
        return None
    if root is None:
        return f"no cgroup2 file system is mounted: {LAYOUT_ADVICE}"
    if (root / scope).is_dir():
        return None
    found = sorted(
        str(p.relative_to(root))
        for p in (root / scope.parent).glob("*slurmstepd.scope")
        if p.is_dir()
    )
    text = f"no Slurm cgroup v2 scope {scope} under {root}"
    if found:
        return f"{text}; slurmd made {', '.join(found)}: fix the hooks' cgroup template"
    if layout in (HYBRID, LEGACY):
        return f"{text}: this host is {layout} (cgroup v1 controllers mounted); {LAYOUT_ADVICE}"
    return f"{text}: slurmd is not running with CgroupPlugin=cgroup/v2 (cgroup.conf)"


def waiting_reason(root: Path | None, cgroups: list[str], layout: str) -> str:
    """What an assignment waiting for `cgroups` says in `policy list`."""
    for cgroup in cgroups:
        problem = slurm_scope_problem(root, cgroup, layout)
        if problem is not None:
            return f"waiting for cgroup {cgroup}: {problem}"
    return f"waiting for cgroup {', '.join(cgroups)}"
