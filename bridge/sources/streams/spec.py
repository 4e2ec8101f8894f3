"""MoEngage Streams payloads: the envelope variants and what each event needs."""

from __future__ import annotations

import hashlib
import math
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.sources.encoding import too_deep
from bridge.sources.segment.spec import MAX_MESSAGE_ID, Invalid, number_id

# Epoch values above this are milliseconds (year 5138 in seconds; 1973 in ms).
_MS_THRESHOLD = 100_000_000_000
# The stored event_time is epoch seconds, and every later reader (the mapping's iso8601
# step too) takes a number this large for milliseconds: a time from the year 5138 on,
# given as ISO-8601, would come out in 1973. Such times are refused instead.
_MAX_SECONDS = _MS_THRESHOLD - 1
# event_uuid is MoEngage's event id (a UUID), and the relayed track's messageId, which
# Segment takes up to 100 characters. A longer one is refused by index, as the Tracking
# API refuses such a messageId, rather than fail later: in PostgreSQL's dedupe index a key
# past about 2.7 KB failed the whole request's enqueue with a 503.
MAX_EVENT_UUID = MAX_MESSAGE_ID
# An epoch time written as text: ASCII digits only. float() also reads "1_767_225_600"
# and other scripts' digits, which no sender means as a time.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The id given to an event that came without an event_uuid: this prefix, then the first
# DERIVED_HEX hex digits of a SHA-256 of its content (see ``derived_uuid``).
DERIVED_PREFIX = "moe-h-"
DERIVED_HEX = 32


def events_of(data: Any) -> list[Any]:
    """The events of a Streams request: the documented ``{events: [...]}`` envelope, or
    the single-event ``{app_name, export_doc_id, event: {...}}`` that receivers also see."""
    if not isinstance(data, dict):
        raise Invalid("invalid_payload", "expected a JSON object with `events` (or `event`)")
    # A null envelope member is an absent one, both ways: a sender that writes every field
    # of its payload class sends one event as {"events": null, "event": {...}}.
    events = data.get("events")
    if events is not None:
        if not isinstance(events, list):
            raise Invalid("invalid_payload", "`events` must be an array")
        if data.get("event") is not None:
            # Both envelopes at once: take every event rather than refuse the request, which
            # MoEngage would retry and then drop. A repeat of one is a duplicate (event_uuid).
            events = [*events, data["event"]]
        # An empty batch (a connectivity check) is no error: it is answered as an accepted
        # batch with nothing in it. Refused, MoEngage would retry it and report failures.
        return events
    if "event" in data:
        return [data["event"]]
    raise Invalid("invalid_payload", "expected `events` (an array) or `event` (an object)")


def epoch_seconds(value: Any) -> int | float:
    """Normalise event_time (epoch s, epoch ms, numeric string or ISO-8601) to epoch seconds."""
    if isinstance(value, bool):
        raise Invalid("invalid_event_time", "event_time must be epoch seconds, ms or ISO-8601, got a boolean")
    epoch = True
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            value = float(text)
        else:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise Invalid("invalid_event_time", f"event_time is not a time: {text[:40]!r}") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            value, epoch = dt.timestamp(), False  # already seconds: no ms guess
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise Invalid("invalid_event_time", "event_time must be a positive epoch time or ISO-8601 string")
    if epoch and value >= _MS_THRESHOLD:
        value = value / 1000.0
    if value > _MAX_SECONDS:
        raise Invalid("invalid_event_time", "event_time is after the year 5138 (read as epoch seconds, later is ms)")
    if value < 0.001:
        # Stored to the millisecond: a smaller positive time would be stored as 0, 1970.
        raise Invalid("invalid_event_time", "event_time must be a positive epoch time or ISO-8601 string")
    whole = int(value)
    return whole if value == whole else round(float(value), 3)


def normalise(item: Any, received: float | None = None) -> tuple[dict[str, Any], str, str]:
    """Validate one Streams event: (event, event_uuid, ordering key). ``received``: when
    its request was received (epoch seconds; now when None), its time if it gives none."""
    if not isinstance(item, dict):
        raise Invalid("invalid_event", "each event must be a JSON object")
    event = dict(item)
    uuid = event.get("event_uuid")
    if uuid is None:
        # Absent or null: an id made from the content, so a retried request (MoEngage resends
        # it unchanged) is deduplicated rather than delivered again. Refused, the event was lost.
        uuid = derived_uuid(item)
    elif isinstance(uuid, int) and not isinstance(uuid, bool):
        uuid = str(uuid)
    if not isinstance(uuid, str) or not uuid.strip():
        raise Invalid(
            "event_uuid_required", "event_uuid must be a non-empty string (or absent, for an id from the content)"
        )
    if len(uuid) > MAX_EVENT_UUID:
        raise Invalid("event_uuid_too_long", f"event_uuid is {len(uuid)} characters; at most {MAX_EVENT_UUID}")
    event["event_uuid"] = uuid
    name, code = event.get("event_name"), event.get("event_code")
    if name is not None and not isinstance(name, str):
        raise Invalid("event_name_not_string", "event_name must be a string when present")
    if not name and not (isinstance(code, str) and code):
        raise Invalid("event_name_required", "event_code or event_name is required (a non-empty string)")
    given = event.get("event_time")
    if given is None or (isinstance(given, str) and not given.strip()):
        # No time given (absent, null or blank): the time the bridge received it, as Segment's
        # Tracking API times a call without a timestamp. Refused, the event was lost: alone in
        # its request, MoEngage retries the 400 and then drops it; beside others, it is never
        # resent (the 200 lists it, but MoEngage does not read the answer). Stored, so every
        # attempt and a replay send the same time; the derived event_uuid was taken before.
        given = time.time() if received is None else received
    event["event_time"] = epoch_seconds(given)
    for key in ("event_attributes", "user_attributes", "device_attributes"):
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            raise Invalid(f"{key}_not_object", f"{key} must be an object")
    # Segment needs a userId or an anonymousId: uid, else MoEngage's own user id.
    # The ordering key is the same text the mapping sends, so one user is one key.
    uid = event.get("uid")
    if uid is not None and not _user_id(uid):
        # Not a usable id (blank, an object, a list, a boolean): absent, so MoEngage's own
        # user id stands in, as the mapping would otherwise send "true" or '{"a":1}' as the
        # Segment userId. Refused, the event would be lost: MoEngage does not retry a 200.
        del event["uid"]
    key = _user_id(event.get("uid")) or _user_id((event.get("user_attributes") or {}).get("moengage_user_id"))
    if not key:
        raise Invalid("id_required", "uid or user_attributes.moengage_user_id is required (Segment needs a user)")
    return event, uuid, key


def derived_uuid(item: dict[str, Any]) -> str:
    """The event_uuid of an event that has none: a hash of the event as received (before
    ``normalise`` rewrites event_time or drops a uid), its keys sorted at every level so that
    the order a sender writes them in does not matter."""
    try:
        content = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # Nested past what orjson writes: the stored event could not be written either.
        raise too_deep() from None
    return DERIVED_PREFIX + hashlib.sha256(content).hexdigest()[:DERIVED_HEX]


def _user_id(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return number_id(value) or ""  # a number that lost its digits is no usable id
