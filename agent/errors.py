"""Typed errors, mapped to exit codes (and later gRPC status) at the edge."""


class FabricError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(FabricError):
    """Configuration is invalid; the message names the source (file or flag) and the key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


class ListenError(FabricError):
    """A listener could not bind (address in use, permission denied)."""


class CollectorError(FabricError):
    """A collector could not produce its samples; the message says which device and why."""


class SourceUnavailableError(CollectorError):
    """The collector's source is absent (no NVIDIA driver on this node). The source logs
    this once itself; the framework still reports the collector as failed, quietly."""
