"""The source seam: an inbound HTTP component and the ingest step every source shares.

A source kind (bridge/sources/<kind>/) turns requests into validated events and hands
them to ``Ingestor.store``, which makes them durable (group commit) before the handler
answers. Sources never map or deliver; they only accept or refuse, precisely.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from aiohttp import web

from bridge.config.model import Config, SourceConfig
from bridge.httpx import ApiError, json_response
from bridge.mapping.api import CompiledMapping
from bridge.routing import Routes
from bridge.store.base import EnqueueResult, IdentityLink, IncomingEvent, QueueStats, Store, StoreError, StoreFull

log = structlog.get_logger("bridge.ingest")

# How many of a request's rejected events its log line names, and how much of each id.
LOGGED_REJECTIONS = 10
LOGGED_ID = 100

# Backpressure (the store full or down, a destination's queue full) is a 429 with
# Retry-After, as Segment's own Tracking API answers when it cannot take more.
# analytics-node 3.x waits out a 429's Retry-After without spending a retry, but spends one
# on each 503 and drops the batch after the last (10 retries, 3 in 2.x: some minutes into a
# full store). analytics-python 2.4 waits out either, and MoEngage Streams retries both
# alike; Segment's Webhooks destination retries a 5xx only, so /segment/webhook answers
# these 503 (segment/routes.py: WEBHOOK_BACKPRESSURE). Bad input never gets it: that is a
# 400-class answer.
BACKPRESSURE = 429


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    code: str
    message: str
    # The id the event gave itself (event_uuid, messageId), for the log only.
    event_id: str | None = None
    count: int = 1  # the events this entry stands for (Collected.reject_from: a range of them)

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "code": self.code, "message": self.message}


def given_id(item: Any, key: str) -> str | None:
    """The id a rejected ``item`` gave itself under ``key``, as the log names it: a string
    or an integer, cut to LOGGED_ID characters; None for anything else."""
    value = item.get(key) if isinstance(item, dict) else None
    if isinstance(value, str):
        return value[:LOGGED_ID]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)[:LOGGED_ID]
    return None


class IngestMetrics(ABC):
    """What ingest reports; the app plugs Prometheus in, tests may plug nothing."""

    @abstractmethod
    def received(self, source: str, n: int) -> None: ...

    @abstractmethod
    def rejected(self, source: str, code: str, n: int = 1) -> None: ...

    @abstractmethod
    def duplicates(self, source: str, n: int) -> None: ...


class NoMetrics(IngestMetrics):
    def received(self, source: str, n: int) -> None:
        pass

    def rejected(self, source: str, code: str, n: int = 1) -> None:
        pass

    def duplicates(self, source: str, n: int) -> None:
        pass


class Ingestor:
    """Stores accepted events durably, one job per routed destination."""

    def __init__(
        self,
        store: Store,
        config: Config,
        mappings: Callable[[], Mapping[str, CompiledMapping]],
        notify: Callable[[Iterable[str]], None],
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self._mappings = mappings
        self._notify = notify
        self.metrics = metrics or NoMetrics()
        self._dest_mapping = {d.name: d.mapping for d in config.destinations}
        # Per source: its destinations and their mappings, for the mapping set in force
        # (``_linkers_for``); worked out once per set rather than once per request.
        self._linkers_set: Mapping[str, CompiledMapping] | None = None
        self._linkers: dict[str, Linkers] = {}
        # While the store refuses events: the code of the refusal (store_full or
        # store_unavailable), and since when and how many requests it refused.
        self._refusing: Refusal | None = None
        # delivery.max_queued_events by destination, and the destinations past it at the
        # last count of the queues (queues_counted): their events are refused, the rest go on.
        self._queue_limits = {
            d.name: d.delivery.max_queued_events for d in config.destinations if d.delivery.max_queued_events
        }
        self._over_limit: frozenset[str] = frozenset()

    def _linkers_for(self, source: SourceConfig) -> Linkers:
        mappings = self._mappings()
        if mappings is not self._linkers_set:  # a reload swaps in a new set
            self._linkers_set, self._linkers = mappings, {}
        known = self._linkers.get(source.name)
        if known is not None:
            return known
        linkers: list[Linker] = []
        for dest in source.to:
            mapping = mappings.get(self._dest_mapping[dest])
            found = mapping.link_filter() if mapping is not None else False
            if mapping is None or found is False:
                continue  # no mapping in force, or one that learns no links
            field, values = found if isinstance(found, tuple) else (None, frozenset[str]())
            linkers.append(Linker(dest, mapping, field, values))
        known = Linkers(linkers, *_gate(linkers))
        self._linkers[source.name] = known
        return known

    def collector(self, source: SourceConfig) -> Collected:
        """Where a request's events go as they pass validation (see ``Collected``)."""
        return Collected(source, self._linkers_for(source), self.metrics)

    @property
    def over_limit(self) -> frozenset[str]:
        """The destinations past delivery.max_queued_events at the last count."""
        return self._over_limit

    def queues_counted(self, stats: Mapping[str, QueueStats]) -> None:
        """The queues as the store counted them just now (every few seconds, and at each
        metrics scrape): which destinations are past their delivery.max_queued_events."""
        if not self._queue_limits:
            return
        over = frozenset(
            name for name, limit in self._queue_limits.items() if name in stats and stats[name].depth >= limit
        )
        for name in sorted(over - self._over_limit):
            log.warning(
                "destination_queue_full",
                destination=name,
                queued=stats[name].depth,
                limit=self._queue_limits[name],
                hint="the sources that feed it are refused (429) until its queue is below the limit:"
                " see why it does not deliver (bridge destinations list, docs/operations.md)",
            )
        for name in sorted(self._over_limit - over):
            log.warning("destination_queue_below_limit", destination=name, queued=stats.get(name, _EMPTY).depth)
        self._over_limit = over

    async def store_events(self, source: SourceConfig, incoming: Sequence[IncomingEvent]) -> EnqueueResult:
        if not incoming:
            return EnqueueResult(0, 0)
        over = self._over_limit
        if over and not over.isdisjoint(source.to):
            # Backpressure for the sources that feed it only (every event of a source gets a
            # job for each of its destinations): the store keeps room for the other sources'
            # events, and these wait at the sender, which retries a 429 after its Retry-After.
            raise ApiError(
                BACKPRESSURE,
                "destination_queue_full",
                "the bridge is not accepting these events right now: a destination they go to has a full queue",
                headers={"Retry-After": "30"},
            )
        # The answer names the refusal, not the store's own words (a file's path, a database
        # host): a write key is no secret (Analytics.js ships it to browsers), so a caller is
        # anyone. The words go to the log's ingest_refused line, as /readyz's to not_ready.
        try:
            result = await self.store.enqueue(source.name, incoming)
        except StoreFull as exc:
            self._refused("store_full", exc)
            raise ApiError(
                BACKPRESSURE,
                "store_full",
                "the bridge is not accepting events right now: its event store is full",
                headers={"Retry-After": "30"},
            ) from None
        except StoreError as exc:
            self._refused("store_unavailable", exc)
            raise ApiError(
                BACKPRESSURE,
                "store_unavailable",
                "the event store is unavailable",
                headers={"Retry-After": "10"},
            ) from None
        if self._refusing is not None:
            self._accepting_again()
        self.metrics.received(source.name, result.stored)
        if result.duplicates:
            self.metrics.duplicates(source.name, result.duplicates)
        if result.stored:
            self._notify(source.to)
        return result

    def _refused(self, code: str, exc: StoreError) -> None:
        """One warning when the store starts refusing events (or refuses them for another
        reason), not one per request: each request's own line is at info (request_rejected),
        so at log_level warning an outage of all ingest was otherwise silent."""
        refusing = self._refusing
        if refusing is not None and refusing.code == code:
            refusing.requests += 1
            return
        self._refusing = Refusal(code, time.monotonic())
        log.warning("ingest_refused", code=code, reason=str(exc), hint=REFUSAL_HINTS[code])

    def _accepting_again(self) -> None:
        refusing, self._refusing = self._refusing, None
        assert refusing is not None
        log.warning(
            "ingest_resumed",
            after=refusing.code,
            refused_requests=refusing.requests,
            seconds=round(time.monotonic() - refusing.since, 1),
        )


_EMPTY = QueueStats(depth=0, oldest_created_at=None)

# What an operator can do about each refusal, on its log line.
REFUSAL_HINTS = {
    "store_full": "free disk space or raise store.max_bytes; what delivered jobs take is freed only when"
    " they are pruned, store.retention_hours after delivery (docs/operations.md, Runbook)",
    "store_unavailable": "the store cannot commit a write: check its disk, file or database",
}


@dataclass(slots=True)
class Refusal:
    code: str
    since: float  # monotonic
    requests: int = 1


class Linker(NamedTuple):
    """A destination whose mapping learns identity links, and what an event needs to teach
    one (``CompiledMapping.link_filter``): ``field`` None means any event may."""

    destination: str
    mapping: CompiledMapping
    field: str | None
    values: frozenset[str]


class Linkers(NamedTuple):
    """A source's linkers, and one look-up that says whether an event can teach any of
    them a link: only if its ``gate_field`` is one of ``gate_values`` (a ``gate_field`` of
    None: any event may; no ``gate_values``: none may). For the shipped mappings that is
    ``type`` in {identify}, so five events in six skip ``Collected.links_of``."""

    each: list[Linker]
    gate_field: str | None
    gate_values: frozenset[str]


def _gate(linkers: list[Linker]) -> tuple[str | None, frozenset[str]]:
    if not linkers:
        return "type", frozenset()  # no event teaches a link
    fields = {linker.field for linker in linkers}
    if len(fields) > 1 or None in fields:
        return None, frozenset()  # each linker asked about every event, as it tells
    return linkers[0].field, frozenset[str]().union(*(linker.values for linker in linkers))


_new_tuple = tuple.__new__


class Collected:
    """A request's events, each turned into what the store keeps as soon as it is accepted.

    A handler fills one of these in a plain (not async) function that parses the body, and
    awaits the commit only after that function has returned: the parsed request (about
    fifteen dicts and lists an event) is then freed before the wait for the fsync, not
    held through it. Held, the requests in flight kept tens of thousands of objects alive,
    which the garbage collector walked again and again and which kept the allocator's
    memory cold: 4 us more CPU a batch event on the event loop (docs/benchmarks.md,
    session 18).

    The Tracking API's per-event loop (``SegmentSources._accept_each``) writes ``accept``
    out, with ``incoming``, ``destinations``, ``gate_field``, ``gate_values`` and ``links_of``:
    a call and a frame less an event. Keep the two in step.
    """

    __slots__ = ("_linkers", "_metrics", "destinations", "gate_field", "gate_values", "incoming", "rejected", "source")

    def __init__(self, source: SourceConfig, linkers: Linkers, metrics: IngestMetrics):
        self.source = source
        self.destinations = source.to
        # Slots, not the Linkers' fields: a NamedTuple's field is a slower attribute to read.
        self._linkers = linkers.each
        self.gate_field, self.gate_values = linkers.gate_field, linkers.gate_values
        self._metrics = metrics
        self.incoming: list[IncomingEvent] = []
        self.rejected: list[Rejection] = []

    def accept(self, event: dict[str, Any], message_id: str, ordering_key: str, payload: bytes) -> None:
        """Keep a validated event (``payload`` is its stored JSON) with the identity links
        the destinations' mappings learn from it."""
        links: tuple[IdentityLink, ...] = ()
        if self._linkers:  # none for a source whose destinations learn no links (Streams')
            field = self.gate_field
            try:
                # Only a string can equal one of the values; an unhashable value cannot be looked up.
                learns = field is None or event.get(field) in self.gate_values
            except TypeError:
                learns = False
            if learns:
                links = self.links_of(event)
        # tuple.__new__ is what IncomingEvent(...) runs, without its generated __new__'s frame.
        self.incoming.append(_new_tuple(IncomingEvent, (message_id, ordering_key, payload, self.destinations, links)))

    def links_of(self, event: dict[str, Any]) -> tuple[IdentityLink, ...]:
        """The identity links the destinations' mappings learn from ``event``."""
        links: tuple[IdentityLink, ...] = ()
        for dest, mapping, field, values in self._linkers:
            if field is not None:
                # Most events cannot teach a link (only identify calls do, in the shipped
                # mappings): the mapping's own first check, made without calling it.
                try:
                    if event.get(field) not in values:
                        continue
                except TypeError:
                    continue
            link = mapping.identity_link(event)
            if link is not None:
                links += (IdentityLink(dest, link[0], link[1]),)
        return links

    def reject(self, index: int, code: str, message: str, event_id: str | None = None) -> None:
        self.rejected.append(Rejection(index, code, message, event_id))
        self._metrics.rejected(self.source.name, code)

    def reject_from(self, index: int, count: int, code: str, message: str) -> None:
        """Reject ``count`` events from ``index`` on with one entry: a list of one per event
        grew with the body (a 480 KB batch of zeros, 25 MB of answer)."""
        self.rejected.append(Rejection(index, code, message, None, count))
        self._metrics.rejected(self.source.name, code, count)


async def store_collected(ingestor: Ingestor, collected: Collected) -> web.Response:
    """Store what a request's events became and answer it: the acknowledgement, with the
    duplicates and each rejected event listed; a 400 when nothing was accepted."""
    incoming = collected.incoming
    if collected.rejected:
        log_rejections(collected)
    if not incoming:
        raise all_rejected(collected.rejected)
    result = await ingestor.store_events(collected.source, incoming)
    return json_response(batch_answer(len(incoming), result.duplicates, collected.rejected))


def log_rejections(collected: Collected) -> None:
    """One line for a request some of whose events were rejected: a 200 answer lists them,
    but MoEngage (and most SDKs) never read it. Which events (index, their own id) and
    why (the code), for the first few; never their contents, which the messages may quote."""
    rejected = collected.rejected
    log.warning(
        "events_rejected",
        source=collected.source.name,
        rejected=rejected_events(rejected),
        accepted=len(collected.incoming),
        first=[{"index": r.index, "event_id": r.event_id, "code": r.code} for r in rejected[:LOGGED_REJECTIONS]],
    )


class SourceKind(ABC):
    """One kind of inbound HTTP source; serves every configured source of that kind."""

    kind: str

    @abstractmethod
    def add_routes(self, routes: Routes) -> None: ...


def batch_answer(accepted: int, duplicates: int, rejected: list[Rejection]) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True}
    if rejected:
        body["accepted"] = accepted
        body["rejected"] = [r.as_json() for r in rejected]
    if duplicates:
        body["duplicates"] = duplicates
    return body


def rejected_events(rejected: list[Rejection]) -> int:
    """The events ``rejected`` stands for: an entry of reject_from is a range of them."""
    return sum(r.count for r in rejected)


def all_rejected(rejected: list[Rejection]) -> ApiError:
    """Every item was invalid: a 400 that still lists each reason."""
    if len(rejected) == 1:
        r = rejected[0]
        return ApiError(400, r.code, r.message, {"rejected": [r.as_json()]})
    codes = {r.code for r in rejected}
    code = codes.pop() if len(codes) == 1 else "multi_user_error"
    return ApiError(
        400,
        code,
        f"all {rejected_events(rejected)} events were rejected",
        {"rejected": [r.as_json() for r in rejected]},
    )
