"""Segment's Tracking API spec: what makes a call valid, and how Segment normalises it.

Codes follow Segment's ingest discard codes (Delivery Overview) where one fits. The
timestamp arithmetic is Segment's: ``timestamp = receivedAt - (sentAt - originalTimestamp)``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.sources.segment.millis import EPOCH, MICROSECOND, MILLIS_Z, MillisText, micros
from bridge.store.ordering import ordering_key

CALL_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
# Types only Segment's Webhooks destination sends, never a client: a deletion request
# (a GDPR delete, regulation "Suppress and delete"). The Tracking API has no such route
# and its calls keep refusing the type (an SDK cannot ask for a deletion through it).
WEBHOOK_ONLY_TYPES = frozenset({"delete"})
# Segment's own limit on a messageId, one constant for what comes in and what the mappings
# send out (bridge.mapping.shapes reads it from here: this module imports nothing of the
# mapping package, which imports it).
MAX_MESSAGE_ID = 100


class Invalid(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def iso(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z, as Segment writes timestamps."""
    # This runs per event. %-formatting the fields is about twice as fast as
    # isoformat(timespec="milliseconds") plus its suffix handling, and gives the same
    # text (4-digit year, milliseconds truncated); strftime is slower still.
    if dt.tzinfo is not UTC and dt.utcoffset() != _ZERO:
        dt = dt.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031
        dt.year,
        dt.month,
        dt.day,
        dt.hour,
        dt.minute,
        dt.second,
        dt.microsecond // 1000,
    )


_ZERO = timedelta(0)


def _is_iso(text: str) -> bool:
    """Whether ``text``, which parsed as a time, is already written as ``iso`` writes it:
    JavaScript's toISOString() (analytics.js and most SDKs) is. Such a text is kept as
    sent rather than written again, the same characters at half a microsecond less."""
    return (
        len(text) == 24
        and text[23] == "Z"
        and text[4:20:3] == "--T::."  # the separators at 4, 7, 10, 13, 16 and 19, in one slice
        and text[11:13] != "24"  # Python 3.14 reads 24:00 as the next day's 00:00
        and text.isascii()  # with the separators in place, the rest are ASCII digits
    )


def batch_of(data: dict[str, Any]) -> list[Any]:
    """The calls of a /v1/batch (or /v1/import) body, or Invalid for an envelope the route
    refuses whole: its batch, context and integrations are merged into every call."""
    items = data.get("batch")
    if not isinstance(items, list):
        raise Invalid("invalid_batch", "batch must be an array of events")
    for key in ("context", "integrations"):
        # Merged into every event: a wrong type would otherwise be dropped unseen.
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise Invalid(f"{key}_not_object", f"the batch's {key} must be an object")
    return items


class ReceivedClock:
    """The time a request was received, its ``iso`` text and its epoch microseconds, to the
    millisecond that receivedAt keeps. Requests handled within one millisecond share them:
    at thousands of requests a second most reuse the last, where each formatting its own
    cost about a microsecond. A new millisecond of a second already seen only writes its
    milliseconds onto that second's text. Used on the event loop's thread only."""

    __slots__ = ("_at", "_envelope", "_ms", "_second", "_second_at", "_second_text", "_text", "_us")

    def __init__(self) -> None:
        self._ms = -1
        self._second = -1
        self._at = self._second_at = datetime.fromtimestamp(0, UTC)
        self._text = self._second_text = ""
        self._us = 0
        self._envelope: Envelope | None = None

    def now(self) -> tuple[datetime, str, int]:
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            self._tick(ms)
        return self._at, self._text, self._us

    def envelope(self) -> Envelope:
        """The envelope of a call with nothing but its receipt time to share (a single
        Tracking API call): the same object for every such call of one millisecond, as
        nothing writes to an envelope once built."""
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            self._tick(ms)
        envelope = self._envelope
        if envelope is None:
            envelope = self._envelope = Envelope(self._at, self._text, self._us)
        return envelope

    def _tick(self, ms: int) -> None:
        seconds, millis = divmod(ms, 1000)
        if seconds != self._second:
            self._second, self._second_at = seconds, datetime.fromtimestamp(seconds, UTC)
            self._second_text = iso(self._second_at)[:20]  # up to the seconds' ".": 2026-11-23T21:14:07.
        self._ms, self._us, self._envelope = ms, ms * 1000, None
        self._at = self._second_at.replace(microsecond=millis * 1000)
        self._text = "%s%03dZ" % (self._second_text, millis)  # noqa: UP031 (as iso writes it, faster)


class Envelope:
    """What every event of one request shares, worked out once for all of them: when the
    request was received, the batch's sentAt (parsed, when it parses), the batch's context
    and integrations, and whether its events come already normalised (a webhook's)."""

    __slots__ = (
        "batch_skew_us",
        "context",
        "integrations",
        "keep_timestamp",
        "merges",
        "more_types",
        "received_at",
        "received_iso",
        "received_us",
        "sent_at",
        "sent_parsed",
        "skew_us",
        "write_key_digest",
    )

    def __init__(
        self,
        received_at: datetime,
        received_iso: str | None = None,
        received_us: int | None = None,
        *,
        sent_at: Any = None,
        context: Any = None,
        integrations: Any = None,
        keep_timestamp: bool = False,
        more_types: frozenset[str] = frozenset(),
        write_key_digest: bytes | None = None,
    ) -> None:
        self.received_at = received_at
        self.received_iso = received_iso if received_iso is not None else iso(received_at)
        self.received_us = received_us if received_us is not None else micros(received_at)
        self.sent_at = sent_at
        self.sent_parsed: datetime | None = None
        # receivedAt - sentAt in whole microseconds, when the batch's sentAt parses: an
        # event without its own sentAt has its timestamp this far from its device time.
        self.skew_us: int | None = None
        if sent_at is not None:
            try:
                self.sent_parsed = parse_time(sent_at, "sentAt")
                self.skew_us = self.received_us - micros(self.sent_parsed)
            except Invalid:
                pass  # left for each event to report, as its own sentAt would be
        self.context = context
        self.integrations = integrations
        self.merges = bool(context or integrations)  # a batch's context or integrations to merge
        self.keep_timestamp = keep_timestamp
        # skew_us where normalise_in may correct an event's timestamp by it inline: not a
        # webhook's events, whose timestamps are kept.
        self.batch_skew_us = None if keep_timestamp else self.skew_us
        # Call types taken besides CALL_TYPES: a webhook's WEBHOOK_ONLY_TYPES.
        self.more_types = more_types
        # The SHA-256 of the write key the request authenticated with, for a batch, whose
        # items may carry their own writeKey: one naming another key is refused, not taken
        # into this source (and its workspace, maybe its region). None: nothing to check (a
        # single call's writeKey is the body's, already checked).
        self.write_key_digest = write_key_digest


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


_EXACT_FLOAT = 2**53  # every integer below it is exact as a double


def number_id(value: int | float) -> str | None:
    """A numeric id as text, written as JavaScript (and so Segment) writes the number: 12.0
    is "12", not Python's "12.0". None for a float past 2^53, whose digits are lost (orjson
    reads an integer beyond 64 bits as one): "1.2345678901234568e+29" would be another
    user's id."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value) or abs(value) >= _EXACT_FLOAT:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def _id(value: Any) -> str | None:
    """Segment ids are strings; clients also send numbers, which Segment stringifies."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise Invalid("id_not_string", f"ids must be strings, got {_kind(value)}")
    if isinstance(value, int | float):
        text = number_id(value)
        if text is None:
            raise Invalid("id_not_string", "a numeric id this large has lost digits in JSON: send ids as strings")
        return text
    if not isinstance(value, str):
        raise Invalid("id_not_string", f"ids must be strings, got {_kind(value)}")
    return value if value.strip() else None


def _merge_context(item: dict[str, Any], batch_context: Any, batch_integrations: Any) -> None:
    # The item's own keys win: they are more specific than the batch's defaults. An item's
    # own value that is not an object is left for normalise to refuse, not replaced.
    if isinstance(batch_context, dict) and batch_context:
        own = item.get("context")
        if own is None or isinstance(own, dict):
            item["context"] = {**batch_context, **own} if own else dict(batch_context)
    if isinstance(batch_integrations, dict) and batch_integrations:
        own = item.get("integrations")
        if own is None or isinstance(own, dict):
            item["integrations"] = {**batch_integrations, **own} if own else dict(batch_integrations)


def normalise(
    item: Any,
    *,
    call_type: str | None,
    received_at: datetime | None = None,
    sent_at: Any = None,
    batch_context: Any = None,
    batch_integrations: Any = None,
    keep_timestamp: bool = False,
    envelope: Envelope | None = None,
) -> tuple[dict[str, Any], str, str]:
    """Validate one call and return (event, message_id, ordering_key).

    ``call_type`` forces the type (single-call endpoints); batches carry it per item.
    ``keep_timestamp`` is for events Segment already normalised (webhooks).
    A handler passes its request's ``envelope`` (built once for all its events) instead
    of ``received_at``, ``sent_at``, ``batch_context``, ``batch_integrations`` and
    ``keep_timestamp``; its hot loop calls ``normalise_in`` directly.
    """
    if envelope is None:
        if received_at is None:
            raise TypeError("normalise needs received_at or an envelope")
        envelope = Envelope(
            received_at,
            sent_at=sent_at,
            context=batch_context,
            integrations=batch_integrations,
            keep_timestamp=keep_timestamp,
        )
    return normalise_in(item, call_type, envelope)


def normalise_in(item: Any, call_type: str | None, envelope: Envelope) -> tuple[dict[str, Any], str, str]:
    """``normalise`` with its arguments positional: it runs once per event, so it is written
    for the common call, a valid one. Where a field is already what the stored event must
    hold (a string id, a batch item's own type), it is not written back: only checks and
    conversions cost anything (docs/benchmarks.md, session 22)."""
    if not isinstance(item, dict):
        raise Invalid("invalid_event", f"each event must be a JSON object, got {_kind(item)}")
    event = dict(item)
    if "writeKey" in event:  # fewer steps than pop(key, None), for the event that has none
        own_key = event.pop("writeKey")  # a secret: never stored with the event
        if envelope.write_key_digest is not None and own_key is not None and own_key != "":
            _check_own_key(own_key, envelope.write_key_digest)
    kind: Any
    if call_type:
        kind = call_type
        event["type"] = kind
    else:
        kind = event.get("type")
    # more_types is looked at only for a type outside CALL_TYPES: the common call pays nothing.
    if not isinstance(kind, str) or (kind not in CALL_TYPES and kind not in envelope.more_types):
        raise _invalid_type(kind, envelope)
    if envelope.merges:
        _merge_context(event, envelope.context, envelope.integrations)

    user_id = event.get("userId")
    if type(user_id) is not str or not user_id.strip():
        user_id = _id(user_id)
        if user_id is not None:
            event["userId"] = user_id
    anon_id = event.get("anonymousId")
    if type(anon_id) is not str or not anon_id.strip():
        anon_id = _id(anon_id)
        if anon_id is not None:
            event["anonymousId"] = anon_id
    if kind == "alias":
        previous = _id(event.get("previousId"))
        if user_id is None or previous is None:
            raise Invalid("id_required", "alias requires userId and previousId")
        event["previousId"] = previous
    elif kind == "delete":
        # A deletion names the user to delete: an anonymousId names no MoEngage user, and
        # "delete whoever this is" must never be guessed at.
        if user_id is None:
            raise Invalid("id_required", "delete requires userId, the user to delete")
    elif user_id is None and anon_id is None:
        raise Invalid("id_required", f"{kind} requires userId or anonymousId")

    if kind == "track":
        name = event.get("event")
        if name is None or name == "":
            raise Invalid("event_not_defined", "track requires an event name")
        if not isinstance(name, str):
            raise Invalid("event_not_string", f"event must be a string, got {_kind(name)}")
        if name[0].isspace() and not name.strip():
            # MoEngage refuses a blank action name (400), so it would only be dead-lettered.
            raise Invalid("event_not_defined", "track requires an event name, and this one is blank")
    elif kind == "page" or kind == "screen":
        name = event.get("name")
        if name is not None and (not name or not isinstance(name, str)):
            raise _not_string("name", name)
        category = event.get("category")
        if category is not None and (not category or not isinstance(category, str)):
            raise _not_string("category", category)
    elif kind == "group":
        group_id = _id(event.get("groupId"))
        if group_id is None:
            raise Invalid("id_required", "group requires groupId")
        event["groupId"] = group_id

    properties = event.get("properties")
    traits = event.get("traits")
    context = event.get("context")
    integrations = event.get("integrations")
    if not (
        (properties is None or type(properties) is dict)
        and (traits is None or type(traits) is dict)
        and (context is None or type(context) is dict)
        and (integrations is None or type(integrations) is dict)
    ):
        _check_objects(event)

    message_id = event.get("messageId")
    if type(message_id) is not str or not message_id:
        message_id = _message_id(message_id)
        event["messageId"] = message_id
    if len(message_id) > MAX_MESSAGE_ID:
        raise Invalid("message_id_too_long", f"messageId is {len(message_id)} characters; at most 100")

    try:
        skew_us = envelope.batch_skew_us
        original_raw = event.get("timestamp")
        if skew_us is not None and original_raw and "sentAt" not in event:
            # The usual batch event (a timestamp, no sentAt of its own, the batch's
            # sentAt parsed): _compute_timestamps' skew correction written out, a call and
            # a frame less an event. It sets the same fields in the same order. A falsy
            # timestamp ("", null, 0, false) is left to it; any other one that is no
            # string fails fromisoformat here (TypeError) and parse_time reports it.
            event["receivedAt"] = envelope.received_iso
            try:
                original = _fromisoformat(original_raw)
            except (TypeError, ValueError):
                original = parse_time(original_raw, "timestamp")  # raises what was wrong
            if original.tzinfo is None:
                original = original.replace(tzinfo=UTC)
            us = skew_us + (original - EPOCH) // MICROSECOND
            event["originalTimestamp"] = original_raw
            event["sentAt"] = envelope.sent_at
            head = _SECOND_HEADS.get(us // 1_000_000)
            if head is None:
                head = _MILLIS_TEXT.head(us // 1_000_000)  # OverflowError out of range
            event["timestamp"] = head + MILLIS_Z[us // 1000 % 1000]
        else:
            _compute_timestamps(event, envelope)
    except (OverflowError, ValueError):
        # e.g. year 1 or 9999 with a skew that leaves datetime's range
        raise Invalid("invalid_timestamp", "timestamp, sentAt or originalTimestamp is out of range") from None
    if kind == "alias":
        # A merge must wait for the merged-away user's earlier events, or they would land
        # on a user MoEngage has already merged; and it must not overtake the retained
        # user's own earlier events (its identify). It is ordered with both users' events.
        return event, message_id, ordering_key(event["previousId"], user_id or "")
    return event, message_id, user_id or anon_id or ""


def _check_own_key(own_key: Any, expected_digest: bytes) -> None:
    """Raise unless a batch item's own writeKey is the key its request authenticated with,
    compared in constant time (through digests, so lengths do not leak either)."""
    given = own_key.encode("utf-8", "surrogatepass") if isinstance(own_key, str) else b""
    if not (given and hmac.compare_digest(hashlib.sha256(given).digest(), expected_digest)):
        raise Invalid(
            "write_key_mismatch",
            "this event's writeKey is another key than the one the batch was sent with; send it"
            " in a batch of its own key's source",
        )


def _invalid_type(kind: Any, envelope: Envelope) -> Invalid:
    if envelope.keep_timestamp and isinstance(kind, str) and kind in WEBHOOK_ONLY_TYPES:
        # A webhook that does not take deletions: its source has no webhook_secret.
        return Invalid(
            "unsigned_deletion",
            f"a {kind} is taken only from a source with a webhook_secret, which Segment signs its"
            " requests with: the write key alone does not vouch for one (apps carry it for anyone to read)",
        )
    return Invalid(
        "invalid_type",
        f"type must be one of {', '.join(sorted(CALL_TYPES | envelope.more_types))}; got {kind!r}"
        if kind is not None
        else "type is required for each event in a batch",
    )


def _not_string(key: str, value: Any) -> Invalid:
    return Invalid(f"{key}_not_string", f"{key} must be a non-empty string when present, got {_kind(value)}")


# Checked in this order, so the first problem reported is the same as always.
_OBJECT_FIELDS = (
    ("properties", "properties_not_object"),
    ("traits", "traits_not_object"),
    ("context", "context_not_object"),
    ("integrations", "integrations_not_object"),
)


def _check_objects(event: dict[str, Any]) -> None:
    """Raise for the first of ``_OBJECT_FIELDS`` that is neither absent, null nor an object."""
    for key, code in _OBJECT_FIELDS:
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            raise Invalid(code, f"{key} must be an object, got {_kind(value)}")


def _message_id(value: Any) -> str:
    """The messageId of a call that sent none (a new one), an empty one (a new one) or a
    number (as text, as Segment's API does)."""
    if value is None or value == "":
        return str(uuid.uuid4())
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):  # a str subclass
        return value
    raise Invalid("message_id_not_string", f"messageId must be a string, got {_kind(value)}")


def _compute_timestamps(event: dict[str, Any], envelope: Envelope) -> None:
    received = envelope.received_iso
    if envelope.keep_timestamp:
        # Only null and "" mean "not given", for every time field; any other non-string
        # (0, false, {}) is reported as an invalid timestamp rather than quietly replaced.
        kept = event.get("timestamp")
        own_received = event.get("receivedAt")
        if own_received is None or own_received == "":
            event["receivedAt"] = received
            own_received = None
        if kept is not None and kept != "":
            parse_time(kept, "timestamp")
            return
        # Only a webhook (kept) carries the receivedAt Segment itself set: a timestamp
        # missing (a Webhooks (Actions) mapping may leave it out) is worked out from that,
        # as Segment would have, not from when the bridge got it: Segment retries a
        # refused webhook for up to 4 hours.
        if own_received is not None:
            envelope = _received_at(envelope, parse_time(own_received, "receivedAt"))
            received = envelope.received_iso
    else:
        # receivedAt is when the server got the call, as Segment's API sets it whatever
        # the client sent.
        event["receivedAt"] = received
    # A client-supplied timestamp is the device time: Segment keeps it as originalTimestamp.
    original_raw = event.get("timestamp")
    if original_raw is None or original_raw == "":
        original_raw = event.get("originalTimestamp")
        if original_raw is None or original_raw == "":
            event["timestamp"] = received
            return
    own_sent = event.get("sentAt")
    if own_sent is None or own_sent == "":
        skew_us = envelope.skew_us
        if skew_us is not None:
            # The batch's sentAt, parsed once: the skew in integers, and the text from them.
            # parse_time and micros written out, as they run for nearly every batch event.
            try:
                original = _fromisoformat(original_raw)
            except (TypeError, ValueError):
                original = parse_time(original_raw, "timestamp")  # raises what was wrong
            if original.tzinfo is None:
                original = original.replace(tzinfo=UTC)
            original_us = (original - EPOCH) // MICROSECOND
            event["originalTimestamp"] = original_raw
            event["sentAt"] = envelope.sent_at
            # _MILLIS_TEXT.format written out (a call and a frame an event): the
            # second's head, cached, and the milliseconds' text.
            us = skew_us + original_us
            head = _SECOND_HEADS.get(us // 1_000_000)
            if head is None:
                head = _MILLIS_TEXT.head(us // 1_000_000)  # OverflowError out of range
            event["timestamp"] = head + MILLIS_Z[us // 1000 % 1000]
            return
        own_sent = None
        sent_raw = None if envelope.sent_at == "" else envelope.sent_at
    else:
        sent_raw = own_sent
    original = parse_time(original_raw, "timestamp")
    event["originalTimestamp"] = original_raw
    if sent_raw is None:
        event["timestamp"] = original_raw if _is_iso(original_raw) else iso(original)
        return
    # The batch's sentAt is parsed once for all its events.
    sent = envelope.sent_parsed if own_sent is None else None
    if sent is None:
        sent = parse_time(sent_raw, "sentAt")
    event["sentAt"] = sent_raw
    skew: timedelta = sent - original
    event["timestamp"] = iso(envelope.received_at - skew)


def _received_at(envelope: Envelope, at: datetime) -> Envelope:
    """``envelope`` as if its request had been received ``at`` (a webhook event's own
    receivedAt), for one event's timestamps: its sentAt (a dry run's batch) is then reckoned
    from ``at`` too."""
    return Envelope(at, sent_at=envelope.sent_at, keep_timestamp=True, more_types=envelope.more_types)


# Shared by every request: its caches hold seconds and minutes, a few for any batch.
_MILLIS_TEXT = MillisText()
_SECOND_HEADS = _MILLIS_TEXT.seconds
_fromisoformat = datetime.fromisoformat
