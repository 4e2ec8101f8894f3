"""Admin API (/admin/*): DLQ, discards, translate, destination pause/resume, status.

Off unless admin.token is configured; every call needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from bridge.httpx import ApiError, Handler, bearer_only, json_response, parse_json, read_body
from bridge.mapping.links import ids_to_resolve, link_context
from bridge.mapping.translate import translate_events
from bridge.observability.redaction import redact_text
from bridge.records import MAX_LIST_LIMIT, dead_letter_json, discard_json, when
from bridge.routing import ANY_PATH, Routes, unmatched
from bridge.sources.dry_run import Refused, as_ingested_each, refused_json
from bridge.store.base import RecordFilter, StoreError
from bridge.suggest import did_you_mean

if TYPE_CHECKING:
    from bridge.runtime import Runtime

MAX_ADMIN_BODY = 5 * 1024 * 1024
# Record ids are signed 64-bit in both stores; a bigger number can name no record, and
# would overflow the driver rather than match nothing.
MAX_RECORD_ID = 2**63 - 1
# One replay or purge names at most this many ids: the same bound as a listing's limit,
# and well under SQLite's 32766 host parameters in one statement.
MAX_IDS = 10000
# The query parameters each route reads (every other route reads none): known_query.
LISTING_QUERY = ("destination", "reason", "since", "until", "limit")
TRANSLATE_QUERY = ("mapping", "destination", "source", "linked_id")
# The numbers the admin API reads are ASCII decimals: int() and float() would also take
# "1_0" (as 10), "+5", " 5", "nan" and other scripts' digits (U+0665, an Arabic-Indic 5),
# none of which a caller means.
_DIGITS = re.compile(r"[0-9]+")
# A time bound in epoch seconds may be before 1970 or fractional.
_EPOCH_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def add_admin_routes(routes: Routes, runtime: Runtime, token: str) -> None:
    if not token:
        return  # the admin API is off: its routes do not exist

    def guarded(handler: Handler, query: Sequence[str] = ()) -> Handler:
        # The token first: without it, nothing says what a route takes.
        return bearer_only(
            known_query(store_errors(handler), query), token, "the admin API (admin.token)", "bridge-admin"
        )

    api = AdminApi(runtime)
    r = routes
    r.add_get("/admin/status", guarded(api.status))
    r.add_get("/admin/dlq", guarded(api.dlq_list, LISTING_QUERY))
    # Not the names of its POST-only siblings: GET /admin/dlq/replay is a wrong method
    # (405, Allow: POST), not a dead letter whose id is "replay" (400).
    r.add_get("/admin/dlq/{id:(?!(?:replay|purge)$)[^/]+}", guarded(api.dlq_show))
    r.add_post("/admin/dlq/replay", guarded(api.dlq_replay))
    r.add_post("/admin/dlq/purge", guarded(api.dlq_purge))
    r.add_get("/admin/discards", guarded(api.discards, LISTING_QUERY))
    r.add_post("/admin/discards/replay", guarded(api.discards_replay))
    r.add_post("/admin/translate", guarded(api.translate, TRANSLATE_QUERY))
    r.add_post("/admin/destinations/{name}/pause", guarded(api.pause))
    r.add_post("/admin/destinations/{name}/resume", guarded(api.resume))
    r.add_post("/admin/reload", guarded(api.reload))
    # Every other method or path under /admin lands here, after the token check: the
    # answer (404, or 405 and which methods exist) tells only the operator what is there.
    r.add("*", "/admin/{rest:" + ANY_PATH + "}", guarded(unmatched(r.resources())))


def store_errors(handler: Handler) -> Handler:
    """``handler`` with a store that fails (its database away, a disk error) answered as a
    503 naming the store's error, as ingest answers it: not a 500 "bug of ours" with a
    traceback logged per request, when the operator turns to the admin API most. The
    caller holds the admin token, so the store's own words (redacted) are theirs to read."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreError as exc:
            raise ApiError(
                503, "store_unavailable", f"the store failed: {redact_text(str(exc))}", headers={"Retry-After": "10"}
            ) from None

    return answer


def known_query(handler: Handler, names: Sequence[str]) -> Handler:
    """``handler`` for requests whose query holds only ``names``: any other parameter (a
    typo of one, say) is a 400 naming it, rather than ignored, which answered a question
    the caller did not ask (?destinaton=x listed every destination's records)."""
    allowed = frozenset(names)
    takes = f"it takes {', '.join(names)}" if names else "it takes none"

    async def check(request: web.Request) -> web.StreamResponse:
        for key in request.query:
            if key not in allowed:
                raise ApiError(
                    400,
                    "unknown_parameter",
                    f"unknown query parameter {key!r:.60}{did_you_mean(key, names)}; {takes}",
                )
        return await handler(request)

    return check


def filter_from_query(request: web.Request) -> RecordFilter:
    q = request.query
    return RecordFilter(
        destination=q.get("destination") or None,
        reason=q.get("reason") or None,
        since=_time(q.get("since"), "since"),
        until=_time(q.get("until"), "until"),
    )


def _time(value: object, name: str) -> float | None:
    """A time bound: epoch seconds (a JSON number, or text in ASCII digits) or ISO-8601."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ApiError(400, "invalid_parameter", f"{name} must be epoch seconds or ISO-8601")
    if isinstance(value, str) and _looks_like_a_date(value):
        # 20260101 is epoch seconds of August 1970 but an operator means a day: which one
        # would be a guess, and a wrong guess replays or purges the wrong records.
        raise ApiError(
            400,
            "invalid_parameter",
            f"{name} reads as a date and as epoch seconds; write the date as "
            f"{value[:4]}-{value[4:6]}-{value[6:]} (ISO-8601), or epoch seconds as {value}.0",
        )
    if isinstance(value, int | float) or _EPOCH_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            # ASCII only: fromisoformat is strict today, and a time bound is never other text.
            dt = datetime.fromisoformat(value) if value.isascii() else None
        except ValueError:
            dt = None
        if dt is None:
            raise ApiError(400, "invalid_parameter", f"{name} must be epoch seconds or ISO-8601")
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(seconds):
        # "nan" compares as NULL on SQLite but above every number on PostgreSQL.
        raise ApiError(400, "invalid_parameter", f"{name} must be a finite number of epoch seconds or ISO-8601")
    return seconds


def _looks_like_a_date(text: str) -> bool:
    """Eight digits that are a calendar day (YYYYMMDD) from the year 1900 on."""
    if len(text) != 8 or not _DIGITS.fullmatch(text) or text < "19000101":
        return False
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _record_id(value: object) -> int:
    """An id as the stores number records: a positive integer (not a JSON true) in range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RECORD_ID:
        raise ApiError(400, "invalid_parameter", f"ids are integers from 1 to {MAX_RECORD_ID}, not {value!r:.40}")
    return value


def parse_int(text: str, name: str, low: int, high: int) -> int:
    """Every integer the admin API reads as text (a path's id, ?limit=): ASCII digits only,
    no sign (none of them is negative), from ``low`` to ``high``; else a 400 naming ``name``."""
    digits = text.lstrip("0") or "0"
    # The length first: int() refuses a text of more than 4300 digits (ValueError).
    if not (_DIGITS.fullmatch(text) and len(digits) <= len(str(high)) and low <= int(digits) <= high):
        raise ApiError(
            400, "invalid_parameter", f"{name} must be an integer from {low} to {high} in digits 0-9, not {text!r:.40}"
        )
    return int(digits)


def _limit(request: web.Request) -> int:
    return parse_int(request.query.get("limit", "100"), "limit", 1, MAX_LIST_LIMIT)


def _failure_json(failure: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if failure is None else {**failure, "at": when(failure["at"])}


class AdminApi:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def status(self, request: web.Request) -> web.Response:
        rt = self.runtime
        stats = await rt.store.queue_stats()
        rt.ingestor.queues_counted(stats)  # a fresh count: the queue limits see it too
        now = rt.store.now()
        destinations = []
        for d in rt.config.destinations:
            worker = rt.delivery.workers[d.name]
            s = stats.get(d.name)
            mapping = rt.mappings().get(d.mapping)
            destinations.append(
                {
                    **d.client.describe(),
                    "mapping": d.mapping,
                    "mapping_version": mapping.version if mapping else None,
                    "paused": worker.paused,
                    "pause_reason": worker.pause_reason,
                    "queue_depth": s.depth if s else 0,
                    "oldest_age_seconds": round(now - s.oldest_created_at, 3) if s and s.oldest_created_at else 0,
                    "dead_letters": s.dead if s else 0,
                    # delivery.max_queued_events, and whether its sources are refused for it.
                    "max_queued_events": d.delivery.max_queued_events,
                    "queue_full": d.name in rt.ingestor.over_limit,
                    # Why a queue grows while the upstream fails: what it last answered, when
                    # a request was last delivered, and how long the backoff still holds.
                    "last_delivered_at": when(worker.last_delivered_at),
                    "last_failure": _failure_json(worker.last_failure),
                    "backing_off_seconds": round(worker.backing_off_seconds(), 3),
                    "discarded": dict(worker.discarded),
                }
            )
        return json_response(
            {
                "region": rt.config.server.region,
                "uptime_seconds": round(time.monotonic() - rt.started_at, 1),
                "sources": [
                    {"name": s.name, "kind": s.kind, "region": s.region, "to": list(s.to)} for s in rt.config.sources
                ],
                "destinations": destinations,
                "mappings": {n: m.version for n, m in rt.mappings().items()},
            }
        )

    async def dlq_list(self, request: web.Request) -> web.Response:
        records = await self.runtime.store.list_dead(filter_from_query(request), _limit(request))
        return json_response({"dead_letters": [dead_letter_json(r, full=False) for r in records]})

    async def dlq_show(self, request: web.Request) -> web.Response:
        ident = parse_int(request.match_info["id"], "id", 1, MAX_RECORD_ID)
        records = await self.runtime.store.list_dead(RecordFilter(ids=(ident,)), 1)
        if not records:
            raise ApiError(404, "not_found", f"no dead letter {ident}")
        return json_response(dead_letter_json(records[0], full=True))

    async def dlq_replay(self, request: web.Request) -> web.Response:
        flt = self._deliverable(await self._body_filter(request))
        return await self._replayed(await self.runtime.store.replay_dead(flt))

    async def discards_replay(self, request: web.Request) -> web.Response:
        flt = self._deliverable(await self._body_filter(request))
        return await self._replayed(await self.runtime.store.replay_discards(flt))

    def _deliverable(self, flt: RecordFilter) -> RecordFilter:
        """A replay for a destination no worker serves would queue its events for good:
        refused when named, and left out of a replay by reason, time or ids."""
        names = [d.name for d in self.runtime.config.destinations]
        if flt.destination is not None and flt.destination not in names:
            raise ApiError(
                400,
                "unknown_destination",
                f"no destination {flt.destination!r} is configured, so nothing would deliver what a replay"
                f" queues for it{did_you_mean(flt.destination, names)}",
            )
        return dataclasses.replace(flt, destinations=tuple(names))

    async def _replayed(self, n: int) -> web.Response:
        self.runtime.delivery.notify(w for w in self.runtime.delivery.workers)
        return json_response({"replayed": n})

    async def dlq_purge(self, request: web.Request) -> web.Response:
        return json_response({"purged": await self.runtime.store.purge_dead(await self._body_filter(request))})

    async def _body_filter(self, request: web.Request) -> RecordFilter:
        raw = await read_body(request, MAX_ADMIN_BODY)
        data: Any = parse_json(raw) if raw.strip() else {}
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "expected a JSON object filter")
        unknown = set(data) - {"destination", "reason", "since", "until", "ids"}
        if unknown:
            raise ApiError(400, "unknown_key", f"unknown filter key(s): {', '.join(sorted(unknown))}")
        for key in ("destination", "reason"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ApiError(400, "invalid_parameter", f"{key} must be a string")
        ids = data.get("ids")
        if ids is not None:
            if not isinstance(ids, list):
                raise ApiError(400, "invalid_parameter", "ids must be a list of integers")
            if len(ids) > MAX_IDS:
                raise ApiError(400, "too_many_ids", f"ids names {len(ids)} records; at most {MAX_IDS} at a time")
            ids = [_record_id(i) for i in ids]
        flt = RecordFilter(
            destination=data.get("destination"),
            reason=data.get("reason"),
            since=_time(data.get("since"), "since"),
            until=_time(data.get("until"), "until"),
            ids=tuple(ids) if ids is not None else None,
        )
        if all(getattr(flt, f) is None for f in ("destination", "reason", "since", "until", "ids")):
            # {}, {"ids": null} and {"since": ""} alike: a filter of nothing must not select everything.
            raise ApiError(400, "filter_required", "give a filter (destination, reason, since, until or ids)")
        return flt

    async def discards(self, request: web.Request) -> web.Response:
        records = await self.runtime.store.list_discards(filter_from_query(request), _limit(request))
        return json_response({"discards": [discard_json(r) for r in records]})

    async def translate(self, request: web.Request) -> web.Response:
        """Dry-run the live mapping. With ``?destination=`` it answers as that destination's
        worker would: its mapping, its mapping_options and the identity links in the store."""
        q, config = request.query, self.runtime.config
        dest = None
        if q.get("destination"):
            names = [d.name for d in config.destinations]
            dest = next((d for d in config.destinations if d.name == q["destination"]), None)
            if dest is None:
                raise ApiError(
                    400,
                    "unknown_destination",
                    f"?destination= must name a configured destination{did_you_mean(q['destination'], names)}",
                )
        name = q.get("mapping") or (dest.mapping if dest else "")
        mapping = self.runtime.mappings().get(name)
        if mapping is None:
            known = ", ".join(sorted(self.runtime.mappings()))
            raise ApiError(400, "unknown_mapping", f"?mapping= (or ?destination=) must name a loaded mapping ({known})")
        source = q.get("source", "")
        if source and config.source(source) is None:
            hint = did_you_mean(source, [s.name for s in config.sources])
            raise ApiError(400, "unknown_source", f"?source= must name a configured source{hint}")
        if dest is None:
            dest = next((d for d in config.destinations if d.mapping == name), None)
        options = dest.mapping_options if dest else {}
        data = parse_json(await read_body(request, MAX_ADMIN_BODY))
        # As the worker sees them: what ingest stores of each, or its refusal.
        ingested = as_ingested_each(mapping.source_format, data if isinstance(data, list) else [data])
        events = [e for e in ingested if not isinstance(e, Refused)]
        given_link = q.get("linked_id") or None
        links: dict[str, str] = {}
        if dest is not None and q.get("destination"):
            wanted = ids_to_resolve(mapping, events, options)
            links = await self.runtime.store.resolve_links(dest.name, wanted) if wanted else {}
        results = []
        for index, event in enumerate(ingested):
            if isinstance(event, Refused):
                results.append(refused_json(event))
                continue
            ctx = link_context(mapping, event, links, options=options, source=source, linked_id=given_link)
            translated = translate_events(mapping, [event], ctx)
            try:
                orjson.dumps({"results": translated})  # nested as the answer nests it
            except orjson.JSONEncodeError as exc:
                # Read (1024 levels) but not writable (254): the answer could not be sent.
                raise ApiError(
                    400, "event_too_deep", f"event {index}: its translation cannot be written as JSON: {exc}"
                ) from None
            results += translated
        return json_response({"mapping": name, "version": mapping.version, "results": results})

    async def pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        name = request.match_info["name"]
        if name not in self.runtime.delivery.workers:
            raise ApiError(404, "not_found", f"no destination named {name!r}")
        made_due = await self.runtime.delivery.set_paused(name, paused, "paused by admin API" if paused else "")
        answer: dict[str, Any] = {"destination": name, "paused": paused}
        if not paused:
            answer["made_due"] = made_due  # waiting retries brought forward
        return json_response(answer)

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.runtime.reload_mappings()
        if result.problems:
            raise ApiError(
                400,
                "invalid_mappings",
                "the new mappings were rejected; the old ones stay in force",
                {"problems": result.problems},
            )
        # "reloaded" stays true on success, for callers that only check it; "changed" tells
        # a reload that deployed something from one that found nothing new (empty).
        return json_response(
            {
                "reloaded": True,
                "changed": result.changed,
                "mappings": {n: m.version for n, m in self.runtime.mappings().items()},
            }
        )
