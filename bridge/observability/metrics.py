"""Prometheus metrics with stable names, in a registry per `Metrics` instance.

A registry per instance (not the process-global default) lets tests run several apps in one
process. Label children are cached per label tuple because `.labels()` takes a lock and builds
a key on every call, and the hot path calls these helpers per batch.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.store.base import QueueStats

# Delivery requests range from a few ms (loopback stand-ins) to the 30 s request timeout.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A reason or code label that is not one of our fixed codes must not explode cardinality.
MAX_LABEL_VALUES = 200
MAX_LABEL_LENGTH = 80
OVERFLOW_LABEL = "other"


class _LabelBounds:
    """Label values capped per label: past MAX_LABEL_VALUES distinct values, new ones
    read OVERFLOW_LABEL, so a stray code or route cannot explode cardinality."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, set[str]] = {}

    def bound(self, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self._bound(i, v) for i, v in enumerate(values))

    def _bound(self, index: int, value: str) -> str:
        value = str(value)[:MAX_LABEL_LENGTH]
        seen = self._seen.setdefault(index, set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return OVERFLOW_LABEL
        seen.add(value)
        return value


class _Family:
    """A labelled metric with its children cached and its label values bounded."""

    __slots__ = ("_bounds", "_children", "_lock", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._bounds = _LabelBounds()
        self._lock = threading.Lock()

    def child(self, *values: str) -> Any:
        found = self._children.get(values)
        if found is not None:
            return found
        with self._lock:
            found = self._metric.labels(*self._bounds.bound(values))
            self._children[values] = found
            return found


class TalliedCounter(Collector):
    """A labelled counter for what is counted per request, read only when collected.

    prometheus_client's ``Counter.inc`` takes a lock and checks the metric on every call:
    about 0.9 us, and a single Tracking API call counted twice. Here a count is a dict
    add, and the samples are built when the registry is collected (a scrape, a test).
    It exposes what a ``Counter`` does: ``<name>_total`` and ``<name>_created``.

    Counts are added on one thread (the event loop); ``collect`` may run on another. It
    copies the dict (one C call under the GIL), so it never sees a half-made update."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = tuple(labels)
        self._bounds = _LabelBounds()
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, ...], tuple[str, ...]] = {}  # raw label values -> bounded
        self._counts: dict[tuple[str, ...], float] = {}  # bounded label values -> total
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, values: tuple[str, ...], n: float = 1) -> None:
        key = self._keys.get(values)
        if key is None:
            key = self._new_key(values)
        counts = self._counts
        counts[key] = counts.get(key, 0) + n

    def _new_key(self, values: tuple[str, ...]) -> tuple[str, ...]:
        with self._lock:
            key = self._bounds.bound(values)
            self._created.setdefault(key, time.time())
            self._counts.setdefault(key, 0)
            if len(self._keys) < MAX_LABEL_VALUES * len(self._labels):  # past that, bound again each time
                self._keys[values] = key
            return key

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labels)]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        created = self._created.copy()
        for key, total in self._counts.copy().items():
            family.add_metric(key, total, created=created.get(key))
        return [family]


class Metrics:
    """Every bridge metric, registered in `self.registry`.

    The helper methods have the same signatures as the ingest and delivery metric seams
    (bridge/sources/base.py IngestMetrics, bridge/delivery/metrics.py DeliveryMetrics)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = __version__) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_received = TalliedCounter(
            "bridge_events_received", "Events accepted and stored durably, by source.", ["source"], registry=r
        )
        self.events_rejected = Counter(
            "bridge_events_rejected",
            "Events refused at ingest by validation, by source and error code (not requests refused whole).",
            ["source", "code"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "bridge_events_duplicate",
            "Events acknowledged but not stored again because their messageId was already seen.",
            ["source"],
            registry=r,
        )
        self.events_delivered = Counter(
            "bridge_events_delivered", "Events a destination accepted, by destination.", ["destination"], registry=r
        )
        self.events_discarded = Counter(
            "bridge_events_discarded",
            "Events deliberately not delivered (mapping or policy), by source, destination and reason. "
            "An empty label means not applicable.",
            ["source", "destination", "reason"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "bridge_events_dead_lettered",
            "Events moved to the dead-letter queue, by destination and reason.",
            ["destination", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "bridge_queue_depth", "Events stored and not yet settled, by destination.", ["destination"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "bridge_queue_oldest_age_seconds",
            "Age of the oldest unsettled event, by destination (0 when the queue is empty).",
            ["destination"],
            registry=r,
        )
        # The DLQ's size, not only its inflow: a counter series first seen with a value (the
        # burst of dead letters before the guard pauses, the first of a new reason, the first
        # after a restart) never shows in increase(), so an alert on the counter missed it.
        self.dead_letters = Gauge(
            "bridge_dead_letters",
            "Dead letters held in the dead-letter queue, by destination (until replayed or purged).",
            ["destination"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            "bridge_delivery_request_duration_seconds",
            "Duration of outbound delivery requests, by destination and HTTP status (0: no response).",
            ["destination", "status"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.http_requests = TalliedCounter(
            "bridge_http_requests",
            "Inbound HTTP requests, by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.destination_paused = Gauge(
            "bridge_destination_paused", "1 while a destination is paused, else 0.", ["destination"], registry=r
        )
        self.mapping_reloads = Counter(
            "bridge_mapping_reloads", "Mapping reloads, by result (ok or error).", ["result"], registry=r
        )
        self.build_info = Gauge(
            "bridge_build_info", "Always 1; labels carry the build.", ["version", "python"], registry=r
        )
        self.build_info.labels(version, platform.python_version()).set(1)

        self._rejected = _Family(self.events_rejected)
        self._duplicate = _Family(self.events_duplicate)
        self._delivered = _Family(self.events_delivered)
        self._discarded = _Family(self.events_discarded)
        self._dead = _Family(self.events_dead_lettered)
        self._depth = _Family(self.queue_depth)
        self._age = _Family(self.queue_oldest_age)
        self._dead_held = _Family(self.dead_letters)
        self._duration = _Family(self.delivery_duration)
        self._paused = _Family(self.destination_paused)
        self._reloads = _Family(self.mapping_reloads)
        self._queued_destinations: set[str] = set()

    # -- ingest -------------------------------------------------------------------------
    def received(self, source: str, n: int) -> None:
        if n:
            self.events_received.inc((source,), n)

    def rejected(self, source: str, code: str, n: int = 1) -> None:
        if n:
            self._rejected.child(source, code).inc(n)

    def duplicates(self, source: str, n: int) -> None:
        if n:
            self._duplicate.child(source).inc(n)

    # -- delivery -----------------------------------------------------------------------
    def delivered(self, destination: str, n: int) -> None:
        if n:
            self._delivered.child(destination).inc(n)

    def discarded(self, source: str, destination: str, reason: str, n: int) -> None:
        if n:
            self._discarded.child(source, destination, reason).inc(n)

    def dead_lettered(self, destination: str, reason: str, n: int) -> None:
        if n:
            self._dead.child(destination, reason).inc(n)

    def request(self, destination: str, status: int, seconds: float) -> None:
        self._duration.child(destination, str(status)).observe(max(seconds, 0.0))

    def paused(self, destination: str, paused: bool) -> None:
        self._paused.child(destination).set(1 if paused else 0)

    # -- queue and reloads --------------------------------------------------------------
    def queue(self, destination: str, depth: int, oldest_age_seconds: float, dead: int = 0) -> None:
        self._depth.child(destination).set(depth)
        self._age.child(destination).set(max(oldest_age_seconds, 0.0))
        self._dead_held.child(destination).set(dead)

    def queue_stats(
        self, stats: Mapping[str, QueueStats], destinations: Iterable[str] = (), now: float | None = None
    ) -> None:
        """Set the queue and dead-letter gauges from `Store.queue_stats()`; ``destinations``
        (the configured ones) and destinations gone from the stats read 0."""
        now = time.time() if now is None else now
        for destination, s in stats.items():
            age = now - s.oldest_created_at if s.oldest_created_at is not None else 0.0
            self.queue(destination, s.depth, age, s.dead)
        for idle in (self._queued_destinations | set(destinations)) - set(stats):
            self.queue(idle, 0, 0.0)
        self._queued_destinations |= set(stats) | set(destinations)

    def mapping_reload(self, ok: bool) -> None:
        self._reloads.child("ok" if ok else "error").inc()

    # -- HTTP ---------------------------------------------------------------------------
    def http_request(self, route: str, status: int) -> None:
        self.http_requests.inc((route, str(status)))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type for GET /metrics.

        With an Accept header asking for OpenMetrics, that format is served instead. An
        Accept whose version is not a number (``version=abc``) gets the default format:
        prometheus_client's parser raises TypeError on it, a 500 for a header anyone may send."""
        if accept:
            try:
                encoder, content_type = choose_encoder(accept)
            except (TypeError, ValueError):
                pass
            else:
                return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
