"""What the agent's and the aggregator's gRPC listeners share: the unix socket's path
and mode."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from agent.common.errors import ListenError

SOCKET_MODE = 0o660


def claim_socket_path(path: Path) -> None:
    """Make way for a unix socket at `path`: its directory exists and a stale socket
    (left by a crash) is gone. ListenError for a path that is not a socket."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ListenError(f"{path}: exists and is not a socket; refusing to replace it")
            path.unlink()
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc}") from exc


def restrict_socket(path: Path, group: str | None) -> None:
    """Mode 0660 and, when given, the group that may connect."""
    try:
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            shutil.chown(path, group=group)
    except (OSError, LookupError) as exc:
        raise ListenError(f"{path}: cannot set mode or group {group!r}: {exc}") from exc
