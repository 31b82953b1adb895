"""`fabric-agent policy validate|plan FILE...`: check QoS policy files and show what
applying them would change in the kernel; neither changes anything.

validate prints `FILE: ok (N classes on IFACE DIRECTION)` per valid policy on stdout and
every violation on stderr; exit 0 all valid, 2 any violation (bad input).
plan prints the traffic-control changes per policy and for the agent's nftables table,
like `kubectl diff`: exit 0 no changes, 1 changes, 2 error.
status prints, per class of every policy the agent applied, its rate and ceiling, the
throughput measured over a second, drops and overlimits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from agent.common.errors import FabricError
from agent.common.policy.model import (
    QosPolicy,
    check_host,
    detect_cgroup2_root,
    interface_exists,
    load_policy_files,
)
from agent.common.policy.units import format_bps
from agent.node.qos import nftrules, tc
from agent.node.qos.nftables import Nftables
from agent.node.qos.reconciler import plan_changes
from agent.node.qos.state import QosState, StateError, load_state

EXIT_OK, EXIT_CHANGES, EXIT_INVALID = 0, 1, 2
DEFAULT_STATE_DIR = Path("/var/lib/fabric-agent")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `policy validate` under the top-level command group."""
    policy = commands.add_parser("policy", help="work with QoS policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = actions.add_parser(
        "validate", help="check policy files: schema, rules, overlaps and this host"
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
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
        help="the kernel changes applying these policies would make "
        "(exit 0 none, 1 changes, 2 error)",
    )
    plan_parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    plan_parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="the agent's state directory, for the class handles it uses "
        "(default /var/lib/fabric-agent)",
    )

    status_parser = actions.add_parser(
        "status", help="per class of every applied policy: rate, ceil, throughput, drops"
    )
    status_parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="the agent's state directory (default /var/lib/fabric-agent)",
    )
    status_parser.add_argument(
        "--over",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="throughput is measured over this many seconds (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `policy ...` command line."""
    if args.policy_command == "plan":
        return plan(args.files, args.state_dir)
    if args.policy_command == "status":
        return status(args.state_dir, over_s=args.over)
    return validate(args.files, offline=args.offline, cgroup_root=args.cgroup_root)


def plan(files: list[Path], state_dir: Path = DEFAULT_STATE_DIR) -> int:
    """Print, per policy, the changes between what it needs and what the kernel has (its
    HTB tree, the ingress redirect for ingress policies), then the agent's nftables table;
    change nothing. Class handles come from the agent's state, as the daemon keeps them."""
    loaded, violations = load_policy_files(files)
    if violations:
        for violation in violations:
            print(violation, file=sys.stderr)
        return EXIT_INVALID
    try:
        state = load_state(state_dir)
    except StateError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return EXIT_INVALID
    leaf_kind = tc.detect_capabilities().leaf_kind
    changed = failed = False
    with_minors = []
    for item in loaded:
        policy, spec = item.policy, item.policy.spec
        name = policy.metadata.name
        header = f"policy {name} ({item.file}) on {spec.interface} {spec.direction}"
        try:
            lines, minors = plan_changes(
                policy,
                previous_minors=state.minors(name),
                leaf_kind=leaf_kind,
                take_over=spec.take_over,
            )
        except tc.TcError as exc:
            print(f"{header}: {exc}", file=sys.stderr)
            failed = True
            continue
        with_minors.append((policy, minors))
        count = len(lines)
        print(f"{header}: {count or 'no'} change{'' if count == 1 else 's'}")
        for line in lines:
            print(f"  {line}")
        changed = changed or bool(lines)
    try:
        nft_change = _plan_nft(with_minors, state)
    except FabricError as exc:
        print(f"nftables table: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if nft_change:
        print(f"nftables table {nftrules.TABLE_FAMILY} {nftrules.TABLE_NAME}: {nft_change}")
        changed = True
    if failed:
        return EXIT_INVALID
    return EXIT_CHANGES if changed else EXIT_OK


def _plan_nft(policies: list[tuple[QosPolicy, Mapping[str, int]]], state: QosState) -> str | None:
    """What loading the agent's nftables table for `policies` would do, or None."""
    cgroup_root = detect_cgroup2_root() or Path("/sys/fs/cgroup")
    body = nftrules.render_table(policies, cgroup_root=cgroup_root)
    family, table = nftrules.TABLE_FAMILY, nftrules.TABLE_NAME
    with Nftables() as nft:
        listing = nft.list_table(family, table)
    rules = sum(1 for line in body.splitlines() if line.strip() and not line.strip().startswith(
        ("chain", "type", "}")
    ))  # fmt: skip
    if not body.strip():
        return "- delete (no policy needs it)" if listing is not None else None
    if listing is None:
        return f"+ load ({rules} rules)"
    if body == state.nft_body and listing == state.nft_listing:
        return None
    return f"~ reload ({rules} rules)"


def validate(files: list[Path], *, offline: bool, cgroup_root: Path | None = None) -> int:
    loaded, violations = load_policy_files(files)
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
    return EXIT_INVALID if violations else EXIT_OK


def status(state_dir: Path, *, over_s: float = 1.0) -> int:
    """A table per applied policy class; exit 0, or 1 when the kernel cannot be read."""
    try:
        state = load_state(state_dir)
    except StateError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return EXIT_CHANGES
    if not state.policies:
        print(f"no QoS policies applied (state in {state_dir})")
        return EXIT_OK
    rows: list[tuple[str, ...]] = []
    try:
        first = {p.device: tc.class_stats(p.device) for p in state.policies.values()}
        time.sleep(over_s)
        second = {p.device: tc.class_stats(p.device) for p in state.policies.values()}
    except tc.TcError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return EXIT_CHANGES
    for applied in sorted(state.policies.values(), key=lambda p: p.name):
        try:
            policy = QosPolicy.model_validate(applied.document, by_alias=True, by_name=False)
        except ValueError as exc:
            print(f"fabric-agent: state of policy {applied.name}: {exc}", file=sys.stderr)
            return EXIT_CHANGES
        for cls in policy.effective_classes():
            minor = applied.minors.get(cls.name)
            now = second[applied.device].get(minor) if minor is not None else None
            then = first[applied.device].get(minor) if minor is not None else None
            if now is None or then is None:
                rows.append((applied.name, applied.device, cls.name, "-", "-", "missing", "-", "-"))
                continue
            throughput = (now.bytes - then.bytes) * 8 / over_s
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
    return EXIT_OK


def _human_bps(bps: float) -> str:
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= factor:
            return f"{bps / factor:.1f}{unit}"
    return f"{bps:.0f}bit/s"
