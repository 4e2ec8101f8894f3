"""A stand-in for Segment's Tracking API batch endpoint, answering as Segment does.

Segment answers 200 to almost everything and drops bad data silently: unknown
write keys, keys of another region's workspace, events that fail its spec checks.
Only invalid JSON and oversize payloads get a 400 (shared/reference/segment-api.md §1).
An event whose messageId Segment already took is dropped as a duplicate, whichever source
or workspace took it (Segment deduplicates on messageId alone, for at least a day).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web

from bridge.testing.upstream import StandIn, clip

MAX_REQUEST_BYTES = 500_000
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500
CALL_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})

Auth = Literal["basic", "body", "both"]

_CODES = {400: "invalid_request", 401: "unauthorized", 429: "rate_limited"}
_MESSAGES = {400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error"}


@dataclass(frozen=True, slots=True)
class SegmentEvent:
    """One event Segment accepted, with its batch's sentAt and how the key came."""

    event: dict[str, Any]
    sent_at: Any
    write_key: str
    auth: Auth


@dataclass(frozen=True, slots=True)
class Dropped:
    """Data Segment answered 200 for but did not keep; ``event`` None for a whole batch."""

    # unknown_write_key, wrong_region, empty_batch, too_many_events, duplicate_message_id,
    # or a discard code
    reason: str
    write_key: str
    event: Any


class SegmentStandIn(StandIn):
    name: ClassVar[str] = "segment"

    def __init__(self, keys: Mapping[str, str], region: str = "us") -> None:
        """``keys``: write key -> the region of the workspace it belongs to; ``region``:
        the region whose ingestion host this stand-in is (keys of the other are dropped)."""
        super().__init__()
        self.keys = dict(keys)
        self.region = region
        self.accepted: list[SegmentEvent] = []
        self.dropped: list[Dropped] = []
        self._message_ids: set[str] = set()  # of the events accepted: Segment keeps one per id
        # What a 429 asks the client to wait: Segment's carries Retry-After and
        # X-RateLimit-Reset, both in seconds (segment-api.md, "Rate limits").
        self.retry_after = 1

    def events(self) -> list[dict[str, Any]]:
        """Every event accepted, in arrival order."""
        return [accepted.event for accepted in self.accepted]

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/batch", self._batch)]

    def log_fields(self) -> dict[str, Any]:
        return {"region": self.region}  # the sandbox runs one stand-in per region

    def error_body(self, status: int, message: str | None = None, kind: str | None = None) -> Any:
        return {
            "code": kind or _CODES.get(status, "server_error" if status >= 500 else "error"),
            "message": message or _MESSAGES.get(status, "Error"),
        }

    def error_headers(self, status: int) -> Mapping[str, str] | None:
        if status != 429:
            return None
        return {"Retry-After": str(self.retry_after), "X-RateLimit-Reset": str(int(time.time()) + self.retry_after)}

    async def _batch(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if len(raw) > MAX_REQUEST_BYTES:
            return self._invalid(request, "Exceed payload limit")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._invalid(request, "Invalid JSON")
        if not isinstance(body, dict):
            return self._invalid(request, "Invalid JSON")
        batch = body.get("batch")
        if not isinstance(batch, list):
            return self._invalid(request, "batch must be an array of events")
        if any(len(orjson.dumps(event)) > MAX_EVENT_BYTES for event in batch):
            return self._invalid(request, "Exceed payload limit")
        basic_key = _basic_username(request.headers.get("Authorization", ""))
        body_key = body.get("writeKey") if isinstance(body.get("writeKey"), str) else None
        write_key = basic_key or body_key
        if not write_key:
            return self._invalid(request, "Missing write key")
        auth: Auth = "both" if basic_key and body_key else "basic" if basic_key else "body"
        self.record(request, body, len(raw))
        reason = self._batch_problem(write_key, batch)
        if reason:
            self.dropped.append(Dropped(reason, write_key, None))
            self.note(request, summary=f"dropped batch of {len(batch)}: {reason}")
            return self.json_response(200, {"success": True})
        kept: Counter[str] = Counter()
        for event in batch:
            discard = discard_code(event)
            if discard:
                self.dropped.append(Dropped(discard, write_key, event))
                continue
            message_id = event.get("messageId")
            if isinstance(message_id, str) and message_id:
                # Without one, Segment assigns a new id: never a duplicate.
                if message_id in self._message_ids:
                    self.dropped.append(Dropped("duplicate_message_id", write_key, event))
                    continue
                self._message_ids.add(message_id)
            self.accepted.append(SegmentEvent(event, body.get("sentAt"), write_key, auth))
            kept[event["type"]] += 1
        dropped = len(batch) - sum(kept.values())
        summary = f"accepted {dict(kept)} dropped={dropped} auth={auth}"
        self.note(request, summary=summary, events=clip(batch))
        return self.json_response(200, {"success": True})

    def _invalid(self, request: web.Request, message: str) -> web.Response:
        self.note(request, error=message)
        return self.error(400, message, "invalid_request")

    def _batch_problem(self, write_key: str, batch: list[Any]) -> str | None:
        if write_key not in self.keys:
            return "unknown_write_key"
        if self.keys[write_key] != self.region:
            return "wrong_region"  # Segment drops cross-region data without an error
        if not batch:
            return "empty_batch"
        if len(batch) > MAX_BATCH_EVENTS:
            return "too_many_events"
        return None


def _basic_username(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


def discard_code(event: Any) -> str | None:
    """Segment's Delivery Overview discard code for an event, or None if it is valid."""
    if not isinstance(event, dict):
        return "invalid_event"
    kind = event.get("type")
    if kind not in CALL_TYPES:
        return "type_invalid"
    ids = ("userId", "previousId") if kind == "alias" else ("userId", "anonymousId")
    present = [event.get(key) for key in ids if event.get(key) is not None]
    if kind == "alias" and len(present) < 2:
        return "id_required"
    if not present:
        return "no_user_anon_id"
    if any(not isinstance(value, str) or not value for value in present):
        return "id_not_string"
    if kind == "track":
        if "event" not in event:
            return "event_not_defined"
        if not isinstance(event["event"], str) or not event["event"]:
            return "event_not_string"
    if kind == "group" and not event.get("groupId"):
        return "id_required"
    if kind in ("page", "screen"):
        # Optional, but a non-empty string when present (null is absent: segment-analytics-
        # python sends an unset name as null).
        for key in ("name", "category"):
            value = event.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                return f"{key}_not_string"
    if "properties" in event and not isinstance(event["properties"], dict):
        return "properties_not_object"
    if "traits" in event and not isinstance(event["traits"], dict):
        return "traits_not_object"
    return None
