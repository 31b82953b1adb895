"""Regenerate the Python code for proto/: ``make proto`` runs this module, and
tests/test_proto.py calls ``generate()`` to check that the committed code is current.

protoc is the pinned grpcio-tools (``python -m grpc_tools.protoc`` of the running
interpreter) with the mypy-protobuf plugins beside it, so the output depends only on the
versions pinned in pyproject.toml. A developer tool, not used by the agent at run time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
OUT_ROOT = REPO_ROOT / "agent" / "proto"
# The Python package that OUT_ROOT is: generated imports are made absolute under it.
OUT_PACKAGE = "agent.proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class ProtoGenerationError(RuntimeError):
    """protoc or a plugin failed, or its output is not in the shape this module expects."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def generated_files(out_root: Path) -> dict[str, bytes]:
    """Generated files under out_root by their POSIX path relative to it."""
    return {
        path.relative_to(out_root).as_posix(): path.read_bytes()
        for path in sorted(out_root.rglob("*"))
        if path.is_file() and is_generated(path)
    }


def _plugin(name: str) -> Path:
    # Console scripts sit beside the interpreter in a venv; fall back to PATH.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise ProtoGenerationError(
            f"{name} not found beside {sys.executable} or on PATH; install '.[test]'"
        )
    return Path(found)


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generate code for every .proto under proto_root into out_root (which should be
    empty) and return the generated files' paths relative to out_root."""
    sources = proto_files(proto_root)
    if not sources:
        raise ProtoGenerationError(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory() as scratch:
        descriptor_set_path = Path(scratch) / "descriptors.binpb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            f"--descriptor_set_out={descriptor_set_path}",
            *(str(source) for source in sources),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProtoGenerationError(
                f"protoc failed (exit {result.returncode}): {result.stderr.strip()}"
            )
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(
            descriptor_set_path.read_bytes()
        )

    # The gRPC plugins write a *_pb2_grpc module for every file; keep them only where
    # the file declares a service, so the tree holds no empty modules.
    for file in descriptor_set.file:
        if not file.service:
            stem = file.name.removesuffix(".proto")
            for suffix in ("_pb2_grpc.py", "_pb2_grpc.pyi"):
                (out_root / f"{stem}{suffix}").unlink(missing_ok=True)

    top_levels = {source.relative_to(proto_root).parts[0] for source in sources}
    generated = generated_files(out_root)
    for name, content in generated.items():
        text = _absolute_imports(content.decode(), top_levels, name)
        (out_root / name).write_bytes(text.encode())
    return sorted(generated)


def _absolute_imports(text: str, top_levels: set[str], name: str) -> str:
    """protoc imports generated modules by proto path (``from fabric.v1 import x_pb2``)
    and names their classes' module the same way; make both ``agent.proto.fabric...``."""
    roots = "|".join(re.escape(top) for top in sorted(top_levels))
    text = re.sub(
        rf"^from ((?:{roots})(?:\.\w+)*) import ",
        rf"from {OUT_PACKAGE}.\1 import ",
        text,
        flags=re.M,
    )
    text = re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:{roots})\.)",
        rf"\g<1>{OUT_PACKAGE}.\2",
        text,
    )
    if re.search(rf"^import (?:{roots})\b", text, flags=re.M):
        raise ProtoGenerationError(f"{name}: unexpected 'import <proto package>' form")
    return text


def _ensure_packages(directory: Path) -> None:
    """Make directory and its parents up to OUT_ROOT importable packages."""
    directory.mkdir(parents=True, exist_ok=True)
    while directory != OUT_ROOT:
        init = directory / "__init__.py"
        if not init.exists():
            package = ".".join(directory.relative_to(OUT_ROOT).parts)
            init.write_text(
                f'"""Generated code for the protobuf package ``{package}``; '
                'see ``agent/proto/__init__.py``."""\n'
            )
        directory = directory.parent


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        fresh_root = Path(scratch)
        fresh = generate(fresh_root)
        # Remove what a deleted or renamed .proto left behind, then copy the new tree.
        for stale in set(generated_files(OUT_ROOT)) - set(fresh):
            (OUT_ROOT / stale).unlink()
            print(f"removed {OUT_ROOT / stale}")
        for name in fresh:
            target = OUT_ROOT / name
            _ensure_packages(target.parent)
            shutil.copyfile(fresh_root / name, target)
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
