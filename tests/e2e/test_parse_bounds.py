"""What a body costs before it is trusted: a webhook whose signature is missing or wrong is
refused before it is read or parsed, and a batch body with more JSON objects and arrays
than its events could hold is refused before it is parsed (a small body of nested empty
containers parses into some 35 times its size)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import tracemalloc

import orjson
import pytest
from yarl import URL

from bridge.sources.segment import routes
from bridge.sources.segment.routes import first_array_item
from tests.e2e.harness import STREAMS_PASSWORD, STREAMS_USER, WEBHOOK_SECRET, WRITE_KEY, Bridge, basic

STREAMS = "/moengage/streams/streams-main"


async def head_and_json(bridge: Bridge, request: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """The answer to ``request``, read by its Content-Length: the bridge may keep the
    connection open to drain a body it refused unread."""
    url = URL(bridge.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        return int(lines[0].split(" ")[1]), headers, orjson.loads(body)
    finally:
        writer.close()


async def test_an_unsigned_webhook_is_refused_before_its_body_is_read(bridge: Bridge) -> None:
    auth = basic(WRITE_KEY)["Authorization"].encode()
    # 16 MB declared, 10 bytes sent: were the body awaited, this would time out.
    request = (
        b"POST /segment/webhook HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nAuthorization: "
        + auth
        + b"\r\nContent-Length: 16000000\r\n\r\n[[],[],[],"
    )
    status, headers, body = await head_and_json(bridge, request)
    assert (status, body["code"]) == (401, "signature_required")
    assert headers["connection"].lower() == "close"  # not kept open to drain 16 MB


async def test_a_webhook_with_a_wrong_signature_is_refused_before_it_is_parsed(bridge: Bridge) -> None:
    bomb = gzip.compress(b"[" + b"[]," * 2_000_000 + b"[]]")  # 6 MB inflated, 6 KB sent
    headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip", "X-Signature": "00" * 20}
    tracemalloc.start()
    try:
        status, body = await bridge.post("/segment/webhook", None, headers, raw=bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, body["code"]) == (401, "invalid_signature")
    # The inflated bytes and their copies, but not the 2M lists parsing would build (~130 MB).
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a refused body"


async def test_a_signed_webhook_of_nested_empty_containers_is_refused_before_it_is_parsed(bridge: Bridge) -> None:
    inflated = b"[" + b"[]," * 2_000_000 + b"[]]"
    signature = hmac.new(WEBHOOK_SECRET.encode(), b"[]", hashlib.sha1).hexdigest()  # the first item, as Segment signs
    headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip", "X-Signature": signature}
    status, body = await bridge.post("/segment/webhook", None, headers, raw=gzip.compress(inflated))
    assert (status, body["code"]) == (400, "too_many_values"), body
    assert "at most 800000" in str(body["message"])  # 200 for each of the 4000 events a webhook may carry


async def test_a_streams_body_of_nested_empty_containers_is_refused_before_it_is_parsed(bridge: Bridge) -> None:
    raw = b'{"events": [' + b"[]," * 600_000 + b"[]]}"
    status, body = await bridge.post(STREAMS, None, basic(STREAMS_USER, STREAMS_PASSWORD), raw=raw)
    # Parsed first, it would have been refused for its 600,001 events instead.
    assert (status, body["code"]) == (400, "too_many_values"), body


async def test_a_batch_context_merged_into_every_event_is_bounded(bridge: Bridge) -> None:
    """A batch's top-level context is stored again in each of its events, and does not count
    against an event's 32 KB: one request of small events sharing a large context stored
    hundreds of times its size (2500 events and a 300 KB context: 750 MB, held in memory
    until the commit). Past 16 request bodies' worth of copies the batch is refused whole,
    before anything is stored; a batch sharing an ordinary context is taken as before."""
    assert bridge.runtime is not None
    events = [{"type": "track", "userId": f"u-{i}", "event": "Viewed", "messageId": f"ctx-{i}"} for i in range(100)]
    # 100 copies of a 100 KB context: 10 MB from a 100 KB body, past 16 x 512000 bytes.
    big = {"batch": events, "context": {"pad": "z" * 100_000}}
    status, body = await bridge.post("/v1/batch", big, basic(WRITE_KEY))
    assert (status, body["code"]) == (400, "batch_context_too_large"), body
    assert (await bridge.runtime.store.queue_stats()) == {}  # nothing was stored
    # 2500 events sharing a 3 KB context (7.5 MB of copies) are within the bound.
    many = [{"type": "track", "userId": f"u-{i}", "event": "Viewed", "messageId": f"ok-{i}"} for i in range(2500)]
    ordinary = {"batch": many, "context": {"library": {"name": "custom"}, "pad": "c" * 3000}}
    assert await bridge.post("/v1/batch", ordinary, basic(WRITE_KEY)) == (200, {"success": True})


def _signature(signed: bytes) -> str:
    return hmac.new(WEBHOOK_SECRET.encode(), signed, hashlib.sha1).hexdigest()


async def test_a_webhook_batchs_first_item_is_looked_for_within_an_events_size_only(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segment signs a batch's first item, which is found by a byte-by-byte scan in Python.
    Unbounded, a 16 KB gzip'd body whose first item is a 16 MB string (any signature) held
    the event loop for half a second, each request. The item is one event: the scan stops
    within a few times an event's limit, and an item running past that is refused."""
    scanned: list[int] = []

    def recording(body: bytes) -> bytes | None:
        scanned.append(len(body))
        return first_array_item(body)

    monkeypatch.setattr(routes, "first_array_item", recording)
    inflated = b'["' + b"a" * 16_000_000 + b'"]'
    headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip", "X-Signature": "00" * 20}
    status, body = await bridge.post("/segment/webhook", None, headers, raw=gzip.compress(inflated))
    assert (status, body["code"]) == (400, "event_too_large"), body
    assert "first item" in str(body["message"])
    assert scanned and max(scanned) < 16 * (32768 + 2048), scanned  # a few events' worth, not 16 MB

    # A genuine first item at the event limit, nearly all of it written as \u0078 escapes
    # (six bytes a character where Segment writes one), is still found and its signature checked.
    event = {"type": "track", "userId": "u-big", "event": "Big", "messageId": "scan-1"}
    text = orjson.dumps({**event, "properties": {"t": "x" * 30_000}})
    escaped = text.replace(b"x", b"\\u0078")
    assert len(escaped) > 150_000 and orjson.loads(escaped) == orjson.loads(text)
    second = orjson.dumps({**event, "messageId": "scan-2"})
    batch = b"[" + escaped + b"," + second + b"]"
    status, body = await bridge.post(
        "/segment/webhook", None, {**basic(WRITE_KEY), "X-Signature": _signature(escaped)}, raw=batch
    )
    assert (status, body) == (200, {"success": True}), body


async def test_an_empty_webhook_batch_is_an_empty_batch_not_a_bad_signature(bridge: Bridge) -> None:
    """An empty array has no first item for Segment to sign: the answer says what is wrong
    with it (nothing to take), rather than send its sender after the shared secret."""
    for raw in (b"[]", b" [ \n] "):
        headers = {**basic(WRITE_KEY), "X-Signature": _signature(b"")}
        status, body = await bridge.post("/segment/webhook", None, headers, raw=raw)
        assert (status, body["code"]) == (400, "empty_batch"), body
    # A batch that is not even an array's opening is still a wrong signature.
    status, body = await bridge.post("/segment/webhook", None, {**basic(WRITE_KEY), "X-Signature": "00"}, raw=b"[")
    assert (status, body["code"]) == (401, "invalid_signature"), body
