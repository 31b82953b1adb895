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
from pathlib import Path
from typing import Any

from agent import __version__
from agent.common.addresses import format_host_port
from agent.common.config import configure_logging
from agent.common.errors import ConfigError, ListenError
from agent.common.exits import ExitCode
from agent.node.cli import policy as policy_cli
from agent.node.cli.render import render_text
from agent.node.collectors.base import SharedResources
from agent.node.config import AgentConfig, load_config
from agent.node.exporter import ExpositionCache
from agent.node.runtime import Agent, build_collectors
from agent.node.sampler import Sampler

log = logging.getLogger("agent")

# Flags that map one-to-one onto AgentConfig fields (dest == field name).
_CONFIG_FLAGS: dict[str, str] = {
    "--interval": "sampling interval, e.g. 500ms, 1s (100ms..60s; default 1s)",
    "--metrics-listen": "HOST:PORT of the Prometheus endpoint (default 0.0.0.0:9478)",
    "--node-name": "name this node reports under (default: host name)",
    "--nvml-library": "path of libnvidia-ml.so.1 when it is not on the loader path",
    "--sysfs-root": "root of sysfs (default /sys)",
    "--interfaces": "comma-separated interface globs, '!' excludes "
    "(default *,!lo,!veth*,!docker*,!cni*,!ifb*)",
    "--state-dir": "directory for persistent state (default /var/lib/fabric-agent)",
    "--collectors": "comma-separated collectors to run (default: all)",
    "--collector-timeout-ratio": "share of the interval a collector may take before the "
    "tick goes on without it (default 0.8)",
    "--log-level": "debug, info, warning or error (default info)",
    "--grpc-socket": "unix socket of the gRPC API (default /run/fabric-agent/agent.sock)",
    "--grpc-socket-group": "group that may use the API socket (default: the agent's)",
    "--grpc-listen": "HOST:PORT of the gRPC API on TCP, or 'none' for no TCP listener "
    "(default 0.0.0.0:9479; read-only unless mTLS and allowed identities are set)",
    "--grpc-tls-cert": "PEM server certificate for TLS on --grpc-listen (with --grpc-tls-key; "
    "re-read on SIGHUP)",
    "--grpc-tls-key": "PEM private key of --grpc-tls-cert (unencrypted)",
    "--grpc-client-ca": "PEM CA bundle of client certificates: the TCP listener then "
    "requires one (mTLS)",
    "--grpc-allowed-identities": "comma-separated client certificate identities (subject CN, "
    "DNS or URI SAN) that may change QoS over TCP; needs --grpc-client-ca (default: none)",
    "--policy-dir": "directory of QoS policy files (default /etc/fabric-agent/policies)",
    "--reconcile-interval": "how often QoS is compared with the kernel (default 5s)",
    "--on-exit": "keep (default) or remove the agent's qdiscs and tables on exit",
    "--take-over": "true to replace root qdiscs the agent does not own (default false)",
    "--cgroup-root": "cgroup2 mount point (default: detected)",
    "--aggregator": "HOST:PORT of the fleet aggregator to register with (default: none)",
    "--labels": "this node's labels for fleet policy selectors, e.g. pool=training,rack=r7",
    "--aggregator-tls-ca": "PEM CA of the aggregator's certificate (TLS to the aggregator)",
    "--aggregator-tls-cert": "PEM client certificate naming this node (mTLS to the aggregator)",
    "--aggregator-tls-key": "PEM private key of --aggregator-tls-cert",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file; flags override its values")
    for flag, help_text in _CONFIG_FLAGS.items():
        parser.add_argument(flag, help=help_text, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fabric-agent", description="GPU cluster fabric telemetry and traffic control agent."
    )
    parser.add_argument("--version", action="version", version=f"fabric-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent in the foreground")
    _add_config_flags(run)
    sample = commands.add_parser("sample", help="take a sample and print it")
    _add_config_flags(sample)
    sample.add_argument("--once", action="store_true", help="print one snapshot and exit")
    sample.add_argument(
        "--format", choices=["json", "text", "prometheus"], default="text", help="default text"
    )
    policy_cli.add_parser(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag in _CONFIG_FLAGS:
        key = flag.removeprefix("--").replace("-", "_")
        value = getattr(args, key)
        if value is not None and key == "collectors":
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        values[key] = value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "policy":
        return policy_cli.run(args)
    try:
        config = load_config(args.config, _overrides(args))
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
