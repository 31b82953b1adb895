"""The configuration pieces both daemons share: bounded durations and DaemonConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.common.config import DaemonConfig, duration_within


def test_duration_within_bounds_inclusive() -> None:
    check = duration_within("100ms", "5m")
    assert check(0.1) == 0.1
    assert check(300.0) == 300.0
    with pytest.raises(ValueError, match="must be between 100ms and 5m, got 301s"):
        check(301.0)


def listener_config(**options: object) -> DaemonConfig:
    base: dict[str, object] = {
        "metrics_listen": ":9100",
        "grpc_socket": Path("/run/x.sock"),
        "grpc_listen": "127.0.0.1:0",
    }
    return DaemonConfig(**(base | options))  # type: ignore[arg-type]


def test_daemon_config_addresses() -> None:
    config = listener_config(grpc_listen=" None ")
    assert config.grpc_listen == "none" and config.grpc_address is None
    assert config.metrics_address == ("0.0.0.0", 9100)
    assert listener_config().grpc_address == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        ({"grpc_listen": "[::1]"}, "grpc_listen", "is not an address"),
        ({"grpc_allowed_identities": "ops"}, "grpc_allowed_identities", "need mTLS"),
        ({"grpc_tls_key": "/etc/hostname"}, "grpc_tls_key", "set without grpc_tls_cert"),
        ({"grpc_client_ca": "/etc/hostname"}, "grpc_client_ca", "set without grpc_tls_cert"),
        ({"log_level": "loud"}, "log_level", "must be one of"),
    ],
)
def test_daemon_config_refuses(options: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as refused:
        listener_config(**options)
    errors = refused.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert reason in errors[0]["msg"]
