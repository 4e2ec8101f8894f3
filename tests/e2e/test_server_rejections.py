"""Requests aiohttp refuses before any route sees them get the bridge's JSON errors too."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gzip
import importlib.util
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from yarl import URL

from bridge.observability.logging import configure_logging
from tests.e2e.harness import WRITE_KEY, Bridge, basic, config_dict, raw_exchange
from tests.e2e.proc import BridgeProcess


def track(user: str) -> bytes:
    """A track call of its own: ``user`` is also its messageId, so no two are duplicates."""
    return orjson.dumps({"userId": user, "event": "Signed Up", "messageId": f"m-{user}"})


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body[: int(headers.get("content-length", len(body)))]


def json_error(raw: bytes) -> tuple[int, str, str]:
    status, headers, body = answer_of(raw)
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    error = orjson.loads(body)
    assert set(error) == {"code", "message"}, error
    assert error["message"], error
    return status, error["code"], error["message"]


def track_request(extra_headers: bytes, body: bytes | None = None, user: str = "u-1") -> bytes:
    body = track(user) if body is None else body
    auth = basic(WRITE_KEY)["Authorization"].encode()
    return (
        b"POST /v1/track HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\nAuthorization: "
        + auth
        + b"\r\n"
        + extra_headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400, "malformed_request"),
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (b"POST /v1/track HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n", 400, "malformed_request"),
        (b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 400, "header_too_large"),
        (b"POST /v1/" + b"t" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, "header_too_large"),
    ],
    ids=["content-length-not-a-number", "not-http", "space-in-header-name", "long-header", "long-request-line"],
)
async def test_requests_aiohttp_cannot_parse_get_json_errors(
    bridge: Bridge, request_bytes: bytes, status: int, code: str
) -> None:
    got_status, got_code, message = json_error(await raw_exchange(bridge, request_bytes))
    assert (got_status, got_code) == (status, code), message


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) for m in ("brotli", "brotlicffi")),
    reason="with a Brotli library installed aiohttp decodes br",
)
async def test_an_encoding_aiohttp_cannot_decode_is_415_like_any_other_unsupported_one(bridge: Bridge) -> None:
    status, code, _ = json_error(await raw_exchange(bridge, track_request(b"Content-Encoding: br\r\n")))
    assert (status, code) == (415, "unsupported_encoding")
    # The same answer as for an encoding the bridge itself refuses.
    status, code, _ = json_error(
        await raw_exchange(bridge, track_request(b"Content-Encoding: compress\r\nConnection: close\r\n"))
    )
    assert (status, code) == (415, "unsupported_encoding")


async def test_an_unknown_expectation_is_a_json_417_logged_counted_and_stores_nothing(bridge: Bridge) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        for path, user in ((b"/v1/track", "u-417"), (b"/no-such-path", "u-417-elsewhere")):
            request = track_request(b"Expect: 200-ok\r\nConnection: close\r\n", user=user)
            status, code, message = json_error(await raw_exchange(bridge, request.replace(b"/v1/track", path, 1)))
            assert (status, code) == (417, "expectation_failed")
            assert "200-ok" in message
    finally:
        configure_logging("warning", "console")
    rejected = [
        line for line in map(orjson.loads, stream.getvalue().splitlines()) if line["event"] == "request_rejected"
    ]
    assert [(r["route"], r["status"], r["code"]) for r in rejected] == [
        ("/v1/track", 417, "expectation_failed"),
        ("unmatched", 417, "expectation_failed"),
    ]
    _, text = await bridge.get("/metrics")
    assert 'route="/v1/track",status="417"' in text, text
    # Then a normal call: it is the only event that reaches MoEngage.
    status, _, body = answer_of(await raw_exchange(bridge, track_request(b"Connection: close\r\n", user="u-ok")))
    assert status == 200, body
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) >= 1)
    await asyncio.sleep(0.2)
    assert [e["customer_id"] for e in bridge.moengage.events()] == ["u-ok"]


@pytest.mark.parametrize("request_line", [b"CONNECT example.com:443", b"CONNECT /v1/track", b"OPTIONS *"])
async def test_an_unreadable_expectation_on_a_request_no_route_takes_is_a_417_not_a_500(
    bridge: Bridge, request_line: bytes
) -> None:
    """CONNECT and OPTIONS * name no path, so not even the catch-all takes them, and their
    Expect went to aiohttp's own handler, which fails on a value it cannot write back as
    UTF-8: a 500, and a traceback in the error log, for a probe's bad header."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        request = request_line + b" HTTP/1.1\r\nHost: x\r\nExpect: \xff100-continue\r\nConnection: close\r\n\r\n"
        status, code, _ = json_error(await raw_exchange(bridge, request))
    finally:
        configure_logging("warning", "console")
    assert (status, code) == (417, "expectation_failed")
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [line for line in lines if line["level"] not in ("info", "debug")] == []
    assert [(line["status"], line["reason"]) for line in lines if line["event"] == "bad_http_request"] == [
        (417, "the Expect header is not UTF-8")
    ]
    assert (await bridge.get("/healthz"))[0] == 200


async def test_expect_100_continue_still_gets_its_interim_answer_and_the_call_is_stored(bridge: Bridge) -> None:
    url = URL(bridge.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        request = track_request(b"Expect: 100-continue\r\nConnection: close\r\n")
        head, _, body = request.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")  # headers only: the body waits for the 100
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        writer.write(body)
        await writer.drain()
        status, _, answer = answer_of(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()
    assert status == 200, answer
    assert orjson.loads(answer) == {"success": True}
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "u-1"


async def test_expect_100_continue_refused_on_its_headers_gets_the_answer_without_sending_the_body(
    bridge: Bridge,
) -> None:
    # A wrong write key, and a body declared past the limit: the final answer comes at
    # once, with no 100 Continue before it, while the client still holds its body back.
    wrong_key = track_request(b"Expect: 100-continue\r\nConnection: close\r\n").replace(
        basic(WRITE_KEY)["Authorization"].encode(), basic("not-a-key")["Authorization"].encode()
    )
    oversize = b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: 999999999\r\n"
    too_large = track_request(oversize).replace(b"Content-Length: %d\r\n" % len(track("u-1")), b"", 1)
    for request, status, code in ((wrong_key, 401, "invalid_write_key"), (too_large, 400, "payload_too_large")):
        url = URL(bridge.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            head, _, _ = request.partition(b"\r\n\r\n")
            writer.write(head + b"\r\n\r\n")  # headers only: the body waits for a 100
            await writer.drain()
            # The answer, read by its length: the server may keep the connection open a
            # while for the body it did not ask for.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            _, headers, _ = answer_of(head)
            raw = head + await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        finally:
            writer.close()
        assert not raw.startswith(b"HTTP/1.1 100"), raw
        assert json_error(raw)[:2] == (status, code), raw


async def test_a_gzip_body_that_is_not_gzip_is_still_the_bridges_own_400(bridge: Bridge) -> None:
    # Decoded while the route reads the body, so the route's own error, not the server's.
    corrupt = gzip.compress(track("u-gz"))[:10] + b"\x00" * 20
    raw = await raw_exchange(bridge, track_request(b"Content-Encoding: gzip\r\nConnection: close\r\n", corrupt))
    status, code, _ = json_error(raw)
    assert status == 400, code


async def test_bridge_serve_answers_them_as_json_too(tmp_path: Path) -> None:
    # `bridge serve` builds its own runner: the same JSON there as in the tests' server.
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        bad = b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
        assert json_error(await raw_exchange(proc, bad))[:2] == (400, "malformed_request")
        odd = track_request(b"Expect: 200-ok\r\nConnection: close\r\n")
        assert json_error(await raw_exchange(proc, odd))[:2] == (417, "expectation_failed")
    finally:
        await proc.ensure_stopped()


async def test_a_client_sending_its_headers_too_slowly_is_cut_off_after_the_idle_timeout(make_bridge: Any) -> None:
    def quick(raw: dict[str, Any]) -> None:
        raw["server"]["idle_timeout"] = 0.5

    bridge: Bridge = await make_bridge(quick)
    url = URL(bridge.url)
    loop = asyncio.get_running_loop()
    # A keep-alive client that sends a request and then nothing: closed once idle.
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(track_request(b"", user="u-idle"))
    status, _, _ = answer_of(await asyncio.wait_for(reader.readuntil(b'{"success":true}'), 5))
    assert status == 200
    began = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - began >= 0.4
    writer.close()
    # A client trickling its headers a byte at a time, each well inside the timeout.
    reader, writer = await asyncio.open_connection(url.host, url.port)
    began = loop.time()
    closed_after = None
    for byte in track_request(b"X-Slow: " + b"s" * 200 + b"\r\n", user="u-slow"):
        try:
            if reader.at_eof() or writer.is_closing():
                raise ConnectionResetError
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                    raise ConnectionResetError
        except ConnectionError:
            closed_after = loop.time() - began
            break
    writer.close()
    assert closed_after is not None, "the connection stayed open for the whole trickle"
    assert 0.4 <= closed_after < 3, closed_after
    # Nothing of it was taken: only the first call reaches MoEngage.
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) >= 1)
    await asyncio.sleep(0.2)
    assert [e["customer_id"] for e in bridge.moengage.events()] == ["u-idle"]


async def test_a_slow_body_past_the_idle_timeout_is_still_taken(make_bridge: Any) -> None:
    # idle_timeout bounds the wait for headers only: a body has body_timeout.
    def quick(raw: dict[str, Any]) -> None:
        raw["server"]["idle_timeout"] = 0.3

    bridge: Bridge = await make_bridge(quick)
    url = URL(bridge.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        head, _, body = track_request(b"Connection: close\r\n", user="u-slow-body").partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        for start in range(0, len(body), 8):  # about 1 s in all, three times the idle timeout
            writer.write(body[start : start + 8])
            await writer.drain()
            await asyncio.sleep(1.0 / (len(body) / 8))
        status, _, answer = answer_of(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()
    assert status == 200, answer
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["customer_id"] == "u-slow-body"


async def test_no_rejection_echoes_a_header_it_choked_on(bridge: Bridge) -> None:
    # An oversized or mistyped credential must not come back in the answer (SDKs log it).
    secret = "wk_live_NOT_REGISTERED_" + "q" * 9000
    token = base64.b64encode(f"{secret}:".encode())
    for request in (
        b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + token + b"\r\n\r\n",
        b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Write-Key: wk_live_RAW\x01SECRET\r\n\r\n",
        b"POST /v1/track?writeKey=wk_live_URLSECRET HTTP/1.1 trailing\r\nHost: x\r\n\r\n",
    ):
        raw = await raw_exchange(bridge, request)
        status, _, message = json_error(raw)
        assert status == 400, message
        for leaked in (b"wk_live", token[:40], b"SECRET"):
            assert leaked not in raw, raw[:300]


async def test_a_second_bridge_serve_on_the_same_sqlite_file_exits_saying_why(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    first = BridgeProcess(copy.deepcopy(raw), tmp_path)
    (tmp_path / "second").mkdir()
    second = BridgeProcess(copy.deepcopy(raw), tmp_path / "second")  # same store URL, own port
    try:
        await first.start()
        with pytest.raises(AssertionError, match="exited early"):
            await second.start()
        assert "another bridge server is using" in second.log_path.read_text()
        # The first one is unharmed: it still takes calls.
        status, _, body = answer_of(await raw_exchange(first, track_request(b"Connection: close\r\n")))
        assert status == 200, body
    finally:
        await second.ensure_stopped()
        await first.ensure_stopped()
