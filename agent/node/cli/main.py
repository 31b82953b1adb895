"""`fabric-agent`: run the daemon, or take one sample and print it.

Exit codes (agent/common/exits.py): 0 ok, 1 runtime failure (a port in use), 2 bad input
(config, flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from agent import __version__
from agent.common.addresses import format_host_port
from agent.common.config import configure_logging
from agent.common.errors import ConfigError, ListenError
from agent.common.exits import ExitCode
from agent.node.cli import policy as policy_cli
from agent.node.cli.flags import add_config_flags, config_overrides
from agent.node.cli.render import render_text
from agent.node.collectors.base import SharedResources
from agent.node.config import AgentConfig, load_config
from agent.node.exporter import ExpositionCache
from agent.node.runtime import Agent, build_collectors
from agent.node.sampler import Sampler

log = logging.getLogger("agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabric-agent", description="GPU cluster fabric telemetry and traffic control agent."
    )
    parser.add_argument("--version", action="version", version=f"fabric-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent in the foreground")
    add_config_flags(run)
    sample = commands.add_parser("sample", help="take a sample and print it")
    add_config_flags(sample)
    sample.add_argument("--once", action="store_true", help="print one snapshot and exit")
    sample.add_argument(
        "--format", choices=["json", "text", "prometheus"], default="text", help="default text"
    )
    policy_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "policy":
        return policy_cli.run(args)
    try:
        config = load_config(args.config, config_overrides(args))
    except ConfigError as exc:
        print(f"fabric-agent: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    configure_logging(config.log_level)
    try:
        if args.command == "run":
            return _run(config)
        return _sample(config, once=args.once, output=args.format)
    except ConfigError as exc:
        print(f"fabric-agent: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    except ListenError as exc:
        print(f"fabric-agent: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


def _run(config: AgentConfig) -> int:
    agent = Agent(config)
    try:
        server = agent.start_metrics()
        agent.start_api()
        host, _ = config.metrics_address
        log.info(
            "fabric-agent %s on node %s: metrics at http://%s/metrics, API at unix:%s, "
            "sampling every %gs, collectors %s, state in %s",
            __version__,
            config.node_name,
            format_host_port(host, server.port),
            config.grpc_socket,
            config.interval,
            ", ".join(c.name for c in agent.sampler.collectors),
            config.state_dir.resolve(),
        )
        agent.install_signal_handlers()
        agent.run()
    finally:
        agent.close()
    return ExitCode.OK


def _sample(config: AgentConfig, *, once: bool, output: str) -> int:
    shared = SharedResources()
    collectors = build_collectors(config, shared)
    sampler = Sampler(
        collectors,
        node_name=config.node_name,
        interval_s=config.interval,
        timeout_s=config.collector_timeout_s,
    )
    cache = ExpositionCache(collectors)
    try:
        while True:
            started = time.monotonic()
            snapshot = sampler.sample()
            if output == "json":
                print(json.dumps(snapshot.to_dict(), indent=2), flush=True)
            elif output == "prometheus":
                sys.stdout.write(cache.update(snapshot).body.decode())
                sys.stdout.flush()
            else:
                print(render_text(snapshot), flush=True)
            if once:
                return ExitCode.OK
            time.sleep(max(0.0, config.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return ExitCode.OK
    finally:
        sampler.close()
        shared.close()
