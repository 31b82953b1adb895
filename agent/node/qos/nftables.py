"""libnftables in-process: the agent's nftables boundary.

The agent owns whole tables and loads each as one buffer, so the kernel applies it in a
single transaction: the table is replaced as a whole or not at all. Commands go through
`nft_run_cmd_from_buffer` of libnftables (the library `nft` itself uses), never through
a subprocess; listings come back as nftables JSON.

A context can work inside a named network namespace: its calls then run on one private
thread that entered that namespace, so the rest of the agent never changes namespace.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2 import netns as pyroute2_netns

from agent.node.qos.kernel import NftError

LIBRARY = "libnftables.so.1"

# include/nftables/libnftables.h
_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4

T = TypeVar("T")


class Nftables:
    """One libnftables context, optionally inside the network namespace `netns`."""

    def __init__(self, netns: str | None = None, library: str = LIBRARY) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        if netns is not None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"nft-{netns}",
                initializer=_enter_netns,
                initargs=(netns,),
            )
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as exc:
            raise NftError(f"cannot load {library}: {exc}") from None
        _declare(self._lib)
        self._ctx = self._call(lambda: self._lib.nft_ctx_new(_NFT_CTX_DEFAULT))
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str, *, json_output: bool = False) -> str:
        """Run nft commands (the `nft -f` language) as one transaction; return the output."""
        with self._lock:
            return self._call(lambda: self._run_locked(commands, json_output))

    def _run_locked(self, commands: str, json_output: bool) -> str:
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON if json_output else 0)
        rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if rc != 0:
            raise NftError(error.strip() or f"nft command failed ({rc})")
        return output

    def list_table(self, family: str, name: str) -> dict[str, Any] | None:
        """The table as nftables JSON (`{"nftables": [...]}`), or None if it is absent."""
        try:
            output = self.run(f"list table {family} {name}", json_output=True)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        listing: dict[str, Any] = json.loads(output)
        return listing

    def replace_table(self, family: str, name: str, body: str) -> None:
        """Make table `family name` exactly `body` (its chains, sets and rules), atomically.

        Creating the table first makes the delete valid whether or not it exists; all
        three commands are one transaction, so the old table stays if the new one fails.
        """
        self.run(f"table {family} {name}\ndelete table {family} {name}\n"
                 f"table {family} {name} {{\n{body}\n}}\n")  # fmt: skip

    def delete_table(self, family: str, name: str) -> bool:
        """Delete the table; False when it was not there."""
        if self.list_table(family, name) is None:
            return False
        self.run(f"delete table {family} {name}")
        return True

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                ctx, self._ctx = self._ctx, None
                self._call(lambda: self._lib.nft_ctx_free(ctx))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            return fn()
        return self._executor.submit(fn).result()

    def __enter__(self) -> Nftables:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _enter_netns(netns: str) -> None:
    # setns applies to the calling thread only: this executor's one thread.
    pyroute2_netns.setns(netns, flags=0)


def _declare(lib: ctypes.CDLL) -> None:
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
