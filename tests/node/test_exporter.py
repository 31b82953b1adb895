"""The metrics endpoint: cached exposition, gzip, health, listen errors, lint."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent.common.errors import ListenError
from agent.node.exporter import ExpositionCache, MetricsServer, SnapshotMetrics, TextEncoder
from agent.node.families import CounterFamily, Family, GaugeFamily
from agent.node.sampler import Sampler
from tests.fakes import FakeCollector


@pytest.fixture
def served() -> Iterator[tuple[Sampler, ExpositionCache, str]]:
    collectors = [FakeCollector("a"), FakeCollector("broken", error=RuntimeError("boom"))]
    sampler = Sampler(collectors, node_name="n1", interval_s=1.0, timeout_s=0.5)
    cache = ExpositionCache(collectors)
    server = MetricsServer(("127.0.0.1", 0), cache, interval_s=1.0)
    server.start()
    try:
        yield sampler, cache, f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        sampler.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_no_snapshot_yet_is_503(served: tuple[Sampler, ExpositionCache, str]) -> None:
    _, _, base = served
    assert get(f"{base}/metrics")[0] == 503
    assert get(f"{base}/healthz")[0] == 503


def test_scrape_serves_the_rendered_tick(served: tuple[Sampler, ExpositionCache, str]) -> None:
    sampler, cache, base = served
    cache.update(sampler.sample())

    status, body, headers = get(f"{base}/metrics")

    text = body.decode()
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'fabric_collector_success{collector="a"} 1.0' in text
    assert 'fabric_collector_success{collector="broken"} 0.0' in text
    assert "fake_a_ticks_total 1\n" in text
    assert 'fabric_collector_duration_seconds{collector="a"}' in text
    assert 'fabric_agent_info{node="n1"' in text
    assert get(f"{base}/healthz")[0] == 200


def test_scrape_never_samples(served: tuple[Sampler, ExpositionCache, str]) -> None:
    sampler, cache, base = served
    cache.update(sampler.sample())
    calls = sampler.collectors[0].calls  # type: ignore[attr-defined]

    bodies = {get(f"{base}/metrics")[1] for _ in range(5)}

    assert len(bodies) == 1
    assert sampler.collectors[0].calls == calls  # type: ignore[attr-defined]


def test_gzip_when_asked(served: tuple[Sampler, ExpositionCache, str]) -> None:
    sampler, cache, base = served
    exposition = cache.update(sampler.sample())

    status, body, headers = get(f"{base}/metrics", {"Accept-Encoding": "gzip"})

    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == exposition.body


def test_port_in_use_is_a_listen_error(served: tuple[Sampler, ExpositionCache, str]) -> None:
    _, cache, base = served
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(ListenError, match=rf"cannot listen on 127.0.0.1:{port}.*in use"):
        MetricsServer(("127.0.0.1", port), cache, interval_s=1.0)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing")
def test_exposition_passes_promtool(served: tuple[Sampler, ExpositionCache, str]) -> None:
    sampler, cache, _ = served
    body = cache.update(sampler.sample()).body

    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr


def families(scale: float) -> list[Family]:
    gauge = GaugeFamily("t_gauge", 'Help with "quotes", \\ and\nnewline.', labels=["b", "a"])
    gauge.add_metric(["x", 'va"l\\ue\n'], 1.5 * scale)
    gauge.add_metric(["y", ""], 123456789.0 * scale)
    gauge.add_metric(["z", "inf"], float("inf"))
    gauge.add_metric(["z", "nan"], float("nan"))
    counter = CounterFamily("t_bytes_total", "Bytes.", labels=["device"])
    counter.add_metric(["eth0"], 2**60 * scale)
    counter.add_metric(["eth1"], 0)
    plain = GaugeFamily("t_plain", "No labels.")
    plain.add_metric([], -3 * scale)
    return [gauge, counter, plain]


class _Families(Collector):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def collect(self) -> Iterable[Metric]:
        return [family.to_metric() for family in families(self.scale)]


@pytest.mark.parametrize("scale", [1.0, 7.25])
def test_text_encoder_matches_prometheus_client(scale: float) -> None:
    encoder = TextEncoder()

    first = encoder.encode(families(1.0))
    # The second rendering reuses cached series prefixes with new values.
    second = encoder.encode(families(scale))

    assert lines(first) == lines(generate_latest(_registry(1.0)))
    assert lines(second) == lines(generate_latest(_registry(scale)))
    assert b't_bytes_total{device="eth1"} 0\n' in second


def lines(exposition: bytes) -> list[tuple[str, str]]:
    """Exposition lines with each value normalised to a float's repr: the encoder writes
    integers as integers where prometheus_client writes `0.0` or `1.2e+08`."""
    result = []
    for line in exposition.decode().splitlines():
        if line.startswith("#"):
            result.append((line, ""))
        else:
            series, value = line.rsplit(" ", 1)
            result.append((series, repr(float(value))))
    return result


def _registry(scale: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_Families(scale))
    return registry


def test_snapshot_metrics_is_the_served_exposition(
    served: tuple[Sampler, ExpositionCache, str],
) -> None:
    sampler, cache, _ = served
    snapshot = sampler.sample()
    custom = SnapshotMetrics(sampler.collectors)
    custom.snapshot = snapshot
    registry = CollectorRegistry()
    registry.register(custom)

    served_body = cache.update(snapshot).body

    assert lines(served_body) == lines(generate_latest(registry))
