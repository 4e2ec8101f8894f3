"""Encoding a validated event for the store, as one per-event verdict."""

from __future__ import annotations

from typing import Any

import orjson

from bridge.sources.segment.spec import Invalid


def _write_depth() -> int:
    """How deep orjson writes JSON (254 levels in orjson 3; it reads 1024): found, not assumed."""
    value: Any = 0
    depth = 0
    while True:
        try:
            orjson.dumps([value])
        except orjson.JSONEncodeError:
            return depth
        value, depth = [value], depth + 1


WRITE_DEPTH = _write_depth()
# How many levels deeper than in the event a destination's body may hold a value its
# mapping takes from it: MoEngage's Create Event puts an event's member (its properties)
# in the attributes of an action, an object in the body's `actions` list (shapes.py,
# action_fields): two levels down, the deepest place a destination's shape has. (The
# Segment calls a Streams event becomes hold its user attributes one level down, in
# context.traits.) Not computed from the loaded mappings: they change on a reload after
# ingest, and a mapping may wrap its values as deep as its author likes; an event such a
# mapping nests past WRITE_DEPTH is dead-lettered at delivery (render_error).
DESTINATION_NESTING = 2
# The deepest event (objects and arrays, the event itself included) every destination can
# be sent: deeper, its mapped body could not be written as JSON, and it would only ever
# reach the DLQ.
MAX_EVENT_DEPTH = WRITE_DEPTH - DESTINATION_NESTING
if DESTINATION_NESTING != 2:  # pragma: no cover - encode_event writes its two arrays out
    raise ImportError("encode_event nests an event in exactly DESTINATION_NESTING arrays: update both")
_dumps = orjson.dumps


def encode_event(event: dict[str, Any]) -> bytes:
    """The event as stored JSON, or Invalid for an event nested too deep to deliver.

    orjson reads 1024 levels of nesting but writes at most WRITE_DEPTH: an event that
    could not be delivered once a destination's body nests it is bad input, to be
    rejected by index like any other (never a 500 for its whole batch, nor a dead letter
    later). Checked by orjson itself: the event is written inside DESTINATION_NESTING
    arrays, which are then cut off the bytes. The two arrays are written out (a loop
    building them took 31 interpreter steps an event, 6% of a batch event's).

    The routes' per-event loops write this function out (``dumps([[event]])[2:-2]``,
    ``too_deep()`` for orjson's error), which spares a call and a frame an event: keep
    them in step with it.
    """
    try:
        payload = _dumps([[event]])
    except orjson.JSONEncodeError:
        raise too_deep() from None
    return payload[2:-2]


def too_deep() -> Invalid:
    """What ``encode_event`` raises for an event orjson could not write nested."""
    return Invalid(
        "event_too_deep",
        f"the event is nested more than {MAX_EVENT_DEPTH} levels deep (objects and arrays, the event"
        f" included): a destination nests its values up to {DESTINATION_NESTING} levels deeper, and JSON"
        f" is written at most {WRITE_DEPTH} levels deep, so it could never be delivered",
    )
