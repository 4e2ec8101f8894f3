"""Plug `Metrics` into the ingest and delivery metric seams.

`Metrics` already has the seams' method names; these subclasses exist so the runtime's
type-checked parameters (IngestMetrics, DeliveryMetrics) accept it without coupling
bridge.observability.metrics to the sources and delivery packages.
"""

from __future__ import annotations

from bridge.delivery.metrics import DeliveryMetrics
from bridge.observability.metrics import Metrics
from bridge.sources.base import IngestMetrics


class PrometheusIngestMetrics(IngestMetrics):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def received(self, source: str, n: int) -> None:
        self.metrics.received(source, n)

    def rejected(self, source: str, code: str, n: int = 1) -> None:
        self.metrics.rejected(source, code, n)

    def duplicates(self, source: str, n: int) -> None:
        self.metrics.duplicates(source, n)


class PrometheusDeliveryMetrics(DeliveryMetrics):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def delivered(self, destination: str, n: int) -> None:
        self.metrics.delivered(destination, n)

    def dead_lettered(self, destination: str, reason: str, n: int) -> None:
        self.metrics.dead_lettered(destination, reason, n)

    def discarded(self, source: str, destination: str, reason: str, n: int) -> None:
        self.metrics.discarded(source, destination, reason, n)

    def request(self, destination: str, status: int, seconds: float) -> None:
        self.metrics.request(destination, status, seconds)

    def paused(self, destination: str, paused: bool) -> None:
        self.metrics.paused(destination, paused)
