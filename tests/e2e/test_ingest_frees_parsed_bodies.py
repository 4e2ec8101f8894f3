"""A request's parsed body is freed before the handler waits for the commit.

Under load dozens of requests wait for their group's fsync at once; held through that
wait, their parsed bodies (about fifteen dicts and lists an event) kept tens of thousands
of objects alive for the garbage collector to walk, and cost about 4 us of CPU a batch
event (docs/benchmarks.md, session 18). Each test holds the store's enqueue at a gate and
looks, while it waits, for any dict still carrying the request's ids.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from bridge.store.base import EnqueueResult, IncomingEvent
from bridge.store.sqlite import SqliteStore
from tests.e2e.harness import STREAMS_PASSWORD, STREAMS_USER, WEBHOOK_SECRET, WRITE_KEY, basic


class GatedStore(SqliteStore):
    """Holds every enqueue until ``gate`` opens; ``entered`` says one is waiting."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        self.entered.set()
        await self.gate.wait()
        return await super().enqueue(source, events)


def dicts_holding(ids: set[str]) -> list[dict[str, Any]]:
    """Every live dict whose messageId (Segment) or event_uuid (Streams) is one of ``ids``."""
    gc.collect()
    return [
        o for o in gc.get_objects() if type(o) is dict and (o.get("messageId") in ids or o.get("event_uuid") in ids)
    ]


def _segment_event(message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "user-1",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": {"total": 5, "items": [{"sku": "a"}]},
        "context": {"library": {"name": "analytics.js"}},
    }


def _streams_event(uuid: str) -> dict[str, Any]:
    return {
        "event_name": "Email Opened",
        "event_code": "MOE_EMAIL_OPEN",
        "event_uuid": uuid,
        "event_time": 1795468447,
        "uid": "user-1",
        "event_attributes": {"campaign_id": "c1", "tags": ["a"]},
    }


def _sign(body: bytes) -> str:
    return hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha1).hexdigest()


# Ids no other test uses: a dict another module keeps alive (a test's expected body) with
# one of them would be taken for a parsed body this test's request failed to free.
_RUN = uuid.uuid4().hex[:12]


def _requests() -> list[tuple[str, str, bytes, dict[str, str], set[str]]]:
    batch_ids = {f"batch-{i}-{_RUN}" for i in range(3)}
    batch = orjson.dumps({"batch": [_segment_event(m) for m in sorted(batch_ids)]})
    single = orjson.dumps(_segment_event(f"single-1-{_RUN}"))
    hook = orjson.dumps([_segment_event(f"hook-1-{_RUN}"), _segment_event(f"hook-2-{_RUN}")])
    streams_ids = {f"uuid-1-{_RUN}", f"uuid-2-{_RUN}"}
    streams = orjson.dumps({"events": [_streams_event(u) for u in sorted(streams_ids)]})
    json = {"Content-Type": "application/json"}
    return [
        ("batch", "/v1/batch", batch, {**basic(WRITE_KEY), **json}, batch_ids),
        ("single", "/v1/track", single, {**basic(WRITE_KEY), **json}, {f"single-1-{_RUN}"}),
        (
            "webhook",
            "/segment/webhook",
            hook,
            {**basic(WRITE_KEY), **json, "X-Signature": _sign(orjson.dumps(_segment_event(f"hook-1-{_RUN}")))},
            {f"hook-1-{_RUN}", f"hook-2-{_RUN}"},
        ),
        (
            "streams",
            "/moengage/streams/streams-main",
            streams,
            {**basic(STREAMS_USER, STREAMS_PASSWORD), **json},
            streams_ids,
        ),
    ]


@pytest.mark.parametrize("kind, path, body, headers, ids", _requests(), ids=lambda v: v if isinstance(v, str) else "")
async def test_the_parsed_body_is_gone_while_the_request_waits_for_its_commit(
    make_bridge: Any, kind: str, path: str, body: bytes, headers: dict[str, str], ids: set[str]
) -> None:
    bridge = await make_bridge(start=False)
    store = GatedStore(bridge.raw["store"]["url"].removeprefix("sqlite:///"))
    bridge.store_factory = lambda: store
    await bridge.start()

    answer = asyncio.create_task(bridge.post(path, None, headers, raw=body))
    await asyncio.wait_for(store.entered.wait(), 5)
    held = dicts_holding(ids)
    store.gate.set()
    status, data = await answer

    assert status == 200, data
    assert held == [], f"{kind}: {len(held)} parsed events still alive during the commit wait"
    assert data.get("duplicates", 0) == 0
    # And the events were stored, each once: the same ids again are all duplicates.
    again_status, again = await bridge.post(path, None, headers, raw=body)
    assert again_status == 200, again
    assert again.get("duplicates") == len(ids), again
