"""Host and port: the one place that decides what each is, for every program.

Listen addresses (`metrics_listen`, `grpc_listen`) and dial addresses (the agent's
`aggregator`, fabricctl's `--agent`/`--aggregator`, the aggregator's etcd endpoints) are
`HOST:PORT` with an IPv6 address in brackets (`[fd00::1]:9479`). A host is an IPv4
address, a bracketed IPv6 address, or a host name of dot-separated labels (RFC 1123:
letters, digits and inner hyphens, up to 63 characters each). Listening also takes
`:PORT` (every address) and port 0 (the kernel picks one); dialling needs both a host
and a port from 1 to 65535.

Errors are ValueError with a reason that names the value; callers add where it came
from (a config key, a flag, a store URL).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# Where ':PORT' listens: every IPv4 address, as the daemons' defaults spell it.
ANY_HOST = "0.0.0.0"
MAX_PORT = 65535

_PORT = re.compile(r"[0-9]+")
_HOST_NAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_NAME_LABEL}(\.{_HOST_NAME_LABEL})*")
_MAX_HOST_NAME = 253


class HostPort(NamedTuple):
    """A checked address: `host` is a name or an IP address (IPv6 without brackets)."""

    host: str
    port: int

    @property
    def target(self) -> str:
        """`host:port` as gRPC binds and dials it and logs show it."""
        return format_host_port(self.host, self.port)


def format_host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (its own colons would swallow the port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen_address(value: object) -> HostPort:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (every address); port 0 lets the kernel pick."""
    host, port = _split(value)
    _check_port(port, 0)
    return HostPort(check_host(host) if host else ANY_HOST, port)


def parse_host_port(value: object) -> HostPort:
    """'HOST:PORT' or '[v6]:PORT' of a peer to dial: a host and a port 1-65535."""
    host, port = _split(value)
    if not host:
        raise ValueError(f"{value!r} has no host (use HOST:PORT)")
    _check_port(port, 1)
    return HostPort(check_host(host), port)


def check_host(text: str) -> str:
    """The host of `text` (an IPv4 address, '[IPv6]' or a host name), brackets removed."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv6 address in brackets") from None
        return inner
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        # An all-digit last label is a mistyped IPv4 address (RFC 1123 section 2.1).
        numeric = text.rpartition(".")[2].isdigit()
        if len(text) > _MAX_HOST_NAME or not _HOST_NAME.fullmatch(text) or numeric:
            raise ValueError(f"{text!r} is not an IP address or host name") from None
        return text
    if address.version == 6:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets ([{text}]:PORT)")
    return text


def _split(value: object) -> tuple[str, int]:
    """(host text, port) at the last colon; the port is digits, the host may be empty."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address (use HOST:PORT)")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not _PORT.fullmatch(port_text):
        raise ValueError(f"{value!r} is not an address (use HOST:PORT)")
    if ":" in host and not host.startswith("["):
        # 'fd00::1:9479' is port 9479 of fd00::1 or fd00::1:9479 with no port: no guessing.
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets ([addr]:PORT)")
    return host, int(port_text)


def _check_port(port: int, lowest: int) -> None:
    if not lowest <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range {lowest}-{MAX_PORT}")
