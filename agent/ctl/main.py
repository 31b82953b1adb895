"""`fabricctl`: telemetry and QoS policies of a node's agent over its gRPC API, and the
fleet view and fleet policies of the central aggregator.

    fabricctl [--agent unix:///run/fabric-agent/agent.sock | HOST:PORT] telemetry [--watch]
    fabricctl policy apply|plan -f FILE [-f FILE...] [--ttl 1h] [--dry-run]
    fabricctl policy delete|status|renew NAME, fabricctl policy list
    fabricctl health

    fabricctl --aggregator HOST:PORT | unix:///path  (or $FABRIC_AGGREGATOR) with:
    nodes [--selector k=v,...] [--status connected,stale,unreachable]
    node NAME [--snapshot]
    top METRIC [--entity node|gpu|nvlink|nic] [--limit 10] [--window 10m] [--selector ...]
    events [--kind registered,stale,gone,nvlink-down,xid,gpu-lost,drift,policy-status]
    policy apply -f FILE --selector pool=training [--wait 10s] [--dry-run]
    policy delete NAME [--wait 10s] [--ignore-not-found]

Fleet commands have no default aggregator. `policy` goes to the aggregator only with an
explicit --aggregator flag: $FABRIC_AGGREGATOR never turns a node's policy command into
a fleet-wide one.

Output is a table by default; `-o json` prints proto3 JSON: one indented object for a
single response, one object per line for streams (`--watch`, `events`) and per document
(`apply`, `plan`). Global options may also follow the command.

Exit codes: 0 ok; 1 changes (`policy plan`) or not serving (`health`); 2 bad input or
refused (an invalid document, a failed precondition, no such policy or node, not
allowed, a node that failed a fleet policy); 3 the agent or aggregator is unreachable or
did not answer within --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from agent import __version__
from agent.common.config import parse_duration
from agent.common.exits import ExitCode
from agent.common.policy.model import PolicyError
from agent.ctl import fleet, health, policy, telemetry
from agent.ctl.client import (
    DEFAULT_AGENT,
    DEFAULT_TIMEOUT_S,
    RpcFailure,
    Target,
    TlsFiles,
    UsageError,
    describe_failure,
    failure_from_error,
    open_channel,
    parse_target,
)
from agent.ctl.output import FORMATS

PROG = "fabricctl"
# The environment variable that names the agent when --agent is not given.
AGENT_ENV = "FABRIC_AGENT"
# The environment variable that names the aggregator for the fleet commands.
AGGREGATOR_ENV = "FABRIC_AGGREGATOR"
# Commands that only the aggregator answers; `policy` goes there with --aggregator.
FLEET_COMMANDS = frozenset({"nodes", "node", "top", "events", "release-kept"})
# Policy actions the aggregator serves.
FLEET_POLICY_ACTIONS = frozenset({"apply", "delete"})


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before and after the command. SUPPRESS keeps a later parser
    from overwriting a value given earlier with its default; `_settings` fills them."""
    common = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS
    common.add_argument(
        "--agent",
        default=suppress,
        metavar="TARGET",
        help=f"unix:///path/to/socket or HOST:PORT (default ${AGENT_ENV} or {DEFAULT_AGENT})",
    )
    common.add_argument(
        "--aggregator",
        default=suppress,
        metavar="TARGET",
        help=f"the fleet's aggregator: HOST:PORT (it listens on {fleet.DEFAULT_PORT}) or "
        f"unix:///path ({fleet.DEFAULT_SOCKET} on its host); default ${AGGREGATOR_ENV}, "
        "needed by nodes, node, top, events; makes policy apply|delete fleet-wide",
    )
    common.add_argument(
        "--timeout",
        default=suppress,
        metavar="DURATION",
        help=f"deadline of each call, e.g. 500ms, 10s (default {DEFAULT_TIMEOUT_S:g}s)",
    )
    common.add_argument(
        "-o", "--output", choices=FORMATS, default=suppress, help="table (default) or json"
    )
    tls = common.add_argument_group("mTLS (HOST:PORT targets)")
    tls.add_argument(
        "--tls-ca", default=suppress, metavar="FILE", help="CA of the agent's or aggregator's cert"
    )
    tls.add_argument("--tls-cert", default=suppress, metavar="FILE", help="client certificate")
    tls.add_argument("--tls-key", default=suppress, metavar="FILE", help="client private key")
    tls.add_argument(
        "--tls-server-name",
        default=suppress,
        metavar="NAME",
        help="name to check the server's certificate against (default: the target's host)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Telemetry and QoS policies of a fabric-agent; with --aggregator, the "
        "fleet's nodes, top metrics, events and fleet-wide policies.",
        epilog="fleet: fabricctl --aggregator HOST:PORT nodes|node|top|events, "
        "policy apply|delete (with --selector for apply). "
        "exit codes: 0 ok, 1 changes (plan) or not serving (health), "
        "2 bad input or refused (or a node failed a fleet policy), "
        "3 agent or aggregator unreachable",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tele = commands.add_parser(
        "telemetry", parents=[common], help="the agent's latest snapshot, or a stream of them"
    )
    tele.add_argument(
        "--section",
        metavar="S,...",
        help="only these sections, by the agent's names for them, e.g. gpu,nic (default all; "
        "the agent lists its sections when asked for one it does not have)",
    )
    tele.add_argument("--watch", action="store_true", help="print snapshots as they are taken")
    tele.add_argument(
        "--interval",
        metavar="DURATION",
        help="with --watch: at most one snapshot per interval (default: every one)",
    )

    check = commands.add_parser(
        "health",
        parents=[common],
        help="grpc.health.v1 check (exit 0 serving, 1 not serving, 3 unreachable)",
    )
    check.add_argument("--service", default="", help="service name (default: the whole agent)")

    group = commands.add_parser("policy", help="QoS policies and assignments on the agent")
    actions = group.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    apply = actions.add_parser(
        "apply", parents=[common], help="apply policy documents (stops at the first refused)"
    )
    _files(apply)
    apply.add_argument("--ttl", metavar="DURATION", help="lease: removed unless renewed (1h)")
    apply.add_argument("--dry-run", action="store_true", help="validate and report changes only")
    _selector(apply, "with --aggregator: the nodes to apply to, e.g. pool=training (required)")
    _wait(apply)
    plan = actions.add_parser(
        "plan", parents=[common], help="changes applying would make (exit 0 none, 1 changes)"
    )
    _files(plan)
    delete = actions.add_parser("delete", parents=[common], help="remove an API policy")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--dry-run", action="store_true", help="report changes only")
    delete.add_argument(
        "--ignore-not-found", action="store_true", help="a policy already gone is success"
    )
    _wait(delete)
    actions.add_parser("list", parents=[common], help="every policy, from files and the API")
    status = actions.add_parser(
        "status", parents=[common], help="a policy's classes: rate, ceil, throughput, drops"
    )
    status.add_argument("name", metavar="NAME")
    renew = actions.add_parser("renew", parents=[common], help="renew an API policy's lease")
    renew.add_argument("name", metavar="NAME")
    renew.add_argument("--ttl", metavar="DURATION", help="new TTL (default: the one applied)")
    _fleet_commands(commands, common)
    return parser


def _fleet_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    nodes = commands.add_parser(
        "nodes", parents=[common], help="the fleet's nodes (--aggregator): status, GPUs, labels"
    )
    _selector(nodes, "only nodes with these labels")
    nodes.add_argument(
        "--status",
        action="append",
        metavar="S,...",
        help=f"only nodes in these statuses: {','.join(fleet.NODE_STATUSES)}; repeatable",
    )
    node = commands.add_parser(
        "node", parents=[common], help="one node's latest summary (--aggregator)"
    )
    node.add_argument("name", metavar="NAME")
    node.add_argument(
        "--snapshot", action="store_true", help="also the agent's current full snapshot"
    )
    top = commands.add_parser(
        "top", parents=[common], help="top nodes, GPUs, NVLinks or NICs by a metric (--aggregator)"
    )
    top.add_argument(
        "metric",
        metavar="METRIC",
        help="e.g. gpu_utilization_ratio, gpu_power_watts, nic_transmit_bytes_per_second, "
        "nvlink_errors, nic_errors, xids, qos_drops",
    )
    top.add_argument("--entity", choices=fleet.TOP_ENTITIES, default="node", help="default node")
    top.add_argument("--limit", type=int, default=10, metavar="N", help="default 10")
    top.add_argument(
        "--window",
        metavar="DURATION",
        help="delta metrics (errors, drops, XIDs) summed over this window, e.g. 10m "
        "(default: the latest summary)",
    )
    _selector(top, "only nodes with these labels")
    events = commands.add_parser(
        "events", parents=[common], help="fleet events as they happen (--aggregator); Ctrl-C ends"
    )
    events.add_argument(
        "--kind",
        action="append",
        metavar="K,...",
        help=f"only these kinds: {','.join(fleet.EVENT_KINDS)}; repeatable (default all)",
    )
    _selector(events, "only events of nodes with these labels")
    commands.add_parser(
        "release-kept",
        parents=[common],
        help="let agents drop the fleet policies they kept from a previous aggregator "
        "store (--aggregator; after a lost store was made anew and what should stay was "
        "applied again)",
    )


def _wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        metavar="DURATION",
        help=f"with --aggregator: wait this long for the nodes' reports (default "
        f"{fleet.DEFAULT_WAIT}); those without one are pending",
    )


def _selector(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--selector",
        action="append",
        metavar="K=V,...",
        help=f"{help_text}; repeatable, pairs merge",
    )


def _files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="YAML policy documents ('-' reads stdin); repeatable",
    )


class Settings:
    """The connection options of a command line, validated."""

    def __init__(self, args: argparse.Namespace) -> None:
        agent = getattr(args, "agent", None) or os.environ.get(AGENT_ENV) or DEFAULT_AGENT
        self.target: Target = parse_target(agent)
        self.agent_flag = getattr(args, "agent", None) is not None
        # Only the flag makes `policy` fleet-wide (`_to_fleet`); the environment names
        # the aggregator for the commands that need one.
        self.aggregator_flag: str | None = getattr(args, "aggregator", None)
        timeout = getattr(args, "timeout", None)
        try:
            self.timeout_s = DEFAULT_TIMEOUT_S if timeout is None else parse_duration(timeout)
        except ValueError as exc:
            raise UsageError(f"--timeout: {exc}") from None
        if self.timeout_s <= 0:
            raise UsageError("--timeout must be positive")
        self.output: str = getattr(args, "output", None) or "table"
        self.tls = TlsFiles(
            ca=_path(args, "tls_ca"),
            cert=_path(args, "tls_cert"),
            key=_path(args, "tls_key"),
            server_name=getattr(args, "tls_server_name", None),
        )

    def aggregator(self, command: str) -> Target:
        """The aggregator's target, parsed only when `command` needs it: a bad
        $FABRIC_AGGREGATOR never fails a node's command."""
        if self.aggregator_flag is not None:
            return parse_target(self.aggregator_flag, "--aggregator")
        if os.environ.get(AGGREGATOR_ENV):
            return parse_target(os.environ[AGGREGATOR_ENV], f"${AGGREGATOR_ENV}")
        raise UsageError(
            f"{command} needs the aggregator: --aggregator HOST:PORT or unix:///path "
            f"(or ${AGGREGATOR_ENV}); it listens on port {fleet.DEFAULT_PORT} and "
            f"{fleet.DEFAULT_SOCKET} by default"
        )


def _path(args: argparse.Namespace, name: str) -> Path | None:
    value = getattr(args, name, None)
    return Path(value) if value else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    where = getattr(args, "name", None) or PROG
    target: Target | None = None
    describe: Callable[[RpcFailure, str, Target], list[str]] = describe_failure
    try:
        settings = Settings(args)
        to_fleet = _to_fleet(args, settings)
        if to_fleet:
            target, describe = _aggregator(args, settings), fleet.describe_failure
        else:
            _refuse_fleet_flags(args)
            target = settings.target
        # Documents are read and checked before connecting: bad input never waits on
        # an unreachable agent.
        documents = policy.load_documents(args.files) if hasattr(args, "files") else []
        with open_channel(target, settings.tls) as channel:
            if to_fleet:
                return _dispatch_fleet(args, settings, channel, documents, target)
            return _dispatch(args, settings, channel, documents)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    except PolicyError as exc:
        # As `fabric-agent policy validate` and the agent report them: FILE: FIELD: REASON.
        for violation in exc.violations:
            print(violation, file=sys.stderr)
        return ExitCode.INVALID
    except grpc.RpcError as exc:
        assert target is not None
        failure = failure_from_error(exc)
        for line in describe(failure, where, target):
            print(line, file=sys.stderr)
        return failure.exit_code
    except BrokenPipeError:
        # `fabricctl telemetry --watch | head`: the reader is done, so are we.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


def _to_fleet(args: argparse.Namespace, settings: Settings) -> bool:
    if args.command in FLEET_COMMANDS:
        return True
    return args.command == "policy" and settings.aggregator_flag is not None


def _aggregator(args: argparse.Namespace, settings: Settings) -> Target:
    """The aggregator a fleet command talks to; raises UsageError for what it cannot do."""
    command = args.command
    if command == "policy":
        action = args.policy_command
        command = f"policy {action}"
        if action not in FLEET_POLICY_ACTIONS:
            raise UsageError(f"{command} is not available with --aggregator (ask the node's agent)")
        if settings.agent_flag:
            raise UsageError(f"{command}: --agent and --aggregator: choose one")
        if getattr(args, "ttl", None) is not None:
            raise UsageError(
                f"{command}: --ttl is not available with --aggregator (fleet policies stay "
                "until deleted)"
            )
        if action == "delete" and args.dry_run:
            raise UsageError(f"{command}: --dry-run is not available with --aggregator")
    return settings.aggregator(command)


def _refuse_fleet_flags(args: argparse.Namespace) -> None:
    """`policy apply --selector` without --aggregator would apply to one node what was
    meant for many."""
    for flag, name in (("--selector", "selector"), ("--wait", "wait")):
        if getattr(args, name, None) is None:
            continue
        message = f"{flag} needs --aggregator"
        if os.environ.get(AGGREGATOR_ENV):
            message += f" (${AGGREGATOR_ENV} does not make policy commands fleet-wide)"
        raise UsageError(message)


def _dispatch_fleet(
    args: argparse.Namespace,
    settings: Settings,
    channel: grpc.Channel,
    documents: list[policy.Document],
    target: Target,
) -> int:
    output, timeout_s = settings.output, settings.timeout_s
    selector = fleet.parse_selector(getattr(args, "selector", None))
    if args.command == "nodes":
        statuses = fleet.parse_names(args.status, fleet.NODE_STATUSES, "--status")
        return fleet.list_nodes(
            channel, selector=selector, statuses=statuses, output=output, timeout_s=timeout_s
        )
    if args.command == "node":
        return fleet.node(
            channel, args.name, snapshot=args.snapshot, output=output, timeout_s=timeout_s
        )
    if args.command == "top":
        return fleet.top(
            channel,
            args.metric,
            entity=fleet.TOP_ENTITIES[args.entity],
            limit=args.limit,
            window_s=_duration(args.window, "--window"),
            selector=selector,
            output=output,
            timeout_s=timeout_s,
        )
    if args.command == "events":
        kinds = fleet.parse_names(args.kind, fleet.EVENT_KINDS, "--kind")
        return fleet.events(channel, kinds=kinds, selector=selector, output=output)
    if args.command == "release-kept":
        return fleet.release_kept(channel, output=output, timeout_s=timeout_s)
    wait_s = _duration(args.wait or fleet.DEFAULT_WAIT, "--wait")
    assert wait_s is not None
    if args.policy_command == "apply":
        return fleet.apply(
            channel,
            documents,
            target=target,
            selector=selector,
            wait_s=wait_s,
            dry_run=args.dry_run,
            output=output,
            timeout_s=timeout_s,
        )
    return fleet.delete(
        channel,
        args.name,
        wait_s=wait_s,
        ignore_not_found=args.ignore_not_found,
        output=output,
        timeout_s=timeout_s,
    )


def _dispatch(
    args: argparse.Namespace,
    settings: Settings,
    channel: grpc.Channel,
    documents: list[policy.Document],
) -> int:
    output, timeout_s = settings.output, settings.timeout_s
    if args.command == "telemetry":
        sections = telemetry.parse_sections(args.section)
        if args.watch:
            interval_s = _duration(args.interval, "--interval")
            return telemetry.watch(channel, sections, output=output, interval_s=interval_s)
        if args.interval is not None:
            raise UsageError("--interval needs --watch")
        return telemetry.get(channel, sections, output=output, timeout_s=timeout_s)
    if args.command == "health":
        return health.check(channel, service=args.service, timeout_s=timeout_s)
    action = args.policy_command
    if action == "apply":
        ttl = policy.parse_ttl(args.ttl)
        return policy.apply(
            channel,
            documents,
            target=settings.target,
            ttl=ttl,
            dry_run=args.dry_run,
            output=output,
            timeout_s=timeout_s,
        )
    if action == "plan":
        return policy.plan(
            channel, documents, target=settings.target, output=output, timeout_s=timeout_s
        )
    if action == "delete":
        return policy.delete(
            channel,
            args.name,
            dry_run=args.dry_run,
            output=output,
            timeout_s=timeout_s,
            ignore_not_found=args.ignore_not_found,
        )
    if action == "list":
        return policy.list_policies(channel, output=output, timeout_s=timeout_s)
    if action == "status":
        return policy.status(channel, args.name, output=output, timeout_s=timeout_s)
    ttl = policy.parse_ttl(args.ttl)
    return policy.renew(channel, args.name, ttl=ttl, output=output, timeout_s=timeout_s)


def _duration(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
