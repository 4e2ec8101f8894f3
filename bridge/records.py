"""JSON views of dead letters and discards, shared by the CLI and the admin API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.store.base import DeadLetterRecord, DiscardRecord

# Most records one list answers (admin API and CLI).
MAX_LIST_LIMIT = 10000


def when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_or_text(raw: bytes) -> Any:
    """The stored JSON as a value to nest in an answer, or as text when it is not JSON, or
    when it could not be written again as deep as an answer nests it (orjson writes 254
    levels: a render_error dead letter can be that deep, and an event ingest takes may be
    252 levels, which a listing nests three levels down)."""
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
        # As deep as the deepest answer holds it: {"discards": [{"payload": ...}]}, and the
        # CLI's [{"payload": ...}] (its `dlq show --json` too); GET /admin/dlq/{id} is shallower.
        orjson.dumps([[[value]]])
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    except orjson.JSONEncodeError:
        return raw.decode("utf-8", "replace")
    return value


def dead_letter_json(r: DeadLetterRecord, *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id,
        "destination": r.destination,
        "source": r.source,
        "message_id": r.message_id,
        "event": r.label,
        "reason": r.reason,
        "status": r.status,
        "attempts": r.attempts,
        "created_at": when(r.created_at),
        "first_attempt_at": when(r.first_attempt_at),
        "failed_at": when(r.failed_at),
        "mapping_version": r.mapping_version,
        # Accepted before the failure: a replay sends the event's other outputs only.
        "outputs_delivered": r.outputs_delivered,
    }
    if full:
        out["response_body"] = r.response_body
        out["request"] = _json_or_text(r.request_body)
        out["payload"] = _json_or_text(r.payload)
    return out


def discard_json(r: DiscardRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "destination": r.destination,
        "source": r.source,
        "message_id": r.message_id,
        "event": r.label,
        "reason": r.reason,
        "detail": r.detail,
        "discarded_at": when(r.discarded_at),
        "payload": _json_or_text(r.payload),
    }
