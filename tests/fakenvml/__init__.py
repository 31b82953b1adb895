"""Python handle on the fake NVML driver (tests/fakenvml/libnvidia-ml.so.1).

A process loads one libnvidia-ml.so.1, so every in-process test shares this library and
switches scenarios between NVML sessions: the scenario named in FAKE_NVML_SCENARIO is read
when the init refcount goes from 0 to 1.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from agent.node.collectors.base import Tick

HERE = Path(__file__).resolve().parent
LIBRARY = HERE / "libnvidia-ml.so.1"
SCENARIOS = HERE / "scenarios"
DEFAULT_SCENARIO = "hgx-h200-8gpu.json"


def build() -> Path:
    """Build the library if it is missing or older than its sources (make decides)."""
    subprocess.run(["make", "--no-print-directory", "-s", "-C", str(HERE)], check=True)
    return LIBRARY


def scenario(name: str) -> dict[str, Any]:
    """A shipped scenario as a dict, to derive variants from."""
    loaded: dict[str, Any] = json.loads((SCENARIOS / name).read_text())
    return loaded


class FakeNvml:
    """Time, call counts and scenario selection of the fake driver."""

    def __init__(self, library: Path) -> None:
        self.library = library
        self._lib = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        self._lib.fakenvml_advance.argtypes = [ctypes.c_double]
        self._lib.fakenvml_advance.restype = None
        self._lib.fakenvml_freeze.argtypes = [ctypes.c_int]
        self._lib.fakenvml_freeze.restype = None
        self._lib.fakenvml_now.restype = ctypes.c_double
        self._lib.fakenvml_refcount.restype = ctypes.c_int
        self._lib.fakenvml_call_count.argtypes = [ctypes.c_char_p]
        self._lib.fakenvml_call_count.restype = ctypes.c_ulonglong
        self._lib.fakenvml_reset_counts.restype = None
        self._seq = 0
        self._advanced_s = 0.0

    def use(self, name_or_path: str | Path) -> Path:
        """Select the scenario the next NVML init (refcount 0 -> 1) reads."""
        path = Path(name_or_path)
        if not path.is_absolute():
            path = SCENARIOS / path
        os.environ["FAKE_NVML_SCENARIO"] = str(path)
        return path

    def use_scenario(self, doc: dict[str, Any], directory: Path) -> Path:
        """Write `doc` as a scenario file under `directory` and select it."""
        path = directory / "scenario.json"
        path.write_text(json.dumps(doc, indent=2))
        return self.use(path)

    def advance(self, seconds: float) -> None:
        self._lib.fakenvml_advance(seconds)
        self._advanced_s += seconds

    def freeze(self, frozen: bool = True) -> None:
        """While frozen, scenario time moves only by `advance`."""
        self._lib.fakenvml_freeze(1 if frozen else 0)

    def now(self) -> float:
        return float(self._lib.fakenvml_now())

    def refcount(self) -> int:
        return int(self._lib.fakenvml_refcount())

    def calls(self, function: str) -> int:
        return int(self._lib.fakenvml_call_count(function.encode()))

    def reset_counts(self) -> None:
        self._lib.fakenvml_reset_counts()

    def tick(self, advance_s: float = 0.0) -> Tick:
        """Advance scenario time, then a new tick. Its time counts what this handle advanced:
        scenario time restarts at each init, which may come after the tick is made."""
        if advance_s:
            self.advance(advance_s)
        self._seq += 1
        now = self._advanced_s
        return Tick(seq=self._seq, monotonic_s=now, wall_s=1_700_000_000.0 + now)
