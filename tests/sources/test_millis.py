"""Epoch microseconds written as toISOString text: the integer path of a batch's skew correction."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from bridge.sources.segment import millis
from bridge.sources.segment.millis import MillisText, micros
from bridge.sources.segment.spec import Envelope, Invalid, iso, normalise


def test_any_time_is_written_as_iso_writes_it() -> None:
    rng = random.Random(3)
    text = MillisText()
    for _ in range(3000):
        at = datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(0, 315537897599999999))
        assert text.format(micros(at)) == iso(at)  # milliseconds truncated, as iso does
        assert micros(datetime.fromisoformat(iso(at))) == micros(at) // 1000 * 1000


def test_times_outside_datetime_s_years_overflow_as_datetime_does() -> None:
    text = MillisText()
    first = micros(datetime(1, 1, 1, tzinfo=UTC))
    last = micros(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    assert text.format(first) == "0001-01-01T00:00:00.000Z"
    assert text.format(last) == "9999-12-31T23:59:59.999Z"
    for outside in (first - 1, last + 1):
        with pytest.raises(OverflowError):
            text.format(outside)


def test_the_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(millis, "_CACHE_SIZE", 8)
    text = MillisText()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for minute in range(100):
        at = start + timedelta(minutes=minute, seconds=7)
        assert text.format(micros(at)) == iso(at)
    assert len(text._minutes) <= 8 and len(text.seconds) <= 8


@pytest.mark.parametrize(
    ("received", "sent", "original"),
    [
        # The device clock 1 s behind, sentAt in toISOString form.
        (datetime(2026, 11, 23, 6, 33, 36, 745000, tzinfo=UTC), "2026-11-23T06:33:32.900Z", "2026-11-23T06:33:31.593Z"),
        # Before 1970, and microseconds in sentAt (analytics-python writes isoformat()).
        (
            datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
            "1970-01-01T00:00:00.000999+00:00",
            "1969-12-31T23:59:58.001Z",
        ),
        # Across midnight of a leap day.
        (datetime(2028, 2, 29, 0, 0, 0, 1000, tzinfo=UTC), "2028-02-29T00:00:01.000Z", "2028-02-28T23:59:59.999Z"),
    ],
)
def test_the_skew_in_integers_agrees_with_datetime(received: datetime, sent: str, original: str) -> None:
    event, _, _ = normalise(
        {"userId": "u", "event": "E", "timestamp": original},
        call_type="track",
        envelope=Envelope(received, sent_at=sent),
    )
    assert event["timestamp"] == iso(received - (datetime.fromisoformat(sent) - datetime.fromisoformat(original)))


def test_a_skew_past_year_9999_is_an_invalid_timestamp() -> None:
    received = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)
    envelope = Envelope(received, sent_at="2026-01-01T00:00:00.000Z")
    with pytest.raises(Invalid) as exc:
        normalise(
            {"userId": "u", "event": "E", "timestamp": "2026-01-02T00:00:00.000Z"}, call_type="track", envelope=envelope
        )
    assert exc.value.code == "invalid_timestamp"


@pytest.mark.parametrize(
    "timestamp",
    [
        True,
        5,
        1.5,
        {"a": 1},
        [1],
        0,
        False,
        [],
        {},
        "x",
        "2026-11-23T21:14:07",
        "2026-11-23T21:14:07+02:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999Z",
        "1969-12-31T23:59:59.9995Z",
        "2026-11-23T21:14:07.512Z",
    ],
)
def test_the_inline_skew_correction_agrees_with_compute_timestamps(timestamp: object) -> None:
    """normalise_in corrects the usual batch event (own timestamp, no sentAt) inline; an
    event sent with originalTimestamp instead takes _compute_timestamps: same results."""
    envelope = Envelope(datetime(2026, 11, 23, 21, 14, 9, 37000, tzinfo=UTC), sent_at="2026-11-23T21:14:07.512Z")
    results = []
    for fields in ({"timestamp": timestamp}, {"originalTimestamp": timestamp}):
        try:
            item = {"type": "track", "event": "e", "userId": "u", "messageId": "m", **fields}
            event, _id, _key = normalise(item, call_type=None, envelope=envelope)
            results.append((event["timestamp"], event["originalTimestamp"], event["sentAt"], event["receivedAt"]))
        except Invalid as exc:
            results.append((exc.code, exc.message, None, None))
    assert results[0] == results[1]
