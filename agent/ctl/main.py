"""`fabricctl`: telemetry and QoS policies of a node's agent over its gRPC API.

    fabricctl [--agent unix:///run/fabric-agent/agent.sock | HOST:PORT] telemetry [--watch]
    fabricctl policy apply|plan -f FILE [-f FILE...] [--ttl 1h] [--dry-run]
    fabricctl policy delete|status|renew NAME, fabricctl policy list
    fabricctl health

Output is a table by default; `-o json` prints proto3 JSON: one indented object for a
single response, one object per line for streams (`--watch`) and per document (`apply`,
`plan`). Global options may also follow the command.

Exit codes: 0 ok; 1 changes (`policy plan`) or not serving (`health`); 2 bad input or
refused (an invalid document, a failed precondition, no such policy, not allowed);
3 the agent is unreachable or did not answer within --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from agent import __version__
from agent.config import parse_duration
from agent.ctl import health, policy, telemetry
from agent.ctl.client import (
    DEFAULT_AGENT,
    DEFAULT_TIMEOUT_S,
    EXIT_INVALID,
    EXIT_OK,
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
        "--timeout",
        default=suppress,
        metavar="DURATION",
        help=f"deadline of each call, e.g. 500ms, 10s (default {DEFAULT_TIMEOUT_S:g}s)",
    )
    common.add_argument(
        "-o", "--output", choices=FORMATS, default=suppress, help="table (default) or json"
    )
    tls = common.add_argument_group("mTLS (HOST:PORT targets)")
    tls.add_argument("--tls-ca", default=suppress, metavar="FILE", help="CA of the agent's cert")
    tls.add_argument("--tls-cert", default=suppress, metavar="FILE", help="client certificate")
    tls.add_argument("--tls-key", default=suppress, metavar="FILE", help="client private key")
    tls.add_argument(
        "--tls-server-name",
        default=suppress,
        metavar="NAME",
        help="name to check the agent's certificate against (default: the target's host)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Telemetry and QoS policies of a fabric-agent.",
        epilog="exit codes: 0 ok, 1 changes (plan) or not serving (health), "
        "2 bad input or refused, 3 agent unreachable",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tele = commands.add_parser(
        "telemetry", parents=[common], help="the agent's latest snapshot, or a stream of them"
    )
    tele.add_argument(
        "--section",
        metavar="S,...",
        help=f"only these sections: {','.join(telemetry.SECTIONS)} (default all)",
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
    actions.add_parser("list", parents=[common], help="every policy, from files and the API")
    status = actions.add_parser(
        "status", parents=[common], help="a policy's classes: rate, ceil, throughput, drops"
    )
    status.add_argument("name", metavar="NAME")
    renew = actions.add_parser("renew", parents=[common], help="renew an API policy's lease")
    renew.add_argument("name", metavar="NAME")
    renew.add_argument("--ttl", metavar="DURATION", help="new TTL (default: the one applied)")
    return parser


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


def _path(args: argparse.Namespace, name: str) -> Path | None:
    value = getattr(args, name, None)
    return Path(value) if value else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    where = getattr(args, "name", None) or PROG
    target: Target | None = None
    try:
        settings = Settings(args)
        target = settings.target
        # Documents are read and checked before connecting: bad input never waits on
        # an unreachable agent.
        documents = policy.load_documents(args.files) if hasattr(args, "files") else []
        with open_channel(settings.target, settings.tls) as channel:
            return _dispatch(args, settings, channel, documents)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except grpc.RpcError as exc:
        assert target is not None
        failure = failure_from_error(exc)
        for line in describe_failure(failure, where, target):
            print(line, file=sys.stderr)
        return failure.exit_code
    except BrokenPipeError:
        # `fabricctl telemetry --watch | head`: the reader is done, so are we.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


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
