"""Plugs Prometheus metrics into the ingest, delivery and HTTP seams of one bridge app."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiohttp import web

from bridge.observability.adapters import PrometheusDeliveryMetrics, PrometheusIngestMetrics
from bridge.observability.failure_runs import FailureRun
from bridge.observability.metrics import Metrics
from bridge.routing import Routes

if TYPE_CHECKING:
    from bridge.runtime import Runtime


GAUGE_INTERVAL = 5.0
# The background refresh waits at least this many times as long as the last one took (<= 2% of a core).
GAUGE_COST_FACTOR = 50.0


class PrometheusBindings:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.ingest = PrometheusIngestMetrics(self.metrics)
        self.delivery = PrometheusDeliveryMetrics(self.metrics)

    def routes(self, app: web.Application) -> Routes:
        """The app's route registrar: JSON errors, and every request counted by its route
        and final status."""
        return Routes(app.router, self.metrics.http_request)

    async def refresh_gauges(self, runtime: Runtime) -> None:
        # Every configured destination gets both gauges, reading 0 before it ever queued anything.
        stats = await runtime.store.queue_stats()
        self.metrics.queue_stats(stats, [d.name for d in runtime.config.destinations], runtime.store.now())
        # The same count tells ingest which destinations are past delivery.max_queued_events.
        runtime.ingestor.queues_counted(stats)

    async def refresh_gauges_forever(self, runtime: Runtime, interval: float = GAUGE_INTERVAL) -> None:
        # Queue depth and age come from the store (shared with other nodes), not from counters.
        for worker in runtime.delivery.workers.values():
            self.metrics.paused(worker.name, worker.paused)
        failures = FailureRun("queue_gauges_failed", "queue_gauges_recovered")
        while True:
            started = time.monotonic()
            try:
                await self.refresh_gauges(runtime)
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
            # Counting a queue of millions takes a while, on the core that answers ingest:
            # refresh less often rather than spend more than a small share of it.
            await asyncio.sleep(max(interval, (time.monotonic() - started) * GAUGE_COST_FACTOR))
