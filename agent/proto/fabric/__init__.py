"""Generated code for the protobuf package ``fabric``; see ``agent/proto/__init__.py``."""
