"""The aggregator's desired-state store, opened from its `--store` URL.

sqlite:///var/lib/fabric-aggregator/state.db   one replica (the default)
sqlite://:memory:                               tests
etcd://host:port[,host:port][?prefix=/fabric/&timeout_s=5]   several replicas
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import parse_qs

from agent.aggregator.store.base import (
    MAX_DOCUMENT_BYTES,
    Assignment,
    Change,
    ChangeKind,
    DocumentTooLarge,
    RevisionConflict,
    Store,
    StoreError,
    StoreIdentity,
    StoreNotInitialised,
)
from agent.common.addresses import HostPort, parse_host_port
from agent.common.errors import ConfigError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "Assignment",
    "Change",
    "ChangeKind",
    "DocumentTooLarge",
    "RevisionConflict",
    "Store",
    "StoreError",
    "StoreIdentity",
    "StoreNotInitialised",
    "open_store",
    "parse_store_url",
]

_SOURCE = "--store"
_PREFIX = re.compile(r"^/([A-Za-z0-9._-]+/)*$")


# A checked store URL's way to open it: create (a missing SQLite file) or not.
Opener = Callable[[bool], Store]


def open_store(url: str, *, create: bool = True) -> Store:
    """The store `url` names. ConfigError names the URL and what is wrong with it.

    Opening does not connect: the first operation does, and raises StoreError when the
    backend cannot be reached. Without `create` a SQLite file must exist already
    (`fabric-aggregator run` opens stores that `init` made, never new ones).
    """
    return parse_store_url(url)(create)


def parse_store_url(url: str) -> Opener:
    """Check `url` (ConfigError naming what is wrong) without opening anything."""
    scheme, sep, rest = url.partition("://")
    parsers: dict[str, Callable[[str, str], Opener]] = {
        "sqlite": _sqlite,
        "etcd": _etcd,
    }
    if not sep or scheme not in parsers:
        raise ConfigError(_SOURCE, url, f"scheme must be one of {', '.join(sorted(parsers))}")
    return parsers[scheme](url, rest)


def _sqlite(url: str, rest: str) -> Opener:
    if rest != ":memory:" and (
        not rest.startswith("/") or rest.endswith("/") or "?" in rest or "#" in rest
    ):
        raise ConfigError(
            _SOURCE, url, "want sqlite:///absolute/path/to/state.db or sqlite://:memory:"
        )

    def opener(create: bool) -> Store:
        from agent.aggregator.store.sqlite import SqliteStore

        return SqliteStore(url, rest, create=create)

    return opener


def _etcd(url: str, rest: str) -> Opener:
    from agent.aggregator.store.etcd import DEFAULT_PREFIX, DEFAULT_TIMEOUT_S, EtcdStore

    location, _, query = rest.partition("?")
    endpoints: list[HostPort] = []
    for endpoint in location.split(","):
        try:
            endpoints.append(parse_host_port(endpoint))
        except ValueError as exc:
            raise ConfigError(
                _SOURCE, url, f"endpoint {endpoint!r}: want host:port ({exc})"
            ) from None

    options = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    unknown = sorted(set(options) - {"prefix", "timeout_s"})
    if unknown:
        raise ConfigError(_SOURCE, url, f"unknown option {unknown[0]!r}: want prefix, timeout_s")
    prefix = options.get("prefix", [DEFAULT_PREFIX])[-1]
    if not _PREFIX.match(prefix) or prefix == "/":
        raise ConfigError(_SOURCE, url, f"prefix {prefix!r}: want /name/ (slash-delimited)")
    timeout = options.get("timeout_s", [str(DEFAULT_TIMEOUT_S)])[-1]
    if not timeout.isdigit() or int(timeout) < 1:
        raise ConfigError(_SOURCE, url, f"timeout_s {timeout!r}: want whole seconds >= 1")

    host, port = _grpc_target(url, endpoints)
    # An etcd prefix is "created" by init's store id, whatever `create` says.
    return lambda create: EtcdStore(url, host, port, prefix=prefix, timeout_s=int(timeout))


def _grpc_target(url: str, endpoints: list[HostPort]) -> tuple[str, int]:
    """The (host, port) that aetcd joins as `host:port` into one gRPC target.

    Several members become gRPC's multi-address target (`ipv4:a:p,b:p`), whose pick_first
    policy fails over between them; that syntax takes IP addresses only. For names, one DNS
    name resolving to every member does the same.
    """
    if len(endpoints) == 1:
        target = endpoints[0].target
    else:
        families: set[int] = set()
        for endpoint in endpoints:
            try:
                families.add(ipaddress.ip_address(endpoint.host).version)
            except ValueError:
                raise ConfigError(
                    _SOURCE,
                    url,
                    f"endpoint {endpoint.target}: several endpoints must be IP addresses; "
                    "for names, use one DNS name that resolves to every member",
                ) from None
        if len(families) > 1:
            raise ConfigError(_SOURCE, url, "endpoints mix IPv4 and IPv6 addresses")
        scheme = "ipv6" if families == {6} else "ipv4"
        target = f"{scheme}:{','.join(endpoint.target for endpoint in endpoints)}"
    # aetcd formats f"{host}:{port}": everything up to the last port is the "host".
    host, _, port = target.rpartition(":")
    return host, int(port)
