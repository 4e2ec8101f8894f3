"""What compiled closures share at run time: the environment, absence, coercions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson


class _Missing:
    """Absent value: a field that evaluates to this is left out of the output."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


class Env:
    """Everything one evaluation may read; ``lets`` caches named values per event."""

    __slots__ = ("event", "item", "lets", "link", "links", "options", "source")

    def __init__(
        self,
        event: Any,
        link: str | None,
        options: Mapping[str, Any],
        source: str,
        item: Any = MISSING,
        links: Mapping[str, str] | None = None,
    ) -> None:
        self.event = event
        self.link = MISSING if link is None else link
        self.links: Mapping[str, str] = links if links is not None else {}
        self.options = options if type(options) is dict else dict(options)
        self.source = source
        self.item = item
        self.lets: dict[str, Any] = {}


_new = object.__new__


def event_env(
    event: Any, link: str | None, options: Mapping[str, Any], source: str, links: Mapping[str, str] | None
) -> Env:
    """``Env(event, link, options, source, links=links)``, built by a plain function: apply
    and identity_ids build one an event, and calling the class costs a C-level call into
    ``__init__`` (a frame of its own) besides the same assignments."""
    env: Env = _new(Env)
    env.event = event
    env.link = MISSING if link is None else link
    env.links = links if links is not None else {}
    env.options = options if type(options) is dict else dict(options)
    env.source = source
    env.item = MISSING
    env.lets = {}
    return env


class DropEvent(Exception):
    """Raised by a value policy to discard the whole event."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class FailEvent(Exception):
    """Raised by a value policy to dead-letter the whole event."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class CoercionError(ValueError):
    pass


def is_empty(v: Any) -> bool:
    if v is MISSING or v is None:
        return True
    t = type(v)
    if t is str or t is list or t is dict:
        return not v
    return False


def clone(v: Any) -> Any:
    """Copy literal containers so no event's output aliases another's."""
    t = type(v)
    if t is dict:
        return {k: clone(x) for k, x in v.items()}
    if t is list:
        return [clone(x) for x in v]
    return v


def short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- coercions ---------------------------------------------------------------


def to_string(v: Any) -> str:
    t = type(v)
    if t is str:
        return v  # type: ignore[no-any-return]
    if t is bool:
        return "true" if v else "false"
    if t is int:
        try:
            return str(v)
        except ValueError:  # more digits than int->str allows
            raise CoercionError(f"the integer is too large ({v.bit_length()} bits)") from None
    if t is float:
        return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)
    if t is dict or t is list:
        try:
            return orjson.dumps(v).decode()
        except TypeError as exc:  # nesting deeper than 255, integers beyond 64 bits, ...
            raise CoercionError(f"cannot encode the {type(v).__name__} as JSON: {exc}") from None
    raise CoercionError(f"cannot convert {type(v).__name__} to string")


# orjson writes integers of 64 bits, and MoEngage and Segment read no larger ones.
_INT64 = 2**63


def to_number(v: Any) -> int | float:
    t = type(v)
    if t is int or t is float:
        if t is float and not math.isfinite(v):
            raise CoercionError(f"{short(v)} is not a finite number")
        if t is int and not -_INT64 <= v < _INT64:
            # Past 64 bits no JSON writer here takes it as an integer: a number it is.
            try:
                return float(v)
            except OverflowError:
                raise CoercionError(f"{short(v)} is not a finite number") from None
        return v  # type: ignore[no-any-return]
    if t is str:
        s = v.strip()
        if not s.isascii() or "_" in s:
            # Python reads other scripts' digits and 1_000; JSON and every sender mean neither.
            raise CoercionError(f"{short(v)} is not a number")
        try:
            n = int(s)
        except ValueError:
            pass
        else:
            if -_INT64 <= n < _INT64:
                return n
            # Past 64 bits no JSON writer here takes it as an integer: a number it is.
        try:
            f = float(s)
        except ValueError:
            raise CoercionError(f"{short(v)} is not a number") from None
        if not math.isfinite(f):
            raise CoercionError(f"{short(v)} is not a finite number")
        return f
    raise CoercionError(f"cannot convert {type(v).__name__} {short(v)} to a number")


def to_integer(v: Any) -> int:
    n = to_number(v)
    if type(n) is float:
        if not n.is_integer():
            raise CoercionError(f"{short(v)} is not a whole number")
        n = int(n)
    if not -_INT64 <= n < _INT64:
        # An error like any other (on_error decides), not an output no request can carry.
        raise CoercionError(f"{short(v)} is beyond the 64-bit integer range")
    return int(n)


_TRUE = frozenset({"true", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "off"})


def to_boolean(v: Any) -> bool:
    t = type(v)
    if t is bool:
        return v  # type: ignore[no-any-return]
    if t is int or t is float:
        if v in (0, 1):
            return bool(v)
        raise CoercionError(f"{short(v)} is not a boolean (only 0 and 1 are)")
    if t is str:
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise CoercionError(f"{short(v)} is not a boolean")
    raise CoercionError(f"cannot convert {type(v).__name__} to a boolean")


# Numbers this large cannot be epoch seconds of a plausible date; they are milliseconds.
MILLIS_THRESHOLD = 1e11


def to_datetime(v: Any) -> datetime:
    t = type(v)
    if t is str:
        s = v.strip()
        if not s.isascii():
            # fromisoformat and int() read other scripts' digits too; no sender means them.
            raise CoercionError(f"{short(v)} is not a time")
        if s and (s.isdigit() or (s[0] == "-" and s[1:].isdigit())):
            try:
                n = int(s)
            except ValueError:  # a digit int() does not read ("²"), or too many digits
                raise CoercionError(f"{short(v)} is not a time") from None
            return to_datetime(n)
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise CoercionError(f"{short(v)} is not an ISO-8601 time") from None
        if dt.tzinfo is None:
            return dt.replace(tzinfo=UTC)
        try:
            # In UTC here, where a time at the edge of the calendar ("0001-01-01T00:00+01:00")
            # fails as a conversion error, which `on_error` governs, not in a caller.
            return dt.astimezone(UTC)
        except OverflowError:
            raise CoercionError(f"{short(v)} is out of range for a time") from None
    if t is int or t is float:
        try:
            secs = v / 1000 if abs(v) >= MILLIS_THRESHOLD else v
            return datetime.fromtimestamp(secs, UTC)
        except (OverflowError, OSError, ValueError):
            raise CoercionError(f"{short(v)} is out of range for a time") from None
    raise CoercionError(f"cannot convert {type(v).__name__} to a time")


_TWO_DIGITS: Final = tuple(f"{n:02d}" for n in range(100))
_THREE_DIGITS: Final = tuple(f"{n:03d}" for n in range(1000))


def to_iso8601(v: Any) -> str:
    dt = to_datetime(v)  # in UTC
    if dt.year >= 1000:
        # The same characters as strftime's, from tables of zero-padded numbers: strftime
        # built a time tuple and imported `time` for each value (a fifth of an identify's
        # mapping), and a % format or format specs parse their format every time.
        two = _TWO_DIGITS
        return (
            f"{dt.year}-{two[dt.month]}-{two[dt.day]}T{two[dt.hour]}:{two[dt.minute]}:{two[dt.second]}"
            f".{_THREE_DIGITS[dt.microsecond // 1000]}Z"
        )
    # strftime writes a year before 1000 without zeros in front ("999-...") on this
    # platform, and a mapped date is kept as it always was written.
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def to_epoch_seconds(v: Any) -> int:
    seconds = math.floor(to_datetime(v).timestamp())
    if seconds >= MILLIS_THRESHOLD:
        # From the year 5138 on, the number is one every reader of epoch times takes for
        # milliseconds (to_datetime, not_after, tz_offset, MoEngage): written, it names a
        # time in the 1970s, and `not_after: now` would not cap it. A conversion error.
        raise CoercionError(f"{short(v)} is after the year 5138, too late for epoch seconds")
    return seconds


def to_epoch_millis(v: Any) -> int:
    dt = to_datetime(v)
    millis = math.floor(dt.timestamp()) * 1000 + dt.microsecond // 1000
    if millis < MILLIS_THRESHOLD:
        # Before 1973-03-03T09:46:40Z the number is below 1e11, which readers that take a
        # number for seconds or milliseconds by its size (to_datetime, not_after, tz_offset)
        # read as seconds: a time thousands of years on. MoEngage documents its numeric
        # times as epoch seconds while its own samples send 13-digit milliseconds
        # (shared/reference/moengage-api.md, `current_time`), so a receiver has to tell the
        # units apart by size. A conversion error, as epoch_seconds past the year 5138 is.
        # (Negative ones too: not every reader sizes a number by its absolute value.)
        raise CoercionError(f"{short(v)} is before 1973-03-03T09:46:40Z, too early for epoch milliseconds")
    return millis


COERCIONS: Final = {
    "string": to_string,
    "number": to_number,
    "integer": to_integer,
    "boolean": to_boolean,
    "iso8601": to_iso8601,
    "epoch_seconds": to_epoch_seconds,
    "epoch_millis": to_epoch_millis,
}
