"""Host and port, one parser for every program: each accepted and refused form."""

from __future__ import annotations

import re

import pytest

from agent.common.addresses import (
    HostPort,
    check_host,
    format_host_port,
    parse_host_port,
    parse_listen_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9478", HostPort("127.0.0.1", 9478)),
        ("0.0.0.0:0", HostPort("0.0.0.0", 0)),
        (":9479", HostPort("0.0.0.0", 9479)),
        ("[::]:9479", HostPort("::", 9479)),
        ("[fd00::1]:65535", HostPort("fd00::1", 65535)),
        ("localhost:9100", HostPort("localhost", 9100)),
        ("gpu-node-01.rack7.example:9100", HostPort("gpu-node-01.rack7.example", 9100)),
        (" 10.0.0.1:80 ", HostPort("10.0.0.1", 80)),
    ],
)
def test_listen_addresses(text: str, expected: HostPort) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agg.example:9480", HostPort("agg.example", 9480)),
        ("10.0.0.1:1", HostPort("10.0.0.1", 1)),
        ("[fd00::1]:9479", HostPort("fd00::1", 9479)),
        ("etcd-0:2379", HostPort("etcd-0", 2379)),
    ],
)
def test_dial_addresses(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost", "is not an address (use HOST:PORT)"),
        ("", "is not an address"),
        ("host:", "is not an address"),
        ("host:http", "is not an address"),
        ("host:-1", "is not an address"),
        ("host:1e3", "is not an address"),
        ("127.0.0.1:70000", "port 70000 is out of range 0-65535"),
        ("fd00::1:9479", "an IPv6 address goes in brackets"),
        ("[fd00::1:9479", "'[fd00::1' is not an IP address or host name"),
        ("[10.0.0.1]:80", "is not an IPv6 address in brackets"),
        ("[nope]:80", "is not an IPv6 address in brackets"),
        ("under_score:80", "is not an IP address or host name"),
        ("-lead.example:80", "is not an IP address or host name"),
        ("trail-.example:80", "is not an IP address or host name"),
        ("a..b:80", "is not an IP address or host name"),
        ("1.2.3:80", "is not an IP address or host name"),
        ("256.1.1.1:80", "is not an IP address or host name"),
        (f"{'a' * 64}.example:80", "is not an IP address or host name"),
    ],
)
def test_refused_listen_addresses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_listen_address(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (":9480", "has no host"),
        ("host:0", "port 0 is out of range 1-65535"),
        ("host:65536", "out of range 1-65535"),
        ("node-1", "is not an address"),
        ("::1:80", "an IPv6 address goes in brackets"),
    ],
)
def test_refused_dial_addresses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_host_port(text)


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="is not an address"):
        parse_listen_address(9478)


def test_host_names_up_to_253_characters() -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert check_host(longest) == longest
    with pytest.raises(ValueError):
        check_host(longest + "c")


def test_ipv6_targets_get_brackets() -> None:
    assert format_host_port("fd00::1", 9479) == "[fd00::1]:9479"
    assert format_host_port("10.0.0.1", 9479) == "10.0.0.1:9479"
    assert format_host_port("node-1", 9479) == "node-1:9479"
    assert parse_host_port("[fd00::1]:9479").target == "[fd00::1]:9479"
    assert parse_listen_address(":0").target == "0.0.0.0:0"
