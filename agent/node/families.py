"""Metric families as collectors build them each tick: light rows of label values.

They mirror prometheus_client's `GaugeMetricFamily` / `CounterMetricFamily` API
(`add_metric(labels, value)`), so collectors read the same, but keep each series as a
`(label values, value)` pair instead of a `Sample` with a label dict. With ~2,000 series
on an 8-GPU node that halves the cost of building a tick's families, and lets the text
encoder look a series' rendered prefix up by its label values. `to_metric()` gives the
prometheus_client family for anything that wants one (a registry, `generate_latest`).
`_info` series are gauges named `..._info` of value 1, as the text format has them.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric


class Family:
    """One metric: name, type, help text, label names and this tick's rows."""

    __slots__ = ("documentation", "label_names", "name", "rows", "series_name", "type")

    type: str

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self.rows: list[tuple[tuple[str, ...], float]] = []
        self.series_name = name

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.rows.append((tuple(labels), value))

    def to_metric(self) -> Metric:
        raise NotImplementedError


class GaugeFamily(Family):
    __slots__ = ()
    type = "gauge"

    def to_metric(self) -> Metric:
        metric = GaugeMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, value in self.rows:
            metric.add_metric(list(labels), value)
        return metric


class CounterFamily(Family):
    """A counter; like prometheus_client, `name` may end in `_total` or not, and the
    series is always `<name>_total`."""

    __slots__ = ()
    type = "counter"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)
        self.series_name = f"{self.name}_total"

    def to_metric(self) -> Metric:
        metric = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, value in self.rows:
            metric.add_metric(list(labels), value)
        return metric
