"""Configuration: defaults, YAML and flags, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common.config import parse_duration
from agent.common.errors import ConfigError
from agent.node.config import AgentConfig, interface_selected, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = AgentConfig()
    assert config.interval == 1.0
    assert config.metrics_address == ("0.0.0.0", 9478)
    assert config.sysfs_root == Path("/sys")
    assert config.collector_timeout_s == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "seconds"), [("100ms", 0.1), ("1s", 1.0), ("1.5m", 90.0), (2, 2.0), ("30", 30.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_yaml_then_flags_win(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: 2s\nnode_name: gpu-a17\nmetrics-listen: 127.0.0.1:9100\n")

    config = load_config(path, {"interval": "500ms", "node_name": None})

    assert config.interval == 0.5
    assert config.node_name == "gpu-a17"
    assert config.metrics_address == ("127.0.0.1", 9100)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("intervall: 1s\n", "intervall", "unknown option"),
        ("interval: 5 parsecs\n", "interval", "is not a duration"),
        ("interval: 90s\n", "interval", "between 100ms and 60s"),
        ("metrics_listen: localhost\n", "metrics_listen", "is not an address"),
        ("metrics_listen: 127.0.0.1:70000\n", "metrics_listen", "out of range"),
        ("log_level: loud\n", "log_level", "must be one of"),
        ("- a\n- b\n", "-", "must be a mapping"),
        ("interval: [1\n", "-", "not valid YAML"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, {})

    assert caught.value.source == str(path)
    assert caught.value.key == key
    assert reason in str(caught.value)
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_bad_flag_names_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: 2s\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"interval": "0"})
    assert caught.value.source == "command line"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", {})


def test_interface_patterns() -> None:
    defaults = AgentConfig().interfaces
    assert interface_selected(defaults, "eth0")
    assert interface_selected(defaults, "ib0")
    for name in ("lo", "veth12ab", "docker0", "cni0", "ifb-eth0"):
        assert not interface_selected(defaults, name)
    assert interface_selected(("eth*",), "eth3")
    assert not interface_selected(("eth*",), "ens1")
    assert interface_selected(("!bond*",), "ens1")
    assert AgentConfig(interfaces="eth*, !eth9").interfaces == ("eth*", "!eth9")


def test_labels_and_aggregator_from_flags_and_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("aggregator: agg.example:9480\nlabels:\n  pool: training\n  gpus: 8\n")

    from_file = load_config(path, {})
    from_flags = load_config(None, {"labels": "pool=training, rack=r7", "aggregator": "none"})

    assert from_file.aggregator == "agg.example:9480"
    assert from_file.labels == {"pool": "training", "gpus": "8"}
    assert from_flags.labels == {"pool": "training", "rack": "r7"}
    assert from_flags.aggregator is None


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"labels": "pool"}, "labels", "want key=value"),
        ({"labels": "pool=a b"}, "labels", "up to 63 letters"),
        ({"labels": "-x=1"}, "labels", "label key"),
        ({"aggregator": "agg:0"}, "aggregator", "port 0"),
        ({"aggregator_tls_ca": "/etc/hostname"}, "aggregator_tls_ca", "set without aggregator"),
    ],
)
def test_bad_fleet_options_name_the_option(
    overrides: dict[str, str], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert caught.value.key == key
    assert reason in caught.value.reason
