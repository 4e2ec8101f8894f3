"""Dry runs map what ingest would have stored, not the call as sent."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.sources.dry_run import Refused, as_ingested, as_ingested_each, refused_json

STREAMS_EVENT = {
    "event_uuid": "u-1",
    "event_name": "Email Sent",
    "event_time": 1_700_000_000_000,  # milliseconds, as Streams may send
    "uid": True,  # no usable id: ingest drops it and MoEngage's own user id stands in
    "user_attributes": {"moengage_user_id": "m-1"},
}


def test_a_streams_event_is_cleaned_as_ingest_cleans_it() -> None:
    event = as_ingested("moengage_streams", STREAMS_EVENT)
    assert "uid" not in event and event["event_time"] == 1_700_000_000


def test_a_segment_call_gets_its_timestamp_as_at_ingest() -> None:
    received = datetime(2026, 1, 1, tzinfo=UTC)
    event = as_ingested("segment", {"type": "track", "userId": "u", "event": "E"}, received)
    assert event["timestamp"].startswith("2026-01-01T00:00:00") and event["messageId"]


def test_an_event_timed_already_keeps_its_timestamp() -> None:
    """A webhook's event, or a stored payload from `bridge dlq show`: Segment (or ingest)
    computed its timestamp; a dry run later must not recompute it from its own time."""
    stored = {
        "type": "track",
        "userId": "u",
        "event": "E",
        "timestamp": "2024-01-01T10:00:00.000Z",
        "originalTimestamp": "2024-01-01T10:00:03.000Z",
        "sentAt": "2024-01-01T10:00:05.000Z",
        "receivedAt": "2024-01-01T10:00:02.000Z",
    }
    event = as_ingested("segment", dict(stored), datetime(2026, 1, 1, tzinfo=UTC))
    assert {k: event[k] for k in ("timestamp", "originalTimestamp", "receivedAt")} == {
        k: stored[k] for k in ("timestamp", "originalTimestamp", "receivedAt")
    }
    kept = as_ingested("segment", {**stored, "sentAt": "n/a"})  # as webhook ingest takes it
    assert kept["timestamp"] == stored["timestamp"]


@pytest.mark.parametrize(
    ("fmt", "item", "code"),
    [
        ("segment", {"type": "track", "event": "E"}, "id_required"),
        ("segment", ["not", "an", "event"], "invalid_event"),
        (
            "moengage_streams",
            {"event_uuid": " ", "event_name": "E", "event_time": 1, "uid": "u"},
            "event_uuid_required",
        ),
    ],
)
def test_what_ingest_refuses_is_refused_with_its_code(fmt: str, item: object, code: str) -> None:
    [result] = as_ingested_each(fmt, [item])
    assert isinstance(result, Refused) and result.code == code
    assert refused_json(result) == {"rejected": code, "detail": result.message}
