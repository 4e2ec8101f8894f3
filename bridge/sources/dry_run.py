"""An event as ingest would have stored it, for dry runs (`bridge translate`, /admin/translate).

The worker maps stored events: what the source's validation left of a call, not the call
as sent. A dry run that skipped it would answer for an event the bridge never delivers
(a Streams `uid` of `true` is dropped at ingest; a Segment call without a timestamp gets
one there), or translate one ingest would refuse.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bridge.sources.segment.spec import WEBHOOK_ONLY_TYPES, Envelope, Invalid, batch_of
from bridge.sources.segment.spec import normalise as normalise_segment
from bridge.sources.streams.spec import events_of as streams_events_of
from bridge.sources.streams.spec import normalise as normalise_streams


class Refused(ValueError):
    """Ingest would have refused the event: ``code`` as in its answer's ``rejected`` list."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def as_ingested(
    source_format: str, item: Any, received_at: datetime | None = None, batch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``item`` as a source of ``source_format`` stores it; raises Refused as ingest would.
    ``batch``: the /v1/batch body a Segment item came in (its sentAt, context, integrations)."""
    try:
        if source_format == "moengage_streams":
            event, _, _ = normalise_streams(item, received_at.timestamp() if received_at else None)
        else:  # segment: a batch item, which names its own type
            # One with a receivedAt was timed already (a webhook's event as Segment sent it,
            # a payload shown by `bridge dlq show`): its timestamp stands, as webhook ingest
            # and replay keep it, instead of being recomputed from the time of this run.
            body = batch or {}
            envelope = Envelope(
                received_at or datetime.now(UTC),
                sent_at=body.get("sentAt"),
                context=body.get("context"),
                integrations=body.get("integrations"),
                keep_timestamp=isinstance(item, dict) and item.get("receivedAt") is not None,
                # A deletion request, which only the webhook route takes, is translated too:
                # a dry run cannot know which route the call would come by.
                more_types=WEBHOOK_ONLY_TYPES,
            )
            event, _, _ = normalise_segment(item, call_type=None, envelope=envelope)
    except Invalid as exc:
        raise Refused(exc.code, exc.message) from None
    return event


def _request_body(source_format: str, item: Any) -> bool:
    """Whether ``item`` is a whole request body as captured (a Streams envelope, a Segment
    /v1/batch body) rather than one event: an event names itself (event_uuid, type)."""
    if type(item) is not dict:
        return False
    if source_format == "moengage_streams":
        return ("events" in item or "event" in item) and "event_uuid" not in item
    return "batch" in item and "type" not in item


def as_ingested_each(source_format: str, items: list[Any]) -> list[dict[str, Any] | Refused]:
    """Each of ``items`` as stored, or the Refused ingest would have answered for it. An
    item that is a captured request body stands for its events, each taken as its route
    takes them; a body its route refuses whole is one Refused."""
    received_at = datetime.now(UTC)
    out: list[dict[str, Any] | Refused] = []
    for item in items:
        batch: dict[str, Any] | None = None
        events = [item]
        if _request_body(source_format, item):
            try:
                events = _events_of(source_format, item)
            except Invalid as exc:
                out.append(Refused(exc.code, exc.message))
                continue
            batch = item
        for event in events:
            try:
                out.append(as_ingested(source_format, event, received_at, batch))
            except Refused as exc:
                out.append(exc)
    return out


def _events_of(source_format: str, body: dict[str, Any]) -> list[Any]:
    if source_format == "moengage_streams":
        return streams_events_of(body)
    calls = batch_of(body)
    if not calls:
        raise Invalid("empty_batch", "the batch has no events")  # as the route answers it
    return calls


def refused_json(refused: Refused) -> dict[str, Any]:
    """A dry run's result for an event ingest refuses, beside {"outputs"}, {"discarded"}, {"failed"}."""
    return {"rejected": refused.code, "detail": refused.message}
