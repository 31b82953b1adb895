"""Errors of the node agent's collectors and sources."""

from agent.common.errors import FabricError


class CollectorError(FabricError):
    """A collector could not produce its samples; the message says which device and why."""


class SourceUnavailableError(CollectorError):
    """The collector's source is absent (no NVIDIA driver on this node). The source logs
    this once itself; the framework still reports the collector as failed, quietly."""
