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
