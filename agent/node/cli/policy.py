"""`fabric-agent policy validate|plan|status`: check QoS policy files, show what the
daemon would change in the kernel, and what its classes carry; none changes anything.

validate prints `FILE: ok (N classes on IFACE DIRECTION)` per valid policy on stdout and
every violation on stderr; exit 0 all valid, 2 any violation (bad input). A directory
stands for its policy files as the daemon reads them, entries it cannot read included.
plan takes the node as the daemon sees it (its config: policy directory, state, API
objects and assignments, --take-over, --cgroup-root) and prints the changes of the
daemon's own plan path (agent.node.qos.pipeline), like `kubectl diff`: exit 0 no
changes, 1 changes, 2 error. FILE arguments stand in for the policy directory.
status prints, per class of every policy the agent applied, its rate and ceiling, the
throughput measured over a second, drops and overlimits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from agent.common import rates
from agent.common.errors import ConfigError, FabricError
from agent.common.exits import ExitCode
from agent.common.policy.model import (
    PolicyViolation,
    QosPolicy,
    check_host,
    detect_cgroup2_root,
    interface_exists,
    load_policy_files,
)
from agent.common.policy.units import format_bps
from agent.node.cli.flags import add_config_flags, config_overrides
from agent.node.config import load_config
from agent.node.qos.api_objects import API_SOURCE, ApiPolicyStore
from agent.node.qos.files import (
    POLICY_SUFFIXES,
    file_set,
    kept_from_state,
    policy_files,
    read_files,
)
from agent.node.qos.kernel import QosKernel
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.pipeline import QosSettings, plan_pass
from agent.node.qos.planner import Plan
from agent.node.qos.state import StateError, load_state

# What `policy plan` reads from the daemon's configuration.
PLAN_FLAGS = ("--policy-dir", "--state-dir", "--take-over", "--cgroup-root")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `policy validate|plan|status` under the top-level command group."""
    policy = commands.add_parser("policy", help="work with QoS policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = actions.add_parser(
        "validate", help="check policy files: schema, rules, overlaps and this host"
    )
    validate.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="a policy file, or a directory of them as the daemon reads it",
    )
    validate.add_argument(
        "--offline",
        action="store_true",
        help="skip the checks against this host (interfaces and cgroups exist)",
    )
    validate.add_argument(
        "--cgroup-root",
        type=Path,
        default=None,
        metavar="PATH",
        help="cgroup2 mount the cgroup paths are relative to "
        "(default: detected from /proc/self/mountinfo)",
    )

    plan_parser = actions.add_parser(
        "plan",
        help="the kernel changes the daemon would make, with its config, state and API "
        "objects (exit 0 none, 1 changes, 2 error)",
    )
    plan_parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="policy files in place of the policy directory (default: the directory)",
    )
    add_config_flags(plan_parser, only=PLAN_FLAGS)

    status_parser = actions.add_parser(
        "status", help="per class of every applied policy: rate, ceil, throughput, drops"
    )
    add_config_flags(status_parser, only=("--state-dir",))
    status_parser.add_argument(
        "--over",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="throughput is measured over this many seconds (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `policy ...` command line."""
    if args.policy_command == "validate":
        return validate(args.files, offline=args.offline, cgroup_root=args.cgroup_root)
    try:
        config = load_config(args.config, config_overrides(args))
    except ConfigError as exc:
        print(f"fabric-agent: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    settings = QosSettings.from_config(config)
    kernel = NetlinkKernel(settings.netns)
    try:
        if args.policy_command == "plan":
            return plan(settings, kernel, args.files)
        return status(settings.state_dir, kernel, over_s=args.over)
    finally:
        kernel.close()


def plan(settings: QosSettings, kernel: QosKernel, files: Sequence[Path] = ()) -> int:
    """Print, per policy, the changes the daemon's next pass would make (its ingress
    redirect, its HTB tree), the policies it would take down, and its nftables table;
    change nothing. A file or policy the daemon would refuse is reported (exit 2) and
    the others planned as the daemon would enforce them, the refused ones' last applied
    versions included."""
    try:
        state = load_state(settings.state_dir)
        api = ApiPolicyStore(settings.state_dir)
    except (StateError, FabricError) as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    read = read_files(
        list(files) or policy_files(settings.policy_dir),
        interface_exists=kernel.interface_exists,
        kept=kept_from_state(state),
        incumbents=[(p.name, p.file) for p in state.policies.values()],
    )
    for violation in read.violations:
        print(violation, file=sys.stderr)
    now = time.time()
    # Leases that ran out go at the daemon's next pass, before it plans.
    entries = {e.name: e for e in api.entries() if e.expires_at is None or e.expires_at > now}
    planned = plan_pass(file_set(read, state).policies, entries, state, kernel, settings)
    for name, problem in sorted(planned.admission.refused.items()):
        print(f"API object {name}: not enforced: {problem}", file=sys.stderr)
    for name, waiting in sorted(planned.desired.waiting.items()):
        print(f"policy {name}: {waiting}", file=sys.stderr)
    code = _print_plan(planned.plan)
    return ExitCode.INVALID if read.violations else code


def _print_plan(plan: Plan) -> int:
    failed = bool(plan.errors) or plan.nft.error is not None
    for name, error in sorted(plan.errors.items()):
        print(f"policy {name}: {error}", file=sys.stderr)
    for item in plan.policies:
        desired = item.desired
        source = "API" if desired.file == API_SOURCE else desired.file
        header = f"policy {item.name} ({source}) on {desired.interface} {desired.direction}"
        if item.error is not None:
            print(f"{header}: {item.error}", file=sys.stderr)
            failed = True
            continue
        _print_steps(header, [line for step in item.steps for line in step.lines()])
    for removal in plan.removals:
        applied = removal.applied
        header = f"policy {removal.name} (no longer wanted) on {applied.device}"
        _print_steps(header, [line for step in removal.steps for line in step.lines()])
    if plan.nft.error is not None:
        print(f"nftables table: {plan.nft.error}", file=sys.stderr)
    elif plan.nft.step is not None:
        for line in plan.nft.step.lines():
            print(line)
    if failed:
        return ExitCode.INVALID
    return ExitCode.OK if plan.empty else ExitCode.CHANGES


def _print_steps(header: str, lines: Sequence[str]) -> None:
    count = len(lines)
    print(f"{header}: {count or 'no'} change{'' if count == 1 else 's'}")
    for line in lines:
        print(f"  {line}")


def validate(files: list[Path], *, offline: bool, cgroup_root: Path | None = None) -> int:
    paths: list[Path] = []
    empty: list[PolicyViolation] = []
    for path in files:
        if not path.is_dir():
            paths.append(path)
            continue
        found = policy_files(path)
        paths.extend(found)
        if not found:
            suffixes = ", ".join(f"*{suffix}" for suffix in POLICY_SUFFIXES)
            empty.append(PolicyViolation(str(path), "", f"holds no policy files ({suffixes})"))
    loaded, violations = load_policy_files(paths)
    violations[:0] = empty
    if not offline:
        root = cgroup_root if cgroup_root is not None else detect_cgroup2_root()
        violations.extend(check_host(loaded, interface_exists=interface_exists, cgroup_root=root))
    failed = {(v.file, v.document) for v in violations}
    for policy in loaded:
        if (policy.file, policy.document) not in failed:
            spec = policy.policy.spec
            where = policy.file
            if policy.document is not None:
                where += f" (document {policy.document})"
            count = len(spec.classes)
            classes = "1 class" if count == 1 else f"{count} classes"
            print(f"{where}: ok ({classes} on {spec.interface} {spec.direction})")
    for violation in violations:
        print(violation, file=sys.stderr)
    return ExitCode.INVALID if violations else ExitCode.OK


def status(state_dir: Path, kernel: QosKernel, *, over_s: float = 1.0) -> int:
    """A table per applied policy class; exit 0, or 1 when the kernel cannot be read."""
    try:
        state = load_state(state_dir)
    except StateError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return ExitCode.CHANGES
    if not state.policies:
        print(f"no QoS policies applied (state in {state_dir})")
        return ExitCode.OK
    rows: list[tuple[str, ...]] = []
    try:
        first = {p.device: kernel.class_stats(p.device) for p in state.policies.values()}
        time.sleep(over_s)
        second = {p.device: kernel.class_stats(p.device) for p in state.policies.values()}
    except FabricError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return ExitCode.CHANGES
    for applied in sorted(state.policies.values(), key=lambda p: p.name):
        try:
            policy = QosPolicy.model_validate(applied.document, by_alias=True, by_name=False)
        except ValueError as exc:
            print(f"fabric-agent: state of policy {applied.name}: {exc}", file=sys.stderr)
            return ExitCode.CHANGES
        for cls in policy.effective_classes():
            minor = applied.minors.get(cls.name)
            now = second[applied.device].get(minor) if minor is not None else None
            then = first[applied.device].get(minor) if minor is not None else None
            if now is None or then is None:
                rows.append((applied.name, applied.device, cls.name, "-", "-", "missing", "-", "-"))
                continue
            throughput = (rates.rate(now.bytes, then.bytes, over_s) or 0.0) * 8
            rows.append(
                (
                    applied.name,
                    applied.device,
                    cls.name,
                    format_bps(cls.rate_bps),
                    format_bps(cls.ceil_bps),
                    _human_bps(throughput),
                    str(now.drops),
                    str(now.overlimits),
                )
            )
    header = ("POLICY", "DEVICE", "CLASS", "RATE", "CEIL", "THROUGHPUT", "DROPS", "OVERLIMITS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return ExitCode.OK


def _human_bps(bps: float) -> str:
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= factor:
            return f"{bps / factor:.1f}{unit}"
    return f"{bps:.0f}bit/s"
