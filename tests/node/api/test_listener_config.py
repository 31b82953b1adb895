"""The TCP listener's options: defaults, parsing, and the errors that refuse an unsafe or
broken TLS setup before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.common.listeners import TcpSettings
from agent.common.security import AllowedClients, ReadOnly
from agent.node.cli.main import main
from agent.node.config import AgentConfig, load_config
from tests.pki import Pki


def flags(**values: object) -> dict[str, object]:
    return values


def tls(pki: Pki, **extra: object) -> dict[str, object]:
    return flags(grpc_tls_cert=str(pki.server.cert), grpc_tls_key=str(pki.server.key), **extra)


def test_defaults_listen_on_9479_without_tls() -> None:
    config = AgentConfig()

    assert config.grpc_address == ("0.0.0.0", 9479)
    assert config.grpc_tls_cert is None and config.grpc_client_ca is None
    assert config.grpc_allowed_identities == ()
    assert isinstance(TcpSettings.from_config(config).authorizer(), ReadOnly)  # type: ignore[union-attr]


@pytest.mark.parametrize("off", ["none", "None", " NONE "])
def test_none_turns_tcp_off(off: str) -> None:
    config = load_config(None, {"grpc_listen": off})

    assert config.grpc_address is None
    assert TcpSettings.from_config(config) is None


def test_port_zero_is_allowed() -> None:
    assert AgentConfig(grpc_listen="127.0.0.1:0").grpc_address == ("127.0.0.1", 0)


def test_allowed_identities_from_flag_and_yaml(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"grpc_tls_cert: {pki.server.cert}\ngrpc_tls_key: {pki.server.key}\n"
        f"grpc_client_ca: {pki.ca.cert}\n"
        "grpc_allowed_identities: [fabric-aggregator, 'spiffe://c/ns/f/sa/s']\n"
    )

    from_yaml = load_config(path, {})
    from_flag = load_config(path, {"grpc_allowed_identities": " a ,b,, "})

    assert from_yaml.grpc_allowed_identities == ("fabric-aggregator", "spiffe://c/ns/f/sa/s")
    assert from_flag.grpc_allowed_identities == ("a", "b")
    settings = TcpSettings.from_config(from_yaml)
    assert settings is not None and settings.tls is not None
    assert settings.tls.client_ca == pki.ca.cert
    authorizer = settings.authorizer()
    assert isinstance(authorizer, AllowedClients)
    assert authorizer.identities == {"fabric-aggregator", "spiffe://c/ns/f/sa/s"}


def test_tls_without_client_ca_is_read_only(pki: Pki) -> None:
    settings = TcpSettings.from_config(load_config(None, tls(pki)))

    assert settings is not None and settings.tls is not None
    assert isinstance(settings.authorizer(), ReadOnly)


@pytest.mark.parametrize(
    ("case", "key", "reason"),
    [
        ("cert without key", "grpc_tls_key", "missing: grpc_tls_cert is set"),
        ("key without cert", "grpc_tls_key", "set without grpc_tls_cert"),
        ("client CA without cert", "grpc_client_ca", "set without grpc_tls_cert"),
        ("identities without TLS", "grpc_allowed_identities", "set without grpc_client_ca"),
        ("identities with TLS only", "grpc_allowed_identities", "set without grpc_client_ca"),
        ("TLS with TCP off", "grpc_tls_cert", "grpc_listen is none"),
        ("garbage cert", "grpc_tls_cert", "not a PEM certificate file"),
        ("missing cert", "grpc_tls_cert", "cannot read"),
        ("key of another cert", "grpc_tls_key", "not an unencrypted PEM private key"),
        ("unreadable key", "grpc_tls_key", "cannot read"),
        ("garbage client CA", "grpc_client_ca", "not a PEM certificate file"),
    ],
)
def test_unsafe_or_broken_tls_is_a_config_error(
    pki: Pki, tmp_path: Path, case: str, key: str, reason: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    cert, key_file, ca = str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)
    overrides = {
        "cert without key": flags(grpc_tls_cert=cert),
        "key without cert": flags(grpc_tls_key=key_file),
        "client CA without cert": flags(grpc_client_ca=ca),
        "identities without TLS": flags(grpc_allowed_identities="fabric-aggregator"),
        "identities with TLS only": tls(pki, grpc_allowed_identities=["fabric-aggregator"]),
        "TLS with TCP off": tls(pki, grpc_listen="none"),
        "garbage cert": flags(grpc_tls_cert=str(garbage), grpc_tls_key=key_file),
        "missing cert": flags(grpc_tls_cert=str(tmp_path / "nope.crt"), grpc_tls_key=key_file),
        "key of another cert": flags(grpc_tls_cert=cert, grpc_tls_key=str(pki.other.key)),
        "unreadable key": flags(grpc_tls_cert=cert, grpc_tls_key=str(tmp_path)),
        "garbage client CA": tls(pki, grpc_client_ca=str(garbage)),
    }[case]

    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)

    assert caught.value.source == "command line"
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_config_file_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"grpc_client_ca: {pki.ca.cert}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, {})

    assert (caught.value.source, caught.value.key) == (str(path), "grpc_client_ca")


def test_hand_built_settings_refuse_identities_without_mtls() -> None:
    with pytest.raises(ValueError, match="mTLS"):
        TcpSettings(("127.0.0.1", 0), None, frozenset({"fabric-aggregator"}))


def test_cli_exits_2_naming_the_option(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--grpc-allowed-identities", "fabric-aggregator",
                 "--state-dir", str(tmp_path)])  # fmt: skip

    assert code == 2
    assert "command line: grpc_allowed_identities: set without grpc_client_ca" in (
        capsys.readouterr().err
    )
