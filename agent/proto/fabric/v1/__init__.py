"""Generated code for the protobuf package ``fabric.v1``; see ``agent/proto/__init__.py``."""
