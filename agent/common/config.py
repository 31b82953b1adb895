"""Configuration machinery every program shares: durations, listen addresses (parsed by
agent/common/addresses.py), the options both daemons have (DaemonConfig: the gRPC
listeners and their TLS rules, metrics endpoint, log level), logging, and loading a
validated model from a YAML file and flags.

Sources, later ones winning: a model's defaults, a YAML file (`--config`), flags. YAML
keys are the flag names with `_` for `-`. Every error names its source (file or `command
line`) and key.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from agent.common.addresses import HostPort, parse_listen_address
from agent.common.errors import ConfigError
from agent.common.files import FileTooLarge, NotRegularFile, read_regular
from agent.common.policy.bounded import YamlLimitError, load_yaml_documents
from agent.common.policy.limits import MAX_DOCUMENT_BYTES, format_bytes
from agent.common.security import TlsError, read_certificates, read_key_for

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'250ms', '1s', '1.5m', or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_S[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 1s, 2m)")


def _identities(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of client identities or a comma-separated string")
    return tuple(str(name).strip() for name in value if str(name).strip())


Duration = Annotated[float, BeforeValidator(parse_duration)]


def duration_within(low: str, high: str) -> Callable[[float], float]:
    """A check that a Duration lies within [low, high], both written as the message shows
    them ('100ms', '5m'): `Annotated[Duration, AfterValidator(duration_within(...))]`."""
    low_s, high_s = parse_duration(low), parse_duration(high)

    def check(value: float) -> float:
        if not low_s <= value <= high_s:
            raise ValueError(f"must be between {low} and {high}, got {value:g}s")
        return value

    return check


# grpc_listen's value that turns the TCP listener off.
GRPC_LISTEN_OFF = "none"


def configure_logging(level: str) -> None:
    """The daemons' log format, to stderr (the journal adds its own timestamps)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


Identities = Annotated[tuple[str, ...], BeforeValidator(_identities)]


def tls_check(check: Callable[[], object]) -> None:
    """Run a TLS file check, its error as the field's validation error."""
    try:
        check()
    except TlsError as exc:
        raise ValueError(exc.reason) from exc


class DaemonConfig(BaseModel):
    """The options both daemons have, with one set of rules: their gRPC listeners (the
    unix socket, TCP and its TLS), metrics endpoint and log level. AgentConfig and
    AggregatorConfig extend it and give the addresses their own defaults.

    The TLS options are checked in field order, each against the ones before it, so an
    error names the option to fix. A field that failed is missing from `info.data`; the
    checks that need it are skipped (its own error is reported).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Prometheus endpoint, HOST:PORT.
    metrics_listen: str
    # The gRPC unix socket (mode 0660) for local hooks and fabricctl, and its group.
    grpc_socket: Path
    grpc_socket_group: str | None = None
    # The gRPC API on TCP for remote clients, or 'none' for no TCP listener. Without mTLS
    # it serves reads only (and, on the aggregator, agents' streams); mutations over TCP
    # need the four grpc_tls/client options below.
    grpc_listen: str
    # PEM server certificate (chain) and its unencrypted key for TLS on grpc_listen;
    # both or neither. Re-read on SIGHUP; new connections get the new certificate.
    grpc_tls_cert: Path | None = Field(default=None, validate_default=True)
    grpc_tls_key: Path | None = Field(default=None, validate_default=True)
    # PEM CA bundle that signs client certificates: with it the TCP listener requires a
    # client certificate from this CA (mTLS) on every connection. Needs grpc_tls_cert.
    grpc_client_ca: Path | None = Field(default=None, validate_default=True)
    # Client identities that may mutate over TCP: a certificate's subject CN or one of
    # its DNS or URI SANs. Needs grpc_client_ca; empty means no mutations over TCP.
    grpc_allowed_identities: Identities = Field(default=(), validate_default=True)
    log_level: str = "info"

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator("grpc_listen")
    @classmethod
    def _check_grpc_listen(cls, value: str) -> str:
        if value.strip().lower() == GRPC_LISTEN_OFF:
            return GRPC_LISTEN_OFF
        parse_listen_address(value)
        return value

    @field_validator("grpc_tls_cert")
    @classmethod
    def _check_tls_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if info.data.get("grpc_listen") == GRPC_LISTEN_OFF:
            raise ValueError("set, but grpc_listen is none: TLS is for the TCP listener")
        tls_check(lambda: read_certificates(value, "grpc_tls_cert"))
        return value

    @field_validator("grpc_tls_key")
    @classmethod
    def _check_tls_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "grpc_tls_cert" not in info.data:
            return value
        cert = info.data["grpc_tls_cert"]
        if cert is None and value is not None:
            raise ValueError("set without grpc_tls_cert: set both or neither")
        if cert is not None and value is None:
            raise ValueError("missing: grpc_tls_cert is set; set both or neither")
        if cert is not None and value is not None:
            tls_check(lambda: read_key_for(cert, value))
        return value

    @field_validator("grpc_client_ca")
    @classmethod
    def _check_client_ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None or "grpc_tls_cert" not in info.data:
            return value
        if info.data["grpc_tls_cert"] is None:
            raise ValueError(
                "set without grpc_tls_cert and grpc_tls_key: client certificates are "
                "checked in the TLS handshake, which needs a server certificate"
            )
        tls_check(lambda: read_certificates(value, "grpc_client_ca"))
        return value

    @field_validator("grpc_allowed_identities")
    @classmethod
    def _check_allowed_identities(
        cls, value: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        if value and info.data.get("grpc_client_ca", "failed") is None:
            # Without verified client certificates an identity is only a claim.
            raise ValueError(
                "set without grpc_client_ca: mutations over TCP need mTLS (grpc_tls_cert, "
                "grpc_tls_key and grpc_client_ca)"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @property
    def metrics_address(self) -> HostPort:
        return parse_listen_address(self.metrics_listen)

    @property
    def grpc_address(self) -> HostPort | None:
        """Where the TCP listener binds; None for grpc_listen: none."""
        if self.grpc_listen == GRPC_LISTEN_OFF:
            return None
        return parse_listen_address(self.grpc_listen)


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_model(model: type[ModelT], path: Path | None, overrides: Mapping[str, Any]) -> ModelT:
    """Build a config model from an optional YAML file and flag overrides (None = unset);
    ConfigError names the source (file or command line), the key and the reason."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            documents = load_yaml_documents(read_regular(path, MAX_DOCUMENT_BYTES).decode())
        except NotRegularFile:
            raise ConfigError(source, "-", "cannot read: not a regular file") from None
        except FileTooLarge:
            raise ConfigError(source, "-", f"over {format_bytes(MAX_DOCUMENT_BYTES)}") from None
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(source, "-", f"not UTF-8: {exc.reason}") from exc
        except YamlLimitError as exc:
            raise ConfigError(source, exc.path or "-", f"{exc.reason} ({exc.mark})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(source, "-", f"not valid YAML: {exc}") from exc
        if len(documents) > 1:
            raise ConfigError(source, "-", "holds several YAML documents; one is expected")
        loaded = documents[0] if documents and documents[0] is not None else {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, "-", "must be a mapping of option: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "-"
            where = "command line" if key.split(".")[0] in flags else source
            reason = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                reason = "unknown option"
            problems.append(ConfigError(where, key, reason))
        first = problems[0]
        if len(problems) == 1:
            raise first from None
        raise ConfigError(
            first.source, first.key, "; ".join([first.reason, *(str(p) for p in problems[1:])])
        ) from None
