"""The Segment stand-in answers like Segment's Tracking API: 200 and silent drops,
400 only for invalid JSON and oversize payloads."""

from __future__ import annotations

import asyncio
import gzip
import time

import orjson
import pytest
from segment.analytics import Client

from bridge.destinations.http import basic_auth
from bridge.testing.standins import Planned, SegmentStandIn

US_KEY = "us-key"
EU_KEY = "eu-key"


@pytest.fixture
async def seg(aiohttp_server, aiohttp_client):
    standin = SegmentStandIn({US_KEY: "us", EU_KEY: "eu"}, region="us")
    server = await aiohttp_server(standin.app())
    client = await aiohttp_client(server)
    return standin, client, str(server.make_url("")).rstrip("/")


def track(n=1, **extra):
    return {"type": "track", "event": "Signed Up", "userId": f"u{n}", "messageId": f"m{n}", **extra}


async def post(client, body, headers=None):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post("/v1/batch", data=data, headers=headers or {"Content-Type": "application/json"})
    return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("headers", "body_key", "auth"),
    [
        ({"Authorization": basic_auth(US_KEY, "")}, None, "basic"),
        ({}, US_KEY, "body"),
        ({"Authorization": basic_auth(US_KEY, "")}, US_KEY, "both"),
        ({"Authorization": "Bearer some-oauth-token"}, US_KEY, "body"),
    ],
)
async def test_write_key_from_basic_auth_or_body(seg, headers, body_key, auth):
    standin, client, _ = seg
    body = {"batch": [track()], "sentAt": "2026-11-23T10:00:00.000Z"}
    if body_key:
        body["writeKey"] = body_key
    assert await post(client, body, headers) == (200, {"success": True})
    [accepted] = standin.accepted
    assert (accepted.auth, accepted.write_key, accepted.sent_at) == (auth, US_KEY, "2026-11-23T10:00:00.000Z")
    assert standin.events() == [track()]


@pytest.mark.parametrize("raw", [b"{nope", b"", b'"text"'])
async def test_invalid_json_is_400(seg, raw):
    standin, client, _ = seg
    assert await post(client, raw) == (400, {"code": "invalid_request", "message": "Invalid JSON"})
    assert standin.requests == []


async def test_oversize_request_or_event_is_400(seg):
    standin, client, _ = seg
    many = [track(n, properties={"pad": "x" * 20_000}) for n in range(26)]  # ~520 KB
    status, body = await post(client, {"batch": many, "writeKey": US_KEY})
    assert (status, body) == (400, {"code": "invalid_request", "message": "Exceed payload limit"})
    one_big = [track(1), track(2, properties={"pad": "x" * (32 * 1024)})]
    status, body = await post(client, {"batch": one_big, "writeKey": US_KEY})
    assert (status, body["message"]) == (400, "Exceed payload limit")
    assert standin.events() == []


async def test_missing_write_key_is_400(seg):
    _standin, client, _ = seg
    status, body = await post(client, {"batch": [track()]})
    assert (status, body) == (400, {"code": "invalid_request", "message": "Missing write key"})


async def test_unknown_and_wrong_region_keys_get_200_but_are_dropped(seg):
    standin, client, _ = seg
    assert await post(client, {"batch": [track(1)], "writeKey": "who-knows"}) == (200, {"success": True})
    assert await post(client, {"batch": [track(2)], "writeKey": EU_KEY}) == (200, {"success": True})
    assert standin.events() == []
    assert [(d.reason, d.write_key) for d in standin.dropped] == [
        ("unknown_write_key", "who-knows"),
        ("wrong_region", EU_KEY),
    ]


async def test_invalid_events_are_dropped_with_segment_discard_codes(seg):
    standin, client, _ = seg
    batch = [
        track(1),
        {"type": "track", "event": "x", "messageId": "no-ids"},
        {"type": "track", "userId": "u3"},
        {"type": "track", "userId": "u4", "event": 7},
        {"type": "identify", "userId": "u5", "traits": []},
        {"type": "alias", "userId": "u6"},
        {"type": "group", "userId": "u7"},
        {"type": "bogus", "userId": "u8"},
        {"type": "identify", "userId": 9},
        {"type": "identify", "anonymousId": "a10", "userId": None},
    ]
    assert await post(client, {"batch": batch, "writeKey": US_KEY}) == (200, {"success": True})
    assert standin.events() == [batch[0], batch[-1]]
    assert [d.reason for d in standin.dropped] == [
        "no_user_anon_id",
        "event_not_defined",
        "event_not_string",
        "traits_not_object",
        "id_required",
        "id_required",
        "type_invalid",
        "id_not_string",
    ]


async def test_empty_and_too_many_events_are_dropped(seg):
    standin, client, _ = seg
    assert (await post(client, {"batch": [], "writeKey": US_KEY}))[0] == 200
    tiny = [{"type": "track", "event": "e", "userId": "u"}] * 2501
    assert (await post(client, {"batch": tiny, "writeKey": US_KEY}))[0] == 200
    assert [d.reason for d in standin.dropped] == ["empty_batch", "too_many_events"]
    assert standin.events() == []


async def test_gzip_bodies_are_accepted(seg):
    standin, client, _ = seg
    raw = gzip.compress(orjson.dumps({"batch": [track()], "writeKey": US_KEY}))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert await post(client, raw, headers) == (200, {"success": True})
    assert standin.events() == [track()]


async def test_failure_injection_uses_segment_error_shape(seg):
    standin, client, _ = seg
    standin.refuse_all(500)
    assert await post(client, {"batch": [track()], "writeKey": US_KEY}) == (
        500,
        {"code": "server_error", "message": "Internal Server Error"},
    )
    standin.refuse_all(None)
    standin.plan(Planned(400, body={"code": "invalid_request", "message": "nope"}))
    assert (await post(client, {"batch": [track()], "writeKey": US_KEY}))[0] == 400
    assert (await post(client, {"batch": [track()], "writeKey": US_KEY}))[0] == 200
    assert standin.received == 3
    assert len(standin.events()) == 1


async def test_a_429_asks_the_client_to_wait_as_segment_does(seg):
    """Segment's 429 carries Retry-After and X-RateLimit-Reset (seconds): the bridge waits
    what they ask, so a stand-in without them tested only its own backoff."""
    standin, client, _ = seg
    standin.retry_after = 7
    for inject in (lambda: standin.refuse_all(429), lambda: standin.plan(Planned(429))):
        inject()
        resp = await client.post("/v1/batch", data=orjson.dumps({"batch": [track()], "writeKey": US_KEY}))
        assert resp.status == 429 and resp.headers["Retry-After"] == "7"
        assert 0 <= int(resp.headers["X-RateLimit-Reset"]) - int(time.time()) <= 7
        assert await resp.json() == {"code": "rate_limited", "message": "Too Many Requests"}
        standin.refuse_all(None)
    resp = await client.post("/v1/batch", data=orjson.dumps({"batch": [track()], "writeKey": US_KEY}))
    assert resp.status == 200 and "Retry-After" not in resp.headers


async def test_real_segment_python_client_is_accepted(seg):
    standin, _client, base = seg
    client = Client(US_KEY, host=base, sync_mode=True, max_retries=0)
    await asyncio.to_thread(client.identify, "user-1", {"email": "a@example.com"})
    await asyncio.to_thread(client.track, "user-1", "Order Completed", {"total": 12.5})
    await asyncio.to_thread(client.alias, "anon-1", "user-1")
    assert [e["type"] for e in standin.events()] == ["identify", "track", "alias"]
    assert {(e.auth, e.write_key) for e in standin.accepted} == {("both", US_KEY)}
    assert standin.events()[1]["properties"] == {"total": 12.5}
    assert standin.dropped == []


async def test_a_page_or_screen_name_or_category_that_is_no_string_is_dropped(seg):
    """Segment's discard codes name_not_string and category_not_string: a page or screen
    whose name or category is present but not a non-empty string is answered 200 and
    dropped. Kept, the sandbox showed a mapping's page as delivered that Segment drops."""
    standin, client, _ = seg
    batch = [
        {"type": "page", "userId": "u1", "name": "Home", "category": "Docs"},
        {"type": "page", "userId": "u2"},
        {"type": "page", "userId": "u3", "name": 7},
        {"type": "screen", "userId": "u4", "name": ""},
        {"type": "page", "userId": "u5", "name": "Home", "category": ["Docs"]},
        {"type": "screen", "userId": "u6", "category": ""},
        {"type": "page", "userId": "u7", "name": None, "category": None},
    ]
    assert await post(client, {"batch": batch, "writeKey": US_KEY}) == (200, {"success": True})
    assert standin.events() == [batch[0], batch[1], batch[-1]]
    assert [d.reason for d in standin.dropped] == [
        "name_not_string",
        "name_not_string",
        "category_not_string",
        "category_not_string",
    ]


async def test_an_event_whose_message_id_was_taken_is_dropped_as_segment_deduplicates(seg):
    """Segment keeps one event per messageId (across sources and workspaces), answering
    200 to the copies: a redelivery after a lost answer is not counted twice."""
    standin, client, _ = seg
    assert await post(client, {"batch": [track(1), track(2)], "writeKey": US_KEY}) == (200, {"success": True})
    again = {"batch": [track(1, event="Changed"), track(3)], "writeKey": US_KEY}
    assert await post(client, again, {"Authorization": basic_auth(US_KEY, "")}) == (200, {"success": True})
    no_ids = {"type": "track", "event": "e", "userId": "u"}  # Segment assigns each its own
    assert (await post(client, {"batch": [no_ids, no_ids], "writeKey": US_KEY}))[0] == 200
    assert standin.events() == [track(1), track(2), track(3), no_ids, no_ids]
    assert [(d.reason, d.event["messageId"]) for d in standin.dropped] == [("duplicate_message_id", "m1")]
