"""Dry-run translation: what a mapping would send for some events (CLI and admin API)."""

from __future__ import annotations

from typing import Any

import orjson

from bridge.mapping.api import CompiledMapping, Discarded, Failed, MapContext, MapResult


def result_to_json(result: MapResult) -> dict[str, Any]:
    if isinstance(result, Discarded):
        return {"discarded": result.reason, "detail": result.detail}
    if isinstance(result, Failed):
        return {"failed": result.reason, "detail": result.detail}
    return {"outputs": [{"kind": o.kind, "body": o.body} for o in result]}


def translate_events(mapping: CompiledMapping, events: list[dict[str, Any]], ctx: MapContext) -> list[dict[str, Any]]:
    """Map each event; every result is JSON-able: {"outputs": [...]}, {"discarded": ...} or {"failed": ...}.

    A link an event teaches is reported as "identity_link" but not applied to later
    events of the same call: links come from the caller's store via ``ctx.linked_id``.
    """
    out = []
    for event in events:
        result = mapping.apply(event, ctx)
        item = result_to_json(result)
        link = mapping.identity_link(event) if isinstance(event, dict) else None
        if link is not None:
            item["identity_link"] = list(link)
        out.append(item)
    return out


class InputError(ValueError):
    pass


def parse_events(text: str | bytes) -> list[Any]:
    """One JSON value, a JSON array of events, or JSON lines."""
    data = text.encode() if isinstance(text, str) else text
    if not data.strip():
        raise InputError("no input: expected a JSON event, a JSON array of events, or JSON lines")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
        events = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise InputError(f"line {n}: invalid JSON: {exc}") from None
        return events
    return value if isinstance(value, list) else [value]
