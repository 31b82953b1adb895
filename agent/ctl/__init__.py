"""`fabricctl`: the operator's client of a node agent's gRPC API (telemetry, QoS
policies, health). One module per command group; `main` parses and dispatches."""
