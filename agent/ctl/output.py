"""Tables and JSON for fabricctl's output, and units people read."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message

FORMATS = ("table", "json")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, trailing blanks trimmed (kubectl style)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def to_json(message: Message, *, one_line: bool = False) -> str:
    """proto3 JSON (the documents' camelCase keys); one line for streams and JSON lines."""
    if one_line:
        return json_format.MessageToJson(message, indent=None).replace("\n", "")
    return json_format.MessageToJson(message, indent=2)


def human_bytes(value: float) -> str:
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= factor:
            return f"{value / factor:.1f}{unit}"
    return f"{value:.0f}B"


def human_bps(bps: float) -> str:
    """Bits per second, decimal prefixes as network rates are quoted."""
    for factor, unit in ((1e12, "Tbit/s"), (1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= factor:
            return f"{bps / factor:.1f}{unit}"
    return f"{bps:.0f}bit/s"


def human_count(value: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{unit}"
    return f"{value:.0f}"


def human_duration(seconds: float) -> str:
    """`2d3h`, `59m58s`, `12s`: the two largest units."""
    seconds = max(0, round(seconds))
    parts: list[str] = []
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def percent(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def utc_stamp(unix_s: float) -> str:
    """`2025-06-01T12:00:00Z`."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expiry(unix_s: float, now_s: float | None = None) -> str:
    """`2025-06-01T12:00:00Z (in 59m58s)`, or `(expired)` once past."""
    now_s = time.time() if now_s is None else now_s
    stamp = utc_stamp(unix_s)
    left = unix_s - now_s
    return f"{stamp} (in {human_duration(left)})" if left > 0 else f"{stamp} (expired)"


def ago(unix_s: float, now_s: float | None = None) -> str:
    """`2s ago`, `1h5m ago`; a time ahead of this clock (skew) reads `0s ago`."""
    now_s = time.time() if now_s is None else now_s
    return f"{human_duration(now_s - unix_s)} ago"


def or_dash(value: str) -> str:
    return value if value else "-"
