"""Segment's Tracking API spec: what makes a call valid, and how Segment normalises it.

Codes follow Segment's ingest discard codes (Delivery Overview) where one fits. The
timestamp arithmetic is Segment's: ``timestamp = receivedAt - (sentAt - originalTimestamp)``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

CALL_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_MESSAGE_ID = 100


class Invalid(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def iso(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z, as Segment writes timestamps."""
    # isoformat is several times faster than strftime, and this runs per event.
    if dt.utcoffset() != _ZERO:
        dt = dt.astimezone(UTC)
    text = dt.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text + "Z"


_ZERO = timedelta(0)


def parse_time(value: Any, field: str) -> datetime:
    if not isinstance(value, str) or not value:
        raise Invalid("invalid_timestamp", f"{field} must be an ISO-8601 string, got {_kind(value)}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid("invalid_timestamp", f"{field} is not an ISO-8601 time: {value[:40]!r}") from None
    # A time without an offset is taken as UTC, as Segment does for server-side calls.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _id(value: Any) -> str | None:
    """Segment ids are strings; clients also send numbers, which Segment stringifies."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise Invalid("id_not_string", f"ids must be strings, got {_kind(value)}")
    if isinstance(value, int | float):
        return str(value)
    if not isinstance(value, str):
        raise Invalid("id_not_string", f"ids must be strings, got {_kind(value)}")
    return value if value.strip() else None


def _merge_context(item: dict[str, Any], batch_context: Any, batch_integrations: Any) -> None:
    # The item's own keys win: they are more specific than the batch's defaults.
    if isinstance(batch_context, dict) and batch_context:
        own = item.get("context")
        item["context"] = {**batch_context, **own} if isinstance(own, dict) else dict(batch_context)
    if isinstance(batch_integrations, dict) and batch_integrations:
        own = item.get("integrations")
        item["integrations"] = {**batch_integrations, **own} if isinstance(own, dict) else dict(batch_integrations)


def normalise(
    item: Any,
    *,
    call_type: str | None,
    received_at: datetime,
    sent_at: Any = None,
    batch_context: Any = None,
    batch_integrations: Any = None,
    keep_timestamp: bool = False,
) -> tuple[dict[str, Any], str, str]:
    """Validate one call and return (event, message_id, ordering_key).

    ``call_type`` forces the type (single-call endpoints); batches carry it per item.
    ``keep_timestamp`` is for events Segment already normalised (webhooks).
    """
    if not isinstance(item, dict):
        raise Invalid("invalid_event", f"each event must be a JSON object, got {_kind(item)}")
    event = dict(item)
    event.pop("writeKey", None)  # a secret: never stored with the event
    kind = call_type or event.get("type")
    if not isinstance(kind, str) or kind not in CALL_TYPES:
        raise Invalid(
            "invalid_type",
            f"type must be one of {', '.join(sorted(CALL_TYPES))}; got {kind!r}"
            if kind is not None
            else "type is required for each event in a batch",
        )
    event["type"] = kind
    _merge_context(event, batch_context, batch_integrations)

    user_id = _id(event.get("userId"))
    anon_id = _id(event.get("anonymousId"))
    if user_id is not None:
        event["userId"] = user_id
    if anon_id is not None:
        event["anonymousId"] = anon_id
    if kind == "alias":
        previous = _id(event.get("previousId"))
        if user_id is None or previous is None:
            raise Invalid("id_required", "alias requires userId and previousId")
        event["previousId"] = previous
    elif user_id is None and anon_id is None:
        raise Invalid("id_required", f"{kind} requires userId or anonymousId")

    if kind == "track":
        name = event.get("event")
        if name is None or name == "":
            raise Invalid("event_not_defined", "track requires an event name")
        if not isinstance(name, str):
            raise Invalid("event_not_string", f"event must be a string, got {_kind(name)}")
    elif kind == "group":
        group_id = _id(event.get("groupId"))
        if group_id is None:
            raise Invalid("id_required", "group requires groupId")
        event["groupId"] = group_id
    elif kind in ("page", "screen"):
        for key, code in (("name", "name_not_string"), ("category", "category_not_string")):
            value = event.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise Invalid(code, f"{key} must be a non-empty string when present, got {_kind(value)}")

    for key, code in (("properties", "properties_not_object"), ("traits", "traits_not_object")):
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            raise Invalid(code, f"{key} must be an object, got {_kind(value)}")
    for key in ("context", "integrations"):
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            raise Invalid(f"{key}_not_object", f"{key} must be an object, got {_kind(value)}")

    message_id = event.get("messageId")
    if message_id is None or message_id == "":
        message_id = str(uuid.uuid4())
    elif isinstance(message_id, int) and not isinstance(message_id, bool):
        message_id = str(message_id)
    elif not isinstance(message_id, str):
        raise Invalid("message_id_not_string", f"messageId must be a string, got {_kind(message_id)}")
    if len(message_id) > MAX_MESSAGE_ID:
        raise Invalid("message_id_too_long", f"messageId is {len(message_id)} characters; at most 100")
    event["messageId"] = message_id

    _timestamps(event, received_at, sent_at, keep_timestamp)
    return event, message_id, user_id or anon_id or ""


@lru_cache(maxsize=8)
def _received_iso(received_at: datetime) -> str:
    # One request's events share one receivedAt: format it once, not per event.
    return iso(received_at)


def _timestamps(event: dict[str, Any], received_at: datetime, sent_at: Any, keep: bool) -> None:
    try:
        _compute_timestamps(event, received_at, sent_at, keep)
    except (OverflowError, ValueError):
        # e.g. year 1 or 9999 with a skew that leaves datetime's range
        raise Invalid("invalid_timestamp", "timestamp, sentAt or originalTimestamp is out of range") from None


def _compute_timestamps(event: dict[str, Any], received_at: datetime, sent_at: Any, keep: bool) -> None:
    event.setdefault("receivedAt", _received_iso(received_at))
    if keep and event.get("timestamp") is not None:
        parse_time(event["timestamp"], "timestamp")
        return
    # A client-supplied timestamp is the device time: Segment keeps it as originalTimestamp.
    original_raw = event.get("timestamp") or event.get("originalTimestamp")
    sent_raw = event.get("sentAt") if event.get("sentAt") is not None else sent_at
    if original_raw is None:
        event["timestamp"] = _received_iso(received_at)
        return
    original = parse_time(original_raw, "timestamp")
    event["originalTimestamp"] = original_raw
    if sent_raw is None:
        event["timestamp"] = iso(original)
        return
    sent = parse_time(sent_raw, "sentAt")
    event["sentAt"] = sent_raw
    skew: timedelta = sent - original
    event["timestamp"] = iso(received_at - skew)
