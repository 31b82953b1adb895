"""Prometheus exposition: rendered once per tick from the snapshot, served from cache.

A scrape never samples and never renders: it copies the bytes of the latest tick. That
keeps scrape latency flat whatever the number of series, and keeps the driver's lock out
of the scrape path.
"""

from __future__ import annotations

import gzip
import http.server
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as PromCollector

from agent.common.addresses import format_host_port
from agent.common.errors import ListenError
from agent.node.collectors.base import Collector
from agent.node.families import Family, GaugeFamily
from agent.node.snapshot import Snapshot

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def snapshot_families(
    snapshot: Snapshot, collectors: Sequence[Collector], last_render_s: float | None = None
) -> Iterable[Family]:
    """Every family of the snapshot: each collector's sections rendered by the collector,
    then the framework's own series."""
    for collector in collectors:
        samples = snapshot.collected(collector.sections)
        if samples:
            yield from collector.metrics(samples)
    yield from framework_families(snapshot)
    if last_render_s is not None:
        render = GaugeFamily(
            "fabric_exposition_render_seconds",
            "Time the previous tick's exposition took to render.",
        )
        render.add_metric([], last_render_s)
        yield render


class SnapshotMetrics(PromCollector):
    """A prometheus_client custom collector over the latest snapshot, for a registry or
    `generate_latest`; the agent's own endpoint serves `ExpositionCache`'s rendering of
    the same families."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = list(collectors)
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterable[Metric]:
        if self.snapshot is not None:
            for family in snapshot_families(self.snapshot, self._collectors):
                yield family.to_metric()


def framework_families(snapshot: Snapshot) -> Iterable[Family]:
    success = GaugeFamily(
        "fabric_collector_success",
        "1 when the collector returned samples on the last tick, else 0.",
        labels=["collector"],
    )
    duration = GaugeFamily(
        "fabric_collector_duration_seconds",
        "Time the collector took on the last tick.",
        labels=["collector"],
    )
    for status in snapshot.collectors:
        success.add_metric([status.name], 1.0 if status.success else 0.0)
        duration.add_metric([status.name], status.duration_s)
    yield success
    yield duration
    info = GaugeFamily(
        "fabric_agent_info", "The agent's version and node name; always 1.", ["version", "node"]
    )
    info.add_metric([snapshot.agent_version, snapshot.node_name], 1.0)
    yield info
    ts = GaugeFamily(
        "fabric_snapshot_timestamp_seconds",
        "Unix time at which the snapshot behind this exposition was completed.",
    )
    ts.add_metric([], snapshot.completed_wall_s)
    yield ts
    interval = GaugeFamily("fabric_sample_interval_seconds", "Configured sampling interval.")
    interval.add_metric([], snapshot.interval_s)
    yield interval


class TextEncoder:
    """The Prometheus text format (0.0.4) for gauge and counter families, at a fraction of
    `generate_latest`'s cost; the same lines, but integers are written as integers
    (`1024` rather than `1024.0`), which is exact for counters past 2**53 and cheaper.

    Most of the cost of rendering is escaping and joining label sets that are the same
    every tick; this keeps each series' `name{labels} ` prefix from the previous
    rendering and formats only the value. The cache holds exactly the series of the last
    rendering, so it cannot grow with label churn.
    """

    def __init__(self) -> None:
        # series name -> label values -> rendered prefix
        self._prefixes: dict[str, dict[tuple[str, ...], str]] = {}
        self._headers: dict[tuple[str, str, str], str] = {}

    def encode(self, families: Iterable[Family]) -> bytes:
        previous = self._prefixes
        current: dict[str, dict[tuple[str, ...], str]] = {}
        headers = self._headers
        out: list[str] = []
        append = out.append
        for family in families:
            name = family.series_name
            header_key = (name, family.type, family.documentation)
            header = headers.get(header_key)
            if header is None:
                header = headers[header_key] = _header(name, family.type, family.documentation)
            append(header)
            known = previous.get(name, {})
            kept = current.setdefault(name, {})
            for labels, value in family.rows:
                prefix = known.get(labels)
                if prefix is None:
                    prefix = _series_prefix(name, family.label_names, labels)
                kept[labels] = prefix
                append(f"{prefix}{format_value(value)}\n")
        self._prefixes = current
        return "".join(out).encode()


_SPECIAL_VALUES = {math.inf: "+Inf", -math.inf: "-Inf"}


def format_value(value: float) -> str:
    """A sample value as the text format reads it: integers exactly, floats by repr."""
    if type(value) is int:
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    return _SPECIAL_VALUES.get(value) or repr(value)


def _header(name: str, kind: str, documentation: str) -> str:
    help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _series_prefix(name: str, label_names: Sequence[str], labels: Sequence[str]) -> str:
    """`name{a="x",b="y"} ` with labels sorted by name, as prometheus_client writes them;
    the value and newline follow."""
    if not label_names:
        return f"{name} "
    pairs = ",".join(
        '{}="{}"'.format(k, v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\""))
        for k, v in sorted(zip(label_names, labels, strict=True))
    )
    return f"{name}{{{pairs}}} "


class Exposition:
    """One tick's rendered text; the gzip form (what Prometheus asks for) is made on the
    first scrape that wants it and kept for the rest of the tick."""

    __slots__ = ("_gzipped", "_lock", "body", "rendered_at_s", "seq")

    def __init__(self, body: bytes, seq: int, rendered_at_s: float) -> None:
        self.body = body
        self.seq = seq
        self.rendered_at_s = rendered_at_s
        self._gzipped: bytes | None = None
        self._lock = threading.Lock()

    @property
    def gzipped(self) -> bytes:
        with self._lock:
            if self._gzipped is None:
                # Level 1: the text is repetitive; the fastest level already takes it to
                # about a tenth.
                self._gzipped = gzip.compress(self.body, compresslevel=1, mtime=0)
            return self._gzipped


class ExpositionCache:
    """Renders each snapshot once; scrapes read the last rendering."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = list(collectors)
        self._encoder = TextEncoder()
        self._current: Exposition | None = None
        self._last_render_s: float | None = None

    def update(self, snapshot: Snapshot) -> Exposition:
        start = time.perf_counter()
        families = snapshot_families(snapshot, self._collectors, self._last_render_s)
        exposition = Exposition(self._encoder.encode(families), snapshot.seq, time.time())
        self._current = exposition
        self._last_render_s = time.perf_counter() - start
        return exposition

    @property
    def current(self) -> Exposition | None:
        return self._current


# Connections the metrics server holds at once, and how long one may send nothing. Each
# holds a thread and a file descriptor: clients that connect and send nothing
# (slowloris) would otherwise take every descriptor the agent enforces with. Scrapers
# are a Prometheus or two, a scrape takes milliseconds, and a scraper reconnects when
# its idle keep-alive connection is closed.
MAX_METRICS_CONNECTIONS = 64
METRICS_IDLE_TIMEOUT_S = 10.0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = METRICS_IDLE_TIMEOUT_S

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            self._health()
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", _INDEX)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _metrics(self) -> None:
        exposition = self.server.cache.current
        if exposition is None:
            self._send(503, "text/plain; charset=utf-8", b"no sample yet\n")
            return
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(200, CONTENT_TYPE, exposition.gzipped, encoding="gzip")
        else:
            self._send(200, CONTENT_TYPE, exposition.body)

    def _health(self) -> None:
        exposition = self.server.cache.current
        max_age_s = 3 * self.server.interval_s + 1.0
        if exposition is not None and time.time() - exposition.rendered_at_s <= max_age_s:
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        else:
            self._send(503, "text/plain; charset=utf-8", b"stale\n")

    def _send(self, code: int, content_type: str, body: bytes, encoding: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)


_INDEX = (
    b"<html><head><title>fabric-agent</title></head><body><h1>fabric-agent</h1>"
    b'<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a></p>'
    b"</body></html>\n"
)


class MetricsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP server for /metrics; threads per connection so one slow client cannot block
    another scrape, at most MAX_METRICS_CONNECTIONS of them (one past that is closed as
    it arrives), each closed after METRICS_IDLE_TIMEOUT_S without a request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cache: ExpositionCache, interval_s: float) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.cache = cache
        self.interval_s = interval_s
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {format_host_port(*address)} for metrics: {exc.strerror or exc}"
            ) from exc

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # False: the server closes the connection without a thread.
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return thread

    @property
    def port(self) -> int:
        return int(self.server_address[1])
