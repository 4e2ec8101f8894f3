"""Times as whole epoch microseconds, and written from them as toISOString text.

A batch event's timestamp is ``receivedAt - (sentAt - originalTimestamp)`` (Segment's
skew correction). Through datetime that is two subtractions and a formatting; the
formatting (``spec.iso``) was about 0.9 us an event, the largest part of normalising one.
With receivedAt and the batch's sentAt as integers, worked out once per request, the
event's time is one subtraction away, and its text is a cached minute plus two table
lookups: 0.5 us less an event, the same characters (tests/sources/test_millis.py). Since
session 27 the cache holds each second's text, and the hot path reads it inline.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
_SECONDS_TEXT = tuple(f"{s:02d}." for s in range(60))  # "SS."
MILLIS_Z = tuple(f"{m:03d}Z" for m in range(1000))  # "mmmZ"
# Seconds (and minutes) remembered; cleared when full. Events are stamped near their
# receipt, so at any rate that matters each second's text serves many events.
_CACHE_SIZE = 4096


def micros(dt: datetime) -> int:
    """``dt`` (aware) as whole microseconds since the epoch."""
    return (dt - EPOCH) // MICROSECOND


class MillisText:
    """Epoch microseconds as toISOString text ("2026-11-23T21:14:07.512Z").

    The text is a second's head ("2026-11-23T21:14:07.", from ``seconds``, else
    ``head``) and the milliseconds' ``MILLIS_Z``: the per-event path of a batch's skew
    correction (spec._compute_timestamps) writes those two look-ups out rather than
    calling ``format``, and a second's head rather than a minute's saves a look-up
    and a concatenation there (docs/benchmarks.md, session 27)."""

    __slots__ = ("_minutes", "seconds")

    def __init__(self) -> None:
        self._minutes: dict[int, str] = {}  # minute number -> "YYYY-MM-DDTHH:MM:"
        self.seconds: dict[int, str] = {}  # second number -> "YYYY-MM-DDTHH:MM:SS."

    def format(self, us: int) -> str:
        """``us`` as text, milliseconds truncated as ``spec.iso`` does. OverflowError for
        a time outside datetime's years 1-9999, as the datetime arithmetic raised."""
        head = self.seconds.get(us // 1_000_000)
        if head is None:
            head = self.head(us // 1_000_000)
        return head + MILLIS_Z[us // 1000 % 1000]

    def head(self, second: int) -> str:
        """The text of epoch second ``second`` up to its ".", remembered in ``seconds``.
        OverflowError outside datetime's years (their bounds are whole seconds)."""
        minute, rest = divmod(second, 60)
        minute_head = self._minutes.get(minute)
        if minute_head is None:
            at = EPOCH + timedelta(minutes=minute)  # OverflowError out of range
            minute_head = f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:"
            if len(self._minutes) >= _CACHE_SIZE:
                self._minutes.clear()
            self._minutes[minute] = minute_head
        head = minute_head + _SECONDS_TEXT[rest]
        if len(self.seconds) >= _CACHE_SIZE:
            self.seconds.clear()  # cleared, never replaced: spec holds this dict
        self.seconds[second] = head
        return head
