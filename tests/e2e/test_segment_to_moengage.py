"""Segment -> MoEngage end to end: the real Segment client, the bridge, a stand-in MoEngage."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from segment.analytics import Client
from segment.analytics.request import APIError
from structlog.testing import capture_logs
from yarl import URL

from tests.e2e.harness import (
    ADMIN_TOKEN,
    API_KEY,
    EU_WRITE_KEY,
    WEBHOOK_SECRET,
    WORKSPACE,
    WRITE_KEY,
    basic,
    depth,
    nested,
    raw_exchange,
    raw_post,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def segment_client(bridge: Any, **kw: Any) -> Client:
    return Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0, **kw)


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    # The Segment client is synchronous (requests); keep the event loop free for the bridge.
    return await asyncio.to_thread(fn, *args, **kwargs)


def track_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "userId": "user-1",
        "event": "Order Completed",
        "properties": {"total": 5},
        "messageId": str(uuid.uuid4()),
    }
    body.update(over)
    return body


async def discards(bridge: Any) -> list[dict[str, Any]]:
    status, data = await bridge.get("/admin/discards", ADMIN)
    assert status == 200, data
    return list(data["discards"])


async def test_real_segment_client_calls_arrive_in_moengage(bridge):
    client = segment_client(bridge)
    await call(
        client.identify,
        "user-1",
        {
            "email": "ann@example.com",
            "firstName": "Ann",
            "last_name": "Lee",
            "phone": "+15550100",
            "plan": "pro",
            "address": {"city": "Oslo"},
        },
    )
    await call(
        client.track,
        "user-1",
        "Order Completed",
        {"total": 42.5, "currency": "EUR"},
        context={"device": {"type": "ios", "id": "dev-9"}, "app": {"version": "3.1.0"}, "timezone": "Asia/Kolkata"},
    )
    await call(
        client.page,
        "user-1",
        "Docs",
        "Quick start",
        {"url": "https://ex.com/docs", "path": "/docs", "title": "Docs", "referrer": "https://google.com"},
    )
    await call(client.screen, "user-1", "Checkout", "Cart")
    await call(client.group, "user-1", "grp-7", {"name": "Acme", "employees": 50})
    await call(client.alias, "old-anon-id", "user-1")

    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.customers()) >= 2 and len(moe.events()) >= 3 and len(moe.merges()) >= 1)

    identify, group = moe.customers()
    assert identify["customer_id"] == "user-1"
    assert identify["attributes"] == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "last_name": "Lee",
        "mobile": "+15550100",
        "plan": "pro",
        "address": {"city": "Oslo"},
    }
    assert group["customer_id"] == "user-1"
    assert group["attributes"]["group_id"] == "grp-7"
    # The group's traits are the company's: named group_<trait>, never over the user's own.
    assert group["attributes"]["group_name"] == "Acme" and group["attributes"]["group_employees"] == 50
    assert "name" not in group["attributes"] and "employees" not in group["attributes"]

    track, page, screen = moe.events()
    action = track["actions"][0]
    assert track["customer_id"] == "user-1" and track["device_id"] == "dev-9"
    assert action["action"] == "Order Completed"
    assert action["attributes"] == {"total": 42.5, "currency": "EUR"}
    assert action["platform"] == "iOS" and action["app_version"] == "3.1.0"
    assert action["user_timezone_offset"] == 19800
    assert action["current_time"]

    page_action = page["actions"][0]
    assert page_action["action"] == "Viewed Web Page"
    for key, value in {
        "url": "https://ex.com/docs",
        "path": "/docs",
        "title": "Docs",
        "referrer": "https://google.com",
    }.items():
        assert page_action["attributes"][key] == value
    assert screen["actions"][0]["action"] == "Viewed Screen"
    assert "Cart" in orjson.dumps(screen["actions"][0]["attributes"]).decode()

    assert moe.merges() == [{"merged_user": "old-anon-id", "retained_user": "user-1"}]

    # Every request carried MoEngage's auth: Basic workspace:key and MOE-APPKEY.
    assert moe.requests
    for rec in moe.requests:
        assert rec.headers["Authorization"] == basic(WORKSPACE, API_KEY)["Authorization"]
    assert any(rec.headers.get("MOE-APPKEY") == WORKSPACE for rec in moe.requests)


async def test_write_key_in_header_body_or_both(bridge):
    header_only = await bridge.post("/v1/track", track_body(), basic(WRITE_KEY))
    body_only = await bridge.post("/v1/track", track_body(writeKey=WRITE_KEY))
    both = await bridge.post("/v1/track", track_body(writeKey=WRITE_KEY), basic(WRITE_KEY))
    assert header_only == body_only == both == (200, {"success": True})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 3)


async def test_auth_and_region_errors(bridge):
    status, data = await bridge.post("/v1/track", track_body())
    assert (status, data["code"]) == (401, "write_key_required")
    status, data = await bridge.post("/v1/track", track_body(writeKey="nope"))
    assert (status, data["code"]) == (401, "invalid_write_key")
    status, data = await bridge.post("/v1/track", track_body(), basic("nope"))
    assert (status, data["code"]) == (401, "invalid_write_key")
    status, data = await bridge.post("/v1/track", track_body(), basic(EU_WRITE_KEY))
    assert (status, data["code"]) == (403, "wrong_region")
    assert "events.eu1.segmentapis.com" in data["message"]


async def test_webhook_auth_and_region_errors(bridge):
    """The webhook takes its write key as the Basic auth username only. A key of the other
    region is refused as on the Tracking API, but its sender is Segment's Webhooks
    destination: it is told to use the other region's bridge, not Segment's API host."""
    body = orjson.dumps(track_body(type="track"))
    for headers, expected in [
        ({}, (401, "write_key_required")),
        ({"Authorization": "Bearer " + WRITE_KEY}, (401, "write_key_required")),
        (basic("", WRITE_KEY), (401, "write_key_required")),
        ({"Authorization": "Basic !!"}, (401, "invalid_authorization")),
        (basic("nope"), (401, "invalid_write_key")),
        (basic(EU_WRITE_KEY), (403, "wrong_region")),
    ]:
        status, data = await bridge.post("/segment/webhook", None, {**headers, "X-Signature": "00"}, raw=body)
        assert (status, data["code"]) == expected, (headers, data)
    assert "segmentapis.com" not in data["message"], data
    assert "the bridge serving EU" in data["message"], data
    # The Tracking API's answer to the same key still names Segment's EU host.
    status, data = await bridge.post("/v1/track", track_body(), basic(EU_WRITE_KEY))
    assert "events.eu1.segmentapis.com" in data["message"]


async def test_a_wrong_region_webhook_is_told_the_bridge_region_hosts_names(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["region_hosts"] = {"eu": "https://eu-bridge.example.com"}

    bridge = await make_bridge(tweak)
    body = orjson.dumps(track_body(type="track"))
    status, data = await bridge.post("/segment/webhook", None, {**basic(EU_WRITE_KEY), "X-Signature": "00"}, raw=body)
    assert (status, data["code"]) == (403, "wrong_region")
    assert "the bridge serving EU (https://eu-bridge.example.com)" in data["message"], data


async def test_real_client_sees_401_for_unknown_key(bridge):
    client = Client("not-a-key", host=bridge.url, sync_mode=True, max_retries=0)
    with pytest.raises(APIError) as exc:
        await call(client.track, "user-1", "E")
    assert exc.value.status == 401 and exc.value.code == "invalid_write_key"


async def test_gzip_bodies(bridge):
    client = segment_client(bridge, gzip=True)
    await call(client.track, "user-gz", "Gzipped")
    raw = gzip.compress(orjson.dumps(track_body(userId="user-gz2")))
    status, _ = await bridge.post(
        "/v1/track", None, {**basic(WRITE_KEY), "Content-Encoding": "gzip", "Content-Type": "application/json"}, raw=raw
    )
    assert status == 200
    await bridge.moengage.wait_for(
        lambda: {e["customer_id"] for e in bridge.moengage.events()} >= {"user-gz", "user-gz2"}
    )
    status, data = await bridge.post(
        "/v1/track", None, {**basic(WRITE_KEY), "Content-Encoding": "gzip"}, raw=b"\x1f\x8bnot really gzip"
    )
    assert status == 400, data
    # An encoding aiohttp does not know it passes through as is: refused, not parsed as JSON.
    plain = orjson.dumps(track_body(userId="user-gz3"))
    for encoding in ("compress", "gzip, br", "x-custom"):
        status, data = await bridge.post(
            "/v1/track", None, {**basic(WRITE_KEY), "Content-Encoding": encoding}, raw=plain
        )
        assert (status, data["code"]) == (415, "unsupported_encoding"), (encoding, data)
    status, _ = await bridge.post("/v1/track", None, {**basic(WRITE_KEY), "Content-Encoding": "Identity"}, raw=plain)
    assert status == 200


async def test_a_corrupt_gzip_body_is_a_400_that_closes_the_connection_quietly(bridge, caplog):
    good = gzip.compress(orjson.dumps(track_body(userId="user-corrupt", properties={"pad": "x" * 50_000})))
    corrupt = good[:20] + b"\x00" * 64 + good[84:]
    assert bridge.client is not None
    resp = await bridge.client.post("/v1/track", data=corrupt, headers={**basic(WRITE_KEY), "Content-Encoding": "gzip"})
    body = await resp.json()
    assert (resp.status, body["code"]) == (400, "invalid_encoding"), body
    # The stream's framing is lost: the connection ends with this answer, and aiohttp is
    # not left to drain the broken body and log the same error as an unhandled one.
    assert resp.headers["Connection"] == "close"
    await asyncio.sleep(0.05)
    unhandled = [r for r in caplog.records if "Unhandled exception" in r.getMessage()]
    assert not unhandled, unhandled[0].getMessage()
    # Later requests (on new connections) are served as usual.
    assert (await bridge.post("/v1/track", track_body(userId="user-after"), basic(WRITE_KEY)))[0] == 200


async def test_a_body_that_trickles_in_too_slowly_gets_a_408_and_the_connection_closes(make_bridge, caplog):
    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["body_timeout"] = 0.3

    bridge = await make_bridge(tweak)
    auth = basic(WRITE_KEY)["Authorization"]
    head = f"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 500\r\n\r\n"
    # ... and then nothing more; the answer is read until the bridge closes the connection
    answer = await raw_exchange(bridge, head.encode() + b'{"userId": "slow", ')
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"
    assert b"Connection: close" in rest
    assert not [r for r in caplog.records if "Unhandled exception" in r.getMessage()]
    # Others are served as usual, and nothing of the slow request was stored.
    assert (await bridge.post("/v1/track", track_body(userId="user-fast"), basic(WRITE_KEY)))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert [e["customer_id"] for e in bridge.moengage.events()] == ["user-fast"]


async def test_two_content_encodings_are_refused_not_decoded_by_the_last(bridge):
    # aiohttp decodes by the last Content-Encoding header: "gzip" then "x-custom" would
    # pass a check of the first and then be parsed as plain JSON.
    plain = orjson.dumps(track_body(userId="user-two-enc"))
    auth = basic(WRITE_KEY)["Authorization"].encode()
    head = b"POST /v1/track HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + auth + b"\r\n"
    for codings in ((b"gzip", b"x-custom"), (b"gzip", b"identity")):
        extra = b"".join(b"Content-Encoding: " + c + b"\r\n" for c in codings)
        answer = await raw_exchange(bridge, head + extra + b"Content-Length: %d\r\n\r\n" % len(plain) + plain)
        assert answer.startswith(b"HTTP/1.1 415"), answer[:200]
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "unsupported_encoding"
    await asyncio.sleep(0.1)
    assert bridge.moengage.events() == []


async def test_a_gzip_bomb_past_the_ceiling_ends_its_connection_with_the_413(bridge):
    # Past the app's client_max_size aiohttp stops reading; left alone it would go on
    # inflating the rest while it drains the request, then keep the connection.
    bomb = gzip.compress(b"\0" * 64 * 1024 * 1024)
    auth = basic(WRITE_KEY)["Authorization"].encode()
    answer = await raw_exchange(
        bridge,
        b"POST /segment/webhook HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\nX-Signature: 00\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb,
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head, head
    assert orjson.loads(body)["code"] == "payload_too_large"


async def test_a_chunked_body_past_the_route_limit_is_refused_before_the_rest_arrives(bridge):
    """A chunked (or compressed) body has no length to check up front. Past the route's
    limit (512 KB for /v1/*) the refusal comes at once: the bridge does not go on reading, and
    holding, up to the app's 16 MiB ceiling, nor wait for a body it will refuse anyway."""
    auth = basic(WRITE_KEY)["Authorization"].encode()
    url = URL(bridge.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
            + auth
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 65536
        for _ in range(10):  # 640 KB, past the limit; the body's end is never sent
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=3)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 400"), head


async def test_one_half_emoji_does_not_cost_the_batch_its_other_events(bridge):
    """A lone \\uD83D escape (an emoji cut in half, a client's bad decoding) is JSON by the
    grammar, but orjson refuses it: the whole batch got 400, which SDKs drop, good events
    and all. The half becomes U+FFFD; every event is stored and delivered."""
    body = (
        b'{"batch": ['
        b'{"type": "track", "userId": "user-s1", "event": "Half \\ud83d emoji", "messageId": "sur-1"},'
        b'{"type": "track", "userId": "user-s2", "event": "Whole \\ud83d\\ude00", "messageId": "sur-2"}'
        b"]}"
    )
    status, data = await bridge.post(
        "/v1/batch", None, {**basic(WRITE_KEY), "Content-Type": "application/json"}, raw=body
    )
    assert (status, data) == (200, {"success": True})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)
    names = sorted(e["actions"][0]["action"] for e in bridge.moengage.events())
    assert names == ["Half \ufffd emoji", "Whole \U0001f600"]
    # Still JSON only: a NaN (which the fallback reader would take) or a truncated body is a 400.
    for bad in (body[:-1], body.replace(b'"sur-2"', b"NaN")):
        status, data = await bridge.post("/v1/batch", None, basic(WRITE_KEY), raw=bad)
        assert (status, data["code"]) == (400, "invalid_json"), data


async def test_bad_input_gets_precise_4xx(bridge):
    h = basic(WRITE_KEY)
    status, data = await bridge.post("/v1/track", None, h, raw=b'{"userId": "u", ')
    assert (status, data["code"]) == (400, "invalid_json")
    status, data = await bridge.post("/v1/track", {"userId": "u", "event": 3}, h)
    assert (status, data["code"]) == (400, "event_not_string")
    status, data = await bridge.post("/v1/identify", {"traits": {"a": 1}}, h)
    assert (status, data["code"]) == (400, "id_required")
    status, data = await bridge.post("/v1/group", {"userId": "u"}, h)
    assert (status, data["code"]) == (400, "id_required")
    status, data = await bridge.post("/v1/identify", {"userId": "u", "traits": [1]}, h)
    assert (status, data["code"]) == (400, "traits_not_object")
    status, data = await bridge.post("/v1/batch", {"batch": []}, h)
    assert (status, data["code"]) == (400, "empty_batch")
    one = [{"type": "track", "userId": "u", "event": "E"}]
    status, data = await bridge.post("/v1/batch", {"batch": one, "context": "web"}, h)
    assert (status, data["code"]) == (400, "context_not_object"), data
    status, data = await bridge.post("/v1/batch", {"batch": one, "integrations": [1]}, h)
    assert (status, data["code"]) == (400, "integrations_not_object"), data
    big = track_body(properties={"blob": "x" * 40_000})
    status, data = await bridge.post("/v1/track", big, h)
    assert (status, data["code"]) == (400, "event_too_large")
    status, data = await bridge.post("/v1/batch", {"batch": [track_body(properties={"b": "x" * 30_000})] * 20}, h)
    assert (status, data["code"]) == (400, "payload_too_large")
    status, data = await bridge.post("/v1/nope", {}, h)
    assert (status, data["code"]) == (404, "not_found")
    # Nothing above was stored or sent.
    await asyncio.sleep(0.2)
    assert bridge.moengage.events() == []


async def test_partial_batch_stores_the_valid_items(bridge):
    batch = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "Good One"},
            {"type": "track", "userId": "u1"},
            {"type": "identify", "traits": {"a": 1}},
            {"type": "identify", "userId": "u2", "traits": {"plan": "x"}},
        ],
        "writeKey": WRITE_KEY,
    }
    status, data = await bridge.post("/v1/batch", batch)
    assert status == 200
    assert data["success"] is True and data["accepted"] == 2
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [(1, "event_not_defined"), (2, "id_required")]
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1 and len(bridge.moengage.customers()) == 1)

    status, data = await bridge.post("/v1/import", {"batch": [{"type": "track", "userId": "u"}], "writeKey": WRITE_KEY})
    assert status == 400 and data["code"] == "event_not_defined" and data["rejected"][0]["index"] == 0


async def test_a_mobile_sdk_batch_to_v1_b_is_taken_as_a_batch(bridge):
    """Segment's mobile SDKs post {apiHost}/b with the writeKey in the body; with apiHost
    "<bridge>/v1" that is /v1/b. As analytics-flutter sends it: a JSON batch, no auth header."""
    body = {
        "batch": [
            {
                "type": "identify",
                "userId": "mobile-1",
                "traits": {"email": "m@example.com"},
                "messageId": "mob-1",
                "timestamp": "2026-11-23T12:00:00.000Z",
                "context": {"device": {"type": "ios"}, "library": {"name": "analytics-flutter"}},
            },
            {
                "type": "screen",
                "userId": "mobile-1",
                "name": "Home",
                "messageId": "mob-2",
                "timestamp": "2026-11-23T12:00:01.000Z",
                "context": {"device": {"type": "ios"}},
            },
        ],
        "sentAt": "2026-11-23T12:00:02.000Z",
        "writeKey": WRITE_KEY,
    }
    status, data = await bridge.post("/v1/b", body, {"Content-Type": "application/json; charset=utf-8"})
    assert (status, data) == (200, {"success": True})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.customers()) == 1 and len(bridge.moengage.events()) == 1)
    assert bridge.moengage.customers()[0]["customer_id"] == "mobile-1"
    assert bridge.moengage.events()[0]["actions"][0]["action"] == "Viewed Screen"
    # The same checks as /v1/batch: no key, no batch.
    status, data = await bridge.post("/v1/b", {"batch": body["batch"]})
    assert (status, data["code"]) == (401, "write_key_required")
    status, data = await bridge.post("/v1/b", {"writeKey": WRITE_KEY, "batch": {}})
    assert (status, data["code"]) == (400, "invalid_batch")


async def test_analytics_javas_batch_to_v1_import_with_its_trailing_slash_is_taken(bridge):
    """analytics-java posts every batch to "<endpoint>/v1/import/" (its default path ends in
    a slash), with the batch's context (library, instanceId) and a sequence at the top level.
    A 404 there is an answer it does not retry: every event was lost."""
    body = {
        "batch": [
            {
                "type": "track",
                "userId": "java-1",
                "event": "Java Order",
                "properties": {"total": 3},
                "messageId": str(uuid.uuid4()),
                "timestamp": "2026-11-23T12:00:00.000Z",
            },
            {
                "type": "identify",
                "userId": "java-1",
                "traits": {"plan": "pro"},
                "messageId": str(uuid.uuid4()),
                "timestamp": "2026-11-23T12:00:00.500Z",
            },
        ],
        "context": {"library": {"name": "analytics-java", "version": "3.5.1"}, "instanceId": "i-1"},
        "sentAt": "2026-11-23T12:00:01.000Z",
        "sequence": 1,
        "writeKey": WRITE_KEY,
    }
    status, data = await bridge.post("/v1/import/", body, basic(WRITE_KEY))
    assert (status, data) == (200, {"success": True})
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.events()) == 1 and len(moe.customers()) == 1)
    assert moe.events()[0]["actions"][0]["action"] == "Java Order"
    assert moe.customers()[0]["attributes"]["plan"] == "pro"
    # A single call with the slash is that call, checked as without it.
    single = track_body(userId="java-2", writeKey=WRITE_KEY, type="identify")
    assert (await bridge.post("/v1/track/", single))[0] == 200
    await moe.wait_for(lambda: len(moe.events()) == 2)
    assert moe.events()[1]["customer_id"] == "java-2"
    status, data = await bridge.post("/v1/batch/", {"writeKey": WRITE_KEY, "batch": {}})
    assert (status, data["code"]) == (400, "invalid_batch")
    # Counted in the metrics under the route without the slash.
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_http_requests_total{route="/v1/import",status="200"} 1.0' in metrics, metrics
    assert 'route="/v1/import/"' not in metrics


async def test_a_body_past_500_kb_gets_segments_400_so_a_mobile_sdk_drops_it_rather_than_resend_it(bridge):
    """analytics-swift closes a batch file once it holds 475,000 bytes, whatever the size
    of the event that crosses that mark (it has no per-event limit), and deletes a file
    only on a 2xx or a 400; on any other status it keeps the file and posts it again at
    every flush. Segment answers a body past its 500 KB with 400; a 413 had the app send
    the same half a megabyte for ever, the good events in it never delivered."""
    events = [
        {
            "type": "track",
            "userId": "mobile-big",
            "event": "Viewed",
            "messageId": f"swift-{i}",
            "timestamp": "2026-11-23T12:00:00.000Z",
            "properties": {"pad": "p" * 4_000},
            "context": {"library": {"name": "analytics-swift", "version": "1.5.0"}},
        }
        for i in range(112)
    ]
    events.append({**events[0], "messageId": "swift-large", "properties": {"blob": "b" * 60_000}})
    # The file as analytics-swift writes it: one event a line, the ending added at flush.
    body = (
        b'{ "batch": [\n'
        + b"\n,".join(orjson.dumps(e) for e in events)
        + b'\n],"sentAt":"2026-11-23T12:00:05.000Z","writeKey":"'
        + WRITE_KEY.encode()
        + b'"}\n'
    )
    # Under 475,000 bytes before the last event, so analytics-swift appends it to this file.
    assert len(body) > 512_000 and len(body) - len(orjson.dumps(events[-1])) < 475_000
    # Its length declared (refused before the body is read), then chunked (refused as it
    # arrives): the same answer.
    status, data = await bridge.post("/v1/b", None, {"Content-Type": "application/json"}, raw=body)
    assert (status, data["code"]) == (400, "payload_too_large"), data

    async def chunks() -> Any:
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    assert bridge.client is not None
    resp = await bridge.client.post("/v1/b", data=chunks(), headers={"Content-Type": "application/json"})
    assert (resp.status, (await resp.json())["code"]) == (400, "payload_too_large")


async def test_batch_context_and_sent_at_are_applied(bridge):
    batch = {
        "writeKey": WRITE_KEY,
        "context": {"device": {"type": "android"}},
        "sentAt": "2026-01-01T00:00:10.000Z",
        "batch": [{"type": "track", "userId": "u1", "event": "E", "timestamp": "2026-01-01T00:00:00.000Z"}],
    }
    assert (await bridge.post("/v1/batch", batch))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["actions"][0]["platform"] == "ANDROID"


async def test_a_future_dated_track_is_recorded_by_moengage_at_the_latest_now(bridge):
    """MoEngage silently drops a future-dated event: a server library's track (no sentAt,
    so no clock-skew correction at ingest) a day ahead reaches it capped at the mapping's
    now, and is recorded, not lost."""
    before = int(time.time())
    ahead = datetime.fromtimestamp(before + 86_400, UTC).isoformat()
    assert (await bridge.post("/v1/track", track_body(timestamp=ahead), basic(WRITE_KEY)))[0] == 200
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.events()) + len(moe.ignored) >= 1)
    assert moe.ignored == []
    [action] = moe.events()[0]["actions"]
    assert action["action"] == "Order Completed"
    assert before <= action["current_time"] <= time.time()


class LosesFirstAnswer:
    """A loopback hop in front of the bridge that passes each request on and loses the
    first answer: the bridge stored the batch, the client saw its connection drop (as
    after a timeout) and sends the batch again."""

    def __init__(self, target: str) -> None:
        self.target = URL(target)
        self.answers: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LosesFirstAnswer:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request, body = await _read_message(reader)
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        up_writer.write(request + body)
        head, answer = await _read_message(up_reader)
        up_writer.close()
        self.answers.append(answer)
        if len(self.answers) == 1:
            writer.transport.abort()  # the answer never reaches the client
            return
        writer.write(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1) + answer)
        await writer.drain()
        writer.close()


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def test_the_real_clients_resend_of_a_batch_whose_answer_was_lost_is_deduplicated_whole(bridge):
    """analytics-python (async, its defaults) resends a batch at once when its connection
    fails; the bridge had stored it. Every event of the resend is a duplicate, acknowledged
    and not delivered again."""
    errors: list[Any] = []
    async with LosesFirstAnswer(bridge.url) as hop:
        client = Client(WRITE_KEY, host=hop.url, upload_interval=0.05, on_error=lambda e, b: errors.append(e))
        for i in range(10):
            await call(client.track, f"lost-{i}", "Lost Answer", {"i": i})
        await call(client.flush)
        await call(client.join)
    assert errors == []
    assert [orjson.loads(a) for a in hop.answers] == [{"success": True}, {"success": True, "duplicates": 10}]
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.events()) == 10)
    await asyncio.sleep(0.3)
    assert sorted(e["customer_id"] for e in moe.events()) == sorted(f"lost-{i}" for i in range(10))


async def test_message_id_dedupe(bridge):
    body = track_body(messageId="dup-1", writeKey=WRITE_KEY)
    assert (await bridge.post("/v1/track", body))[0] == 200
    status, data = await bridge.post("/v1/track", body)
    assert status == 200 and data["success"] is True and data.get("duplicates") == 1
    batch = {"batch": [dict(body, type="track"), dict(body, type="track")], "writeKey": WRITE_KEY}
    assert (await bridge.post("/v1/batch", batch))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) >= 1)
    await asyncio.sleep(0.3)
    assert len(bridge.moengage.events()) == 1


@pytest.mark.parametrize(
    ("integrations", "delivered"),
    [
        ({"All": False}, False),
        ({"MoEngage": False}, False),
        ({"MoEngage (Actions)": False}, False),
        ({"Moengage (Actions)": False}, False),
        ({"All": False, "MoEngage": True}, True),
        ({"All": True, "Mixpanel": False}, True),
    ],
)
async def test_integrations_object_is_honoured(bridge, integrations, delivered):
    body = track_body(integrations=integrations, writeKey=WRITE_KEY, event="Marker")
    assert (await bridge.post("/v1/track", body))[0] == 200
    control = track_body(writeKey=WRITE_KEY, event="Control")
    assert (await bridge.post("/v1/track", control))[0] == 200
    await bridge.moengage.wait_for(
        lambda: any(e["actions"][0]["action"] == "Control" for e in bridge.moengage.events())
    )
    await asyncio.sleep(0.2)
    names = [e["actions"][0]["action"] for e in bridge.moengage.events()]
    assert ("Marker" in names) is delivered
    if not delivered:
        await wait_until(lambda: _has_discard(bridge, "integrations_disabled"), what="discard record")


async def _has_discard(bridge: Any, reason: str) -> bool:
    return any(d["reason"] == reason for d in await discards(bridge))


async def test_anonymous_and_blocklisted_ids_are_discarded_with_reasons(bridge):
    h = basic(WRITE_KEY)
    assert (await bridge.post("/v1/track", {"anonymousId": "anon-1", "event": "Anon"}, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "guest", "traits": {"a": 1}}, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "x", "traits": {"a": 1}}, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "u-ok", "traits": {"id": "N/A"}}, h))[0] == 200
    assert (await bridge.post("/v1/track", track_body(event="Control")))[0] in (200, 401)
    assert (await bridge.post("/v1/track", track_body(event="Control"), h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    await wait_until(lambda: _count_discards(bridge, 4), what="4 discards")
    found = await discards(bridge)
    reasons = sorted(d["reason"] for d in found)
    assert reasons == ["anonymous_user", "invalid_customer_id", "invalid_customer_id", "invalid_customer_id"]
    assert bridge.moengage.customers() == []
    anon = next(d for d in found if d["reason"] == "anonymous_user")
    assert anon["event"] == "Anon" and anon["destination"] == "moengage-main"


async def _count_discards(bridge: Any, n: int) -> bool:
    return len(await discards(bridge)) >= n


async def test_anonymous_ids_option_uses_anonymous_id(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["mapping_options"] = {"anonymous_ids": True}

    bridge = await make_bridge(tweak)
    assert (await bridge.post("/v1/track", {"anonymousId": "anon-77", "event": "Anon"}, basic(WRITE_KEY)))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "anon-77"


async def test_identity_link_applies_to_later_calls(bridge):
    h = basic(WRITE_KEY)
    assert (await bridge.post("/v1/identify", {"userId": "u-42", "traits": {"id": "CUST-42", "email": "a@b.co"}}, h))[
        0
    ] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.customers()) == 1)
    customer = bridge.moengage.customers()[0]
    assert customer["customer_id"] == "CUST-42"
    assert "id" not in customer["attributes"]
    assert (await bridge.post("/v1/track", {"userId": "u-42", "event": "Later"}, h))[0] == 200
    assert (await bridge.post("/v1/alias", {"userId": "u-42", "previousId": "anon-x"}, h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1 and len(bridge.moengage.merges()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "CUST-42"
    assert bridge.moengage.merges() == [{"merged_user": "anon-x", "retained_user": "CUST-42"}]


async def test_nothing_is_lost_across_a_restart(make_bridge):
    bridge = await make_bridge()
    bridge.moengage.refuse_all(503)
    ids = [f"restart-{i}" for i in range(25)]
    batch = {
        "batch": [
            {"type": "track", "userId": f"u{i % 5}", "event": "Persisted", "messageId": m} for i, m in enumerate(ids)
        ],
        "writeKey": WRITE_KEY,
    }
    assert (await bridge.post("/v1/batch", batch))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received > 0)
    await bridge.stop()
    bridge.moengage.refuse_all(None)
    await bridge.start()
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 25, timeout=15)
    assert sorted(e["actions"][0]["action"] for e in bridge.moengage.events()) == ["Persisted"] * 25


def _sign(body: bytes) -> str:
    return hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha1).hexdigest()


async def test_webhook_signature(bridge):
    event = {
        "type": "track",
        "userId": "wh-1",
        "event": "Hooked",
        "messageId": "wh-m1",
        "timestamp": "2026-11-01T10:00:00.000Z",
        "receivedAt": "2026-11-01T10:00:01.000Z",
    }
    body = orjson.dumps(event)
    h = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    status, data = await bridge.post("/segment/webhook", None, {**h, "X-Signature": _sign(body)}, raw=body)
    assert status == 200, data
    bad = dict(event, messageId="wh-m2")
    status, data = await bridge.post("/segment/webhook", None, {**h, "X-Signature": _sign(body)}, raw=orjson.dumps(bad))
    assert (status, data["code"]) == (401, "invalid_signature")
    status, data = await bridge.post("/segment/webhook", None, h, raw=orjson.dumps(bad))
    assert (status, data["code"]) == (401, "signature_required")
    # A batch (Webhooks Actions): only the first item is signed, as JSON.stringify wrote it.
    items = [dict(event, messageId="wh-b1", event="Batched"), dict(event, messageId="wh-b2", event="Batched")]
    first = orjson.dumps(items[0])
    status, data = await bridge.post(
        "/segment/webhook", None, {**h, "X-Signature": _sign(first)}, raw=orjson.dumps(items)
    )
    assert status == 200, data
    status, _ = await bridge.post("/segment/webhook", None, {"Content-Type": "application/json"}, raw=body)
    assert status == 401
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 3)
    assert {e["actions"][0]["action"] for e in bridge.moengage.events()} == {"Hooked", "Batched"}


@pytest.mark.parametrize("integrations", [{"MoEngage": False}, {"All": False}, {"All": False, "Mixpanel": True}])
async def test_an_identify_kept_away_from_moengage_does_not_rename_the_user_there(bridge, integrations):
    """Its userId -> traits.id link is about MoEngage's user: learnt from an identify that
    MoEngage never gets, it would send every later call of the user to another id."""
    h = basic(WRITE_KEY)
    ident = {"userId": "u-77", "traits": {"id": "test-account-77"}, "integrations": integrations}
    assert (await bridge.post("/v1/identify", ident, h))[0] == 200
    assert (await bridge.post("/v1/track", {"userId": "u-77", "event": "Bought"}, h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "u-77"
    assert bridge.moengage.customers() == []
    # The same identify sent to MoEngage does link.
    ident["integrations"] = {"MoEngage": True}
    ident["messageId"] = "ident-2"
    assert (await bridge.post("/v1/identify", ident, h))[0] == 200
    assert (await bridge.post("/v1/track", {"userId": "u-77", "event": "Bought Again"}, h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)
    assert bridge.moengage.events()[1]["customer_id"] == "test-account-77"


@pytest.mark.parametrize("traits_id", ["guest", "null ", "GUEST\u00a0"], ids=["plain", "padded", "nbsp"])
async def test_a_rejected_traits_id_does_not_hijack_later_calls(bridge, traits_id):
    # MoEngage trims an id before it checks it, so " null " is as much a placeholder as "null".
    h = basic(WRITE_KEY)
    assert (await bridge.post("/v1/identify", {"userId": "user-g", "traits": {"id": traits_id}}, h))[0] == 200
    assert (await bridge.post("/v1/track", {"userId": "user-g", "event": "Still Mine"}, h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "user-g"
    await wait_until(lambda: _has_discard(bridge, "invalid_customer_id"), what="the identify's discard")


async def test_a_gzip_bomb_is_refused_by_its_inflated_size(bridge):
    inflated = b'{"userId": "u", "event": "E", "properties": {"pad": "' + b"0" * 3_000_000 + b'"}}'
    raw = gzip.compress(inflated)
    assert len(raw) < 20_000
    status, data = await bridge.post(
        "/v1/track", None, {**basic(WRITE_KEY), "Content-Encoding": "gzip", "Content-Type": "application/json"}, raw=raw
    )
    assert (status, data["code"]) == (400, "payload_too_large")


async def test_write_key_edge_cases(bridge):
    # An empty Basic username names no key: the body's writeKey decides.
    empty_user = {"Authorization": "Basic " + base64.b64encode(b":").decode()}
    assert (await bridge.post("/v1/track", track_body(writeKey=WRITE_KEY), empty_user))[0] == 200
    status, data = await bridge.post("/v1/track", track_body(), empty_user)
    assert (status, data["code"]) == (401, "write_key_required")
    # Two different keys: refused, not silently routed by one of them (and never the EU one here).
    status, data = await bridge.post("/v1/track", track_body(writeKey=EU_WRITE_KEY), basic(WRITE_KEY))
    assert (status, data["code"]) == (401, "write_key_mismatch")
    assert EU_WRITE_KEY not in data["message"] and WRITE_KEY not in data["message"]
    # A Segment OAuth client sends a Bearer token with the key in the body: the key decides.
    bearer = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}
    assert (await bridge.post("/v1/batch", {"batch": [track_body(type="track")], "writeKey": WRITE_KEY}, bearer))[
        0
    ] == 200
    status, data = await bridge.post("/v1/batch", {"batch": [track_body(type="track")]}, bearer)
    assert (status, data["code"]) == (401, "write_key_required")
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)


async def test_a_batch_items_own_write_key_authenticates_it_and_another_key_is_refused_by_index(bridge):
    """A batch item may carry its own writeKey (analytics.js puts one in each event). A batch
    sent with the keys on its items only is taken by them, as the first item's names the
    source; an item naming another key (another source, another region, none known) is
    refused by its index rather than delivered to the batch's source's workspace."""
    items = [track_body(type="track", userId=f"own-key-{i}", writeKey=WRITE_KEY) for i in range(2)]
    status, data = await bridge.post("/v1/batch", {"batch": items})
    assert (status, data) == (200, {"success": True}), data
    foreign = [
        track_body(type="track", userId="eu-user", writeKey=EU_WRITE_KEY),
        track_body(type="track", userId="unknown-user", writeKey="not-a-key"),
        track_body(type="track", userId="own-key-2", writeKey=WRITE_KEY),
        track_body(type="track", userId="no-key"),
    ]
    for body, headers in (({"batch": foreign, "writeKey": WRITE_KEY}, None), ({"batch": foreign}, basic(WRITE_KEY))):
        status, data = await bridge.post("/v1/batch", body, headers)
        assert status == 200 and data["accepted"] == 2, data
        refused = [(r["index"], r["code"]) for r in data["rejected"]]
        assert refused == [(0, "write_key_mismatch"), (1, "write_key_mismatch")], data
        assert EU_WRITE_KEY not in str(data) and "not-a-key" not in str(data)
    # Keys on the items only, the first another region's: refused as that key is, whole.
    status, data = await bridge.post("/v1/batch", {"batch": foreign[:1] + items})
    assert (status, data["code"]) == (403, "wrong_region"), data
    moe = bridge.moengage
    await moe.wait_for(lambda: len(moe.events()) == 4)
    await asyncio.sleep(0.2)
    assert sorted(e["customer_id"] for e in moe.events()) == ["no-key", "own-key-0", "own-key-1", "own-key-2"]


async def test_the_32_kb_limit_is_on_the_event_as_sent(bridge):
    h = basic(WRITE_KEY)
    # A single call over 32 KB as sent is refused, even by a byte.
    body = track_body(properties={"pad": ""})
    body["properties"]["pad"] = "x" * (32 * 1024 - len(orjson.dumps(body)) + 1)
    assert len(orjson.dumps(body)) == 32 * 1024 + 1
    status, data = await bridge.post("/v1/track", None, h, raw=orjson.dumps(body))
    assert (status, data["code"]) == (400, "event_too_large") and "Exceed payload limit" in data["message"]
    body["properties"]["pad"] = body["properties"]["pad"][:-1]
    assert (await bridge.post("/v1/track", None, h, raw=orjson.dumps(body)))[0] == 200
    # In a batch, the batch's context merged into an item does not count against it.
    item = {"type": "track", "userId": "user-big", "event": "Big", "properties": {"pad": "y" * 20_000}}
    batch = {"batch": [item], "context": {"pad": "z" * 20_000}}
    status, data = await bridge.post("/v1/batch", batch, h)
    assert (status, data) == (200, {"success": True})


async def test_a_webhook_event_is_not_refused_for_the_fields_segment_added(bridge):
    """Segment measures a call against 32 KB as the client sent it, then adds its own fields
    (receivedAt, sentAt, originalTimestamp, version, channel, projectId...) before its
    Webhooks destination forwards it. A 400 for those would lose the event: Segment does
    not retry a 400. Past the allowance for them, the limit still holds."""
    h = basic(WRITE_KEY)
    sent: dict[str, Any] = {
        "type": "track",
        "userId": "user-big",
        "event": "Big",
        "properties": {"pad": ""},
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "messageId": "wh-big-1",
        "timestamp": "2026-11-23T12:00:00.123000+00:00",
    }
    sent["properties"]["pad"] = "x" * (32_600 - len(orjson.dumps(sent)))
    assert len(orjson.dumps(sent)) == 32_600  # within the 32 KB a client may send
    forwarded = {
        **sent,
        "originalTimestamp": "2026-11-23T12:00:00.123Z",
        "sentAt": "2026-11-23T12:00:00.200Z",
        "receivedAt": "2026-11-23T12:00:00.300Z",
        "timestamp": "2026-11-23T12:00:00.223Z",
        "version": 2,
        "channel": "server",
        "projectId": "AbCdEf1234",
    }
    body = orjson.dumps(forwarded)
    assert len(body) > 32 * 1024
    status, data = await bridge.post("/segment/webhook", None, {**h, "X-Signature": _sign(body)}, raw=body)
    assert (status, data) == (200, {"success": True})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    # Far past what Segment adds, it is still too large.
    forwarded["messageId"], forwarded["properties"] = "wh-big-2", {"pad": "x" * (36 * 1024)}
    body = orjson.dumps(forwarded)
    status, data = await bridge.post("/segment/webhook", None, {**h, "X-Signature": _sign(body)}, raw=body)
    assert (status, data["code"]) == (400, "event_too_large"), data


async def test_an_event_too_deep_to_store_is_rejected_by_index(bridge):
    deep = nested(300)
    too_deep = {"type": "track", "userId": "u-d", "event": "Deep", "properties": deep}
    batch = {"batch": [too_deep, track_body(type="track")]}
    status, data = await bridge.post("/v1/batch", batch, basic(WRITE_KEY))
    assert status == 200 and [(r["index"], r["code"]) for r in data["rejected"]] == [(0, "event_too_deep")]
    status, data = await bridge.post("/v1/track", {**track_body(), "properties": deep}, basic(WRITE_KEY))
    assert (status, data["code"]) == (400, "event_too_deep")


async def test_the_deepest_event_ingest_takes_is_delivered_and_one_deeper_is_refused(bridge):
    """orjson writes 254 levels, and a Create Event nests a track's properties two levels
    deeper than the track has them (actions[0].attributes): a track 252 levels deep is
    delivered; one 253 or 254 deep was stored, then dead-lettered as render_error, as it
    always would be. It is refused at ingest now, as one the store cannot hold is."""
    deepest = {**track_body(messageId="deepest"), "properties": nested(250)}
    assert depth(deepest) == 252
    status, data = await bridge.post("/v1/track", deepest, basic(WRITE_KEY))
    assert (status, data) == (200, {"success": True}), data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    attributes = bridge.moengage.events()[0]["actions"][0]["attributes"]
    assert attributes == nested(250)
    for levels in (251, 252):  # the store took these; no destination can be sent them
        deeper = {**track_body(), "properties": nested(levels)}
        assert depth(deeper) == levels + 2
        status, data = await bridge.post("/v1/track", deeper, basic(WRITE_KEY))
        assert (status, data["code"]) == (400, "event_too_deep"), data
        assert "nested more than 252 levels deep" in data["message"], data
        batch = {"batch": [{**deeper, "type": "track"}, track_body(type="track", messageId=f"fine-{levels}")]}
        status, data = await bridge.post("/v1/batch", batch, basic(WRITE_KEY))
        assert status == 200 and [(r["index"], r["code"]) for r in data["rejected"]] == [(0, "event_too_deep")]
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 3)
    status, data = await bridge.get("/admin/dlq", ADMIN)
    assert (status, data["dead_letters"]) == (200, []), data


async def test_a_batch_past_max_batch_events_keeps_its_first_events_as_segment_does(make_bridge):
    """Segment's Tracking API answers a batch of more than 2500 events with a 200 and
    rejects the events past them; a 400 made the client drop every event of the batch."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["max_batch_events"] = 5

    bridge = await make_bridge(tweak)
    items = [track_body(type="track", userId=f"many-{i}", messageId=f"many-{i}") for i in range(7)]
    status, data = await bridge.post("/v1/batch", {"batch": items}, basic(WRITE_KEY))
    assert status == 200, data
    # One entry for all the events past the limit: one each grew the answer with the body.
    assert data["rejected"] == [
        {
            "index": 5,
            "code": "too_many_events",
            "message": "the batch has 7 events; the first 5 are taken, and the 2 from index 5 on are rejected",
        }
    ]
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 5)
    assert sorted(e["customer_id"] for e in bridge.moengage.events()) == [f"many-{i}" for i in range(5)]
    # A body of 20,000 bad items: the answer names the 5 taken (each refused) and one range.
    with capture_logs() as logs:
        status, data = await bridge.post("/v1/batch", {"batch": [0] * 20_000}, basic(WRITE_KEY))
    assert status == 400 and [r["index"] for r in data["rejected"]] == [0, 1, 2, 3, 4, 5], data
    # Counted as events, not as entries of the answer (one stands for 19,995 of them).
    assert data["message"] == "all 20000 events were rejected", data
    (line,) = [e for e in logs if e["event"] == "events_rejected"]
    assert (line["rejected"], line["accepted"]) == (20_000, 0)
    with capture_logs() as logs:
        status, data = await bridge.post("/v1/batch", {"batch": [*items[:4], 0, *items]}, basic(WRITE_KEY))
    assert status == 200, data
    (line,) = [e for e in logs if e["event"] == "events_rejected"]
    assert (line["rejected"], line["accepted"]) == (8, 4)


async def test_webhook_batches_of_segments_default_size(bridge):
    """Webhooks (Actions) batches 1000 events by default (up to 4000): about 1 MB here."""
    h = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    items = [
        {
            "type": "track",
            "userId": f"wh-user-{i % 50}",
            "event": "Webhook Batched",
            "messageId": f"whb-{i}",
            "timestamp": "2026-11-01T10:00:00.000Z",
            "properties": {"i": i, "text": "w" * 900},
        }
        for i in range(1000)
    ]
    body = orjson.dumps(items)
    assert len(body) > 512_000  # more than a Tracking API request may carry
    signed = {**h, "X-Signature": _sign(orjson.dumps(items[0]))}
    status, data = await bridge.post("/segment/webhook", None, signed, raw=body)
    assert (status, data) == (200, {"success": True}), data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1000, timeout=20)


async def test_a_webhook_event_without_a_timestamp_is_timed_when_segment_received_it(bridge):
    """A Webhooks (Actions) mapping may send an event without its timestamp; it is timed
    from the receivedAt Segment gave it (here months before this run, as after Segment's
    retries it may be hours), not when the bridge got it."""
    event = {"type": "track", "userId": "wh-ts", "event": "Untimed", "messageId": "wh-ts-1"}
    body = orjson.dumps({**event, "receivedAt": "2026-11-01T10:00:00.000Z"})
    headers = {**basic(WRITE_KEY), "X-Signature": _sign(body)}
    status, data = await bridge.post("/segment/webhook", None, headers, raw=body)
    assert status == 200, data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    (sent,) = bridge.moengage.events()
    when = datetime(2026, 11, 1, 10, tzinfo=UTC).timestamp()
    assert sent["actions"][0]["current_time"] == when, sent


async def test_a_non_ascii_signature_is_a_401(bridge):
    auth = basic(WRITE_KEY)["Authorization"].encode()
    body = orjson.dumps(track_body(type="track"))
    headers = b"Authorization: " + auth + b"\r\nX-Signature: \xff\xfe"
    status, data = await raw_post(bridge, "/segment/webhook", headers, body)
    assert (status, data["code"]) == (401, "invalid_signature")


async def test_an_alias_merges_the_moengage_user_its_previous_id_became(bridge):
    """identify(old, traits.id=crm) made 'old' MoEngage user 'crm'; the merge must name it."""
    h = basic(WRITE_KEY)
    identify = {"userId": "old-1", "traits": {"id": "crm-old-1", "email": "o@example.com"}}
    assert (await bridge.post("/v1/identify", identify, h))[0] == 200
    assert (await bridge.post("/v1/alias", {"previousId": "old-1", "userId": "new-1"}, h))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.merges()) == 1)
    assert bridge.moengage.merges() == [{"merged_user": "crm-old-1", "retained_user": "new-1"}]
    assert [c["customer_id"] for c in bridge.moengage.customers()] == ["crm-old-1"]


async def test_a_webhook_event_with_a_non_string_type_is_a_400(bridge):
    h = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    items = [{"type": ["delete"], "userId": "u-t", "messageId": "t-1"}]
    raw = orjson.dumps(items)
    status, data = await bridge.post(
        "/segment/webhook", None, {**h, "X-Signature": _sign(orjson.dumps(items[0]))}, raw=raw
    )
    assert (status, data["code"]) == (400, "invalid_type")


async def test_events_too_large_for_bulk_import_go_alone_and_those_too_large_for_moengage_wait_in_the_dlq(make_bridge):
    """With server.max_event_bytes raised past MoEngage's caps: an event over Bulk Import's
    100 KB goes alone to Create Event (128 KB), where Bulk Import would refuse it (413)
    every time; one over 128 KB is dead-lettered as too large, without a request, and a
    burst of those is the events' fault, not a bad deploy: the guard does not pause."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["max_event_bytes"] = 400_000
        raw["server"]["max_request_bytes"] = 4_000_000

    bridge = await make_bridge(tweak)
    h = basic(WRITE_KEY)
    large = track_body(type="track", userId="u-large", event="Large", properties={"blob": "x" * 110_000})
    too_large = [
        track_body(type="track", userId=f"u-huge-{i}", event="Huge", properties={"blob": "x" * 140_000})
        for i in range(20)
    ]
    small = [track_body(type="track", userId=f"u-small-{i}", event="Small") for i in range(5)]
    status, data = await bridge.post("/v1/batch", {"batch": [large, *too_large, *small]}, h)
    assert status == 200, data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 6, timeout=10)
    assert sorted(e["actions"][0]["action"] for e in bridge.moengage.events()) == ["Large"] + ["Small"] * 5
    alone = [r for r in bridge.moengage.requests if "/v1/event/" in r.path]
    assert len(alone) == 1 and alone[0].body["customer_id"] == "u-large"

    async def all_dead() -> bool:
        _, body = await bridge.get("/admin/dlq?reason=event_too_large&limit=100", ADMIN)
        return len(body["dead_letters"]) == 20

    await wait_until(all_dead, what="the events too large for MoEngage in the DLQ")
    _, body = await bridge.get("/admin/dlq?limit=100", ADMIN)
    assert {d["reason"] for d in body["dead_letters"]} == {"event_too_large"}
    # By how much: what to trim before a replay, without measuring the request body.
    _, full = await bridge.get(f"/admin/dlq/{body['dead_letters'][0]['id']}", ADMIN)
    size = len(orjson.dumps(full["request"]))
    detail = f"the mapped event is {size} bytes alone in its request, and MoEngage takes at most 128000 bytes"
    assert detail in full["response_body"], full["response_body"]
    assert [s for s in bridge.moengage.seen if s.status != 200] == []  # no 413, nothing refused
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert not next(d for d in status_body["destinations"] if d["name"] == "moengage-main")["paused"]


async def test_a_webhook_batch_is_bounded_by_the_webhook_limits_not_the_tracking_apis(make_bridge):
    """server.max_batch_events bounds /v1/batch; a Webhooks (Actions) batch is bounded by
    max_webhook_events, before it is parsed too. Lowering the Tracking API's limit must not
    refuse Segment's own batches: a 400 is a failed delivery Segment never retries."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["max_batch_events"] = 100

    bridge = await make_bridge(tweak)
    h = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    items = [
        {
            "type": "track",
            "userId": f"wh-user-{i % 20}",
            "event": "Order Completed",
            "messageId": f"whc-{i}",
            "timestamp": "2026-11-01T10:00:00.000Z",
            "context": {"library": {"name": "analytics.js", "version": "2.11.1"}, "page": {"path": "/"}},
            "properties": {"products": [{"sku": f"s-{j}", "tags": ["a"]} for j in range(20)]},
        }
        for i in range(500)
    ]
    body = orjson.dumps(items)
    assert body.count(b"{") + body.count(b"[") > 100 * 200  # past the Tracking API's budget
    status, data = await bridge.post(
        "/segment/webhook", None, {**h, "X-Signature": _sign(orjson.dumps(items[0]))}, raw=body
    )
    assert (status, data) == (200, {"success": True}), data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 500, timeout=20)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_a_webhooks_actions_mapping_may_send_with_put_or_patch(bridge, method):
    """Webhooks (Actions) sends with the method its mapping names: POST, PUT or PATCH."""
    event = track_body(type="track", userId=f"wh-{method}", event=f"Hooked by {method}")
    body = orjson.dumps(event)
    h = {**basic(WRITE_KEY), "Content-Type": "application/json", "X-Signature": _sign(body)}
    assert bridge.client is not None
    resp = await bridge.client.request(method, "/segment/webhook", data=body, headers=h)
    assert resp.status == 200, await resp.text()
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["actions"][0]["action"] == f"Hooked by {method}"


async def test_a_webhook_event_segment_routed_by_all_false_is_not_discarded_for_it(bridge):
    """{"All": false, "Webhooks": true} is how a Segment call picks its destinations: Segment
    applied it when it sent the event to the Webhooks destination (the bridge). Discarding
    it again for "All" lost every event routed to the bridge that way; a name set to false
    (MoEngage here) still keeps an event from MoEngage."""
    h = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    routed = {"All": False, "Webhooks": True}
    items = [
        track_body(type="track", event="Routed", messageId="wh-routed-1", integrations=routed),
        track_body(
            type="track",
            event="Actions",
            messageId="wh-routed-2",
            integrations={"All": False, "Webhooks (Actions)": {}},
        ),
        track_body(
            type="track", event="Kept Away", messageId="wh-routed-3", integrations={**routed, "MoEngage": False}
        ),
    ]
    status, data = await bridge.post(
        "/segment/webhook", None, {**h, "X-Signature": _sign(orjson.dumps(items[0]))}, raw=orjson.dumps(items)
    )
    assert (status, data) == (200, {"success": True}), data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)
    assert sorted(e["actions"][0]["action"] for e in bridge.moengage.events()) == ["Actions", "Routed"]
    await wait_until(lambda: _has_discard(bridge, "integrations_disabled"), what="discard record")
    assert [d["message_id"] for d in await discards(bridge)] == ["wh-routed-3"]
