"""Encoding a validated event for the store, as one per-event verdict."""

from __future__ import annotations

from typing import Any

import orjson

from bridge.sources.segment.spec import Invalid


def encode_event(event: dict[str, Any]) -> bytes:
    """The event as stored JSON, or Invalid for what parsed but cannot be written back.

    orjson reads 1024 levels of nesting but writes at most 254: such an event is bad
    input, to be rejected by index like any other, never a 500 for its whole batch.
    """
    try:
        return orjson.dumps(event)
    except orjson.JSONEncodeError as exc:
        raise Invalid("event_too_deep", f"the event cannot be stored: {exc}") from None
