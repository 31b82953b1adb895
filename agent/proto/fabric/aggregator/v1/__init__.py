"""Generated code for the protobuf package ``fabric.aggregator.v1``; see ``agent/proto/__init__.py``."""
