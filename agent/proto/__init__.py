"""Generated protobuf and gRPC code for proto/ (package ``fabric.v1``).

Layout: ``proto/fabric/v1/telemetry.proto`` generates
``agent/proto/fabric/v1/telemetry_pb2.py`` (+ ``.pyi`` stubs from mypy-protobuf, and
``_pb2_grpc.py``/``.pyi`` for files that declare services), imported as
``from agent.proto.fabric.v1 import telemetry_pb2``.

protoc names cross-file imports after the proto path (``from fabric.v1 import x_pb2``).
Rather than putting ``agent/proto`` on ``sys.path`` (which would make ``fabric`` a second
top-level package and load every module twice under two names), ``make proto`` runs
protoc with ``-I proto`` and then rewrites those imports, and the module name protoc
gives the message classes, to the absolute ``agent.proto.fabric...`` path
(``proto/generate.py``). Descriptors keep their canonical file names
(``fabric/v1/telemetry.proto``), which is what server reflection and other clients see.

Nothing under ``agent/proto/fabric`` is edited by hand except the ``__init__.py`` files;
``tests/test_proto.py`` regenerates and fails when the committed code is stale.
"""
