"""Connector metrics: bytes and frames relayed, open taps and follows, upstream errors,
reconnects and frames that could not be stored. Updated from the event loop only."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_COUNTERS = {
    "bytes": ("relay_connector_bytes", "Bytes relayed from upstreams, by connector and source."),
    "frames": ("relay_connector_frames", "SSE frames read from upstreams."),
    "upstream_errors": (
        "relay_connector_upstream_errors",
        "Upstream requests that failed: no answer, an error status, a dropped stream.",
    ),
    "reconnects": ("relay_connector_reconnects", "Follows that connected again."),
    "store_failures": (
        "relay_connector_store_failures",
        "Frames not stored: the store could not write, or a tap's queue was full.",
    ),
    "conflicts": ("relay_connector_conflicts", "Upstream 409 answers recorded as conflicts."),
}


class ConnectorStats(Collector):
    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.open: defaultdict[str, int] = defaultdict(int)  # connector -> open now

    def add(self, what: str, connector: str, source: str, n: int = 1) -> None:
        self.counts[(what, connector, source)] += n

    def collect(self) -> Iterator[Metric]:
        for what, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["connector", "source"])
            for (kind, connector, source), value in sorted(self.counts.items()):
                if kind == what:
                    family.add_metric([connector, source], value)
            yield family
        gauge = GaugeMetricFamily(
            "relay_connector_open", "Taps and follows open now.", labels=["connector"]
        )
        for connector in ("tap", "follow"):
            gauge.add_metric([connector], self.open[connector])
        yield gauge
