"""One module per telemetry source; each registers itself with `base.register`."""
