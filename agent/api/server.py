"""The agent's gRPC listener on its unix socket.

The socket serves local orchestrator hooks. It is created with mode 0660 (group from
the config), so access is whatever the file system grants; a stale socket left by a
crash is replaced, a path that is not a socket is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from agent.api.telemetry import SnapshotHub, add_to_server
from agent.errors import ListenError

SOCKET_MODE = 0o660
# Each open WatchSnapshots stream holds a worker: room for a few orchestrator watchers
# beside unary calls.
MAX_WORKERS = 16
# Snapshots of large nodes stay far below this; a bigger message is a bug to surface.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ApiServer:
    """TelemetryService on `unix:<socket>`, fed by the agent's SnapshotHub."""

    def __init__(self, socket_path: Path, hub: SnapshotHub, *, group: str | None = None) -> None:
        self.socket_path = socket_path
        self.hub = hub
        self._group = group
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=MAX_WORKERS), options=options)
        add_to_server(self._server, hub)

    def start(self) -> None:
        path = self.socket_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ListenError(f"{path}: exists and is not a socket; refusing to replace it")
                path.unlink()
            self._server.add_insecure_port(f"unix:{path}")
        except (OSError, RuntimeError) as exc:
            raise ListenError(f"cannot listen on unix:{path} for the API: {exc}") from exc
        self._server.start()
        try:
            os.chmod(path, SOCKET_MODE)
            if self._group is not None:
                shutil.chown(path, group=self._group)
        except (OSError, LookupError) as exc:
            self.stop()
            raise ListenError(f"{path}: cannot set mode or group {self._group!r}: {exc}") from exc

    def stop(self, grace_s: float = 2.0) -> None:
        # Streams end first, so the grace period is not spent waiting on watchers.
        self.hub.close()
        self._server.stop(grace_s).wait()
        self.socket_path.unlink(missing_ok=True)
