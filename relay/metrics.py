"""Prometheus metrics, kept in a registry of the app's own (no process-wide state)."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.changes import RAW_PREFIX, Commit
from relay.connectors.stats import ConnectorStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class IngestStats(Collector):
    """Ingest counters and latency histogram, cheap enough to update on every request.

    Updated only from the event loop, so it needs no locks (prometheus-client's own
    metric types take one per update, and walk the buckets in Python).
    """

    def __init__(self) -> None:
        self.outcomes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._buckets: defaultdict[str, list[int]] = defaultdict(
            lambda: [0] * (len(LATENCY_BUCKETS) + 1)
        )
        self._sums: defaultdict[str, float] = defaultdict(float)

    def record(self, source: str, outcome: str, seconds: float | None = None) -> None:
        self.outcomes[(source, outcome)] += 1
        if seconds is not None:
            self._buckets[source][bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[source] += seconds

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "relay_ingest",
            "Ingest requests by source and outcome (stored, duplicate or an error code).",
            labels=["source", "outcome"],
        )
        for (source, outcome), count in sorted(self.outcomes.items()):
            total.add_metric([source, outcome], count)
        yield total
        latency = HistogramMetricFamily(
            "relay_ingest_duration_seconds",
            "Time from request to answer for accepted ingest requests.",
            labels=["source"],
        )
        for source, counts in sorted(self._buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            latency.add_metric([source], cumulative, sum_value=self._sums[source])
        yield latency


class DeliveryStats(Collector):
    """Outbound webhook attempts by outcome, and the deliveries waiting (updated by the
    dispatcher from the event loop)."""

    def __init__(self) -> None:
        self.outcomes: defaultdict[str, int] = defaultdict(int)
        self.queue_depth = 0

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "relay_deliveries",
            "Outbound webhook attempts by outcome (delivered, retry, failed, disable, refused).",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.outcomes.items()):
            total.add_metric([outcome], count)
        yield total
        yield GaugeMetricFamily(
            "relay_delivery_queue_depth",
            "Deliveries not yet delivered or failed.",
            value=self.queue_depth,
        )


class HubStats(Collector):
    """The cross-instance hub's counters, read from it when scraped (the in-process hub
    has none, and then nothing is exposed)."""

    OUTCOMES = ("published", "dropped", "received", "bad_messages")

    def __init__(self, counters: Callable[[], Mapping[str, int]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters()
        if not counters:
            return
        messages = CounterMetricFamily(
            "relay_hub_commits",
            "Commits carried between instances: published, dropped (Redis unreachable; the "
            "others read them from the store), received, bad_messages.",
            labels=["outcome"],
        )
        for outcome in self.OUTCOMES:
            messages.add_metric([outcome], counters.get(outcome, 0))
        yield messages
        yield CounterMetricFamily(
            "relay_hub_connects",
            "Times the hub subscribed to Redis (the first time, then each reconnect).",
            value=counters.get("connects", 0),
        )
        yield GaugeMetricFamily(
            "relay_hub_connected",
            "1 while the hub is subscribed to Redis.",
            value=counters.get("connected", 0),
        )


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


# Seconds: sandboxes get ready in seconds to minutes; turns run seconds to many minutes.
READY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TURN_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ingest = IngestStats()
        self.registry.register(self.ingest)
        self.changes = Counter(
            "relay_changes",
            "Changes recorded in the change log, by type.",
            ["type"],
            registry=self.registry,
        )
        self.sse_subscribers = Gauge(
            "relay_sse_subscribers", "Open Server-Sent Events streams.", registry=self.registry
        )
        self.time_to_ready = Histogram(
            "relay_time_to_ready_seconds",
            "From a session's creation to its first ready (event time), per session.ready.",
            buckets=READY_BUCKETS,
            registry=self.registry,
        )
        self.turn_duration = Histogram(
            "relay_turn_duration_seconds",
            "From a turn's start to its end (event time), by how it ended.",
            ["status"],
            buckets=TURN_BUCKETS,
            registry=self.registry,
        )
        self.deliveries = DeliveryStats()
        self.registry.register(self.deliveries)
        self.connectors = ConnectorStats()
        self.registry.register(self.connectors)

    def watch_hub(self, counters: Callable[[], Mapping[str, int]]) -> None:
        """Expose the hub's counters (`Hub.counters`)."""
        self.registry.register(HubStats(counters))

    def observe_commit(self, commit: Commit) -> None:
        """Count a commit's changes; time readiness and finished turns (a commit listener)."""
        for change in commit.changes:
            if change.type.startswith(RAW_PREFIX):
                continue  # raw events are counted by ingest (and their types are open-ended)
            self.changes.labels(change.type).inc()
            if change.type == "session.ready":
                ms = orjson.loads(change.body)["session"]["time_to_ready_ms"]
                if ms is not None:
                    self.time_to_ready.observe(ms / 1000)
            elif change.type in ("turn.completed", "turn.failed"):
                turn = orjson.loads(change.body)["turn"]
                if turn["duration_ms"] is not None:
                    self.turn_duration.labels(turn["status"]).observe(turn["duration_ms"] / 1000)
