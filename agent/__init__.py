"""fabric-agent: per-host telemetry and traffic control for GPU cluster fabrics."""

__version__ = "0.1.0"
