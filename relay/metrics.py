"""Prometheus metrics, kept in a registry of the app's own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ingest_total = Counter(
            "relay_ingest",
            "Ingest requests by source and outcome (stored, duplicate or an error code).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "relay_ingest_duration_seconds",
            "Time from request to answer for ingest requests.",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
