"""Generated code for the protobuf package ``fabric.aggregator``; see ``agent/proto/__init__.py``."""
