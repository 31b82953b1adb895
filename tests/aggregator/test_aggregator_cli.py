"""`fabric-aggregator run`: its configuration and how it fails to start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.aggregator.config import AggregatorConfig
from agent.common.config import load_model
from agent.common.errors import ConfigError
from tests import ROOT
from tests.aggregator.processes import init_store
from tests.conftest import free_port


def test_defaults_are_the_documented_ports_and_store() -> None:
    config = AggregatorConfig()

    assert config.grpc_address == ("0.0.0.0", 9480)
    assert config.metrics_address == ("0.0.0.0", 9481)
    assert config.store == "sqlite:///var/lib/fabric-aggregator/state.db"
    assert config.liveness.stale_after_s == 3.0
    assert config.liveness.gone_after_s == 60.0


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"store": "redis://x"}, "store", "scheme must be one of"),
        ({"store": "etcd://a:1,b:2"}, "store", "must be IP addresses"),
        ({"gone_after": "2s"}, "-", "must be longer than stale after 3s"),
        ({"stale_after_missed": "0"}, "stale_after_missed", "greater than or equal to 1"),
        (
            {"grpc_allowed_identities": "ops"},
            "grpc_allowed_identities",
            "set without grpc_client_ca",
        ),
        ({"summary_interval": "10m"}, "summary_interval", "between 100ms and 5m"),
    ],
)
def test_bad_options_name_the_option(overrides: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_model(AggregatorConfig, None, overrides)
    assert caught.value.key == key
    assert (
        reason in caught.value.reason or reason.replace("needs", "without") in caught.value.reason
    )


def run_aggregator(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.aggregator.main", "run",
         "--grpc-socket", str(tmp_path / "a.sock"),
         "--metrics-listen", f"127.0.0.1:{free_port()}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    result = run_aggregator(tmp_path, "--gone-after", "1s")

    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "gone_after" in result.stderr


def test_an_unreadable_store_exits_1_before_serving(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'missing' / 'state.db'}"

    result = run_aggregator(tmp_path, "--store", store, "--grpc-listen", "127.0.0.1:0")

    assert result.returncode == 1
    assert "state.db" in result.stderr
    assert not (tmp_path / "a.sock").exists()


def test_a_taken_port_exits_1(tmp_path: Path) -> None:
    init_store(f"sqlite://{tmp_path / 'state.db'}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_aggregator(
            tmp_path,
            "--store", f"sqlite://{tmp_path / 'state.db'}",
            "--grpc-listen", f"127.0.0.1:{port}",
        )  # fmt: skip

    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
