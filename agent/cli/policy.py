"""`fabric-agent policy validate FILE...`: check QoS policy files, change nothing.

Prints `FILE: ok (N classes on IFACE DIRECTION)` per valid policy on stdout and every
violation on stderr. Exit codes: 0 all valid, 2 any violation (bad input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.qos.policy import (
    LoadedPolicy,
    PolicyError,
    PolicyViolation,
    check_host,
    check_ownership,
    detect_cgroup2_root,
    interface_exists,
    load_policy_file,
)

EXIT_OK, EXIT_INVALID = 0, 2


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


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `policy ...` command line."""
    return validate(args.files, offline=args.offline, cgroup_root=args.cgroup_root)


def validate(files: list[Path], *, offline: bool, cgroup_root: Path | None = None) -> int:
    loaded: list[LoadedPolicy] = []
    violations: list[PolicyViolation] = []
    for path in files:
        try:
            loaded.extend(load_policy_file(path))
        except PolicyError as exc:
            violations.extend(exc.violations)
    violations.extend(check_ownership(loaded))
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
