"""The request body reader and JSON parser at their edges: bodies past a route's limit
while still arriving, and the lone-surrogate fallback's limits."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from bridge.httpx import ApiError, OutOfRange, holds_out_of_range, parse_json


# -- 12b1c73 httpx: the lone-surrogate fallback -------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"a": "é", "b": 1}'.encode("utf-16"), id="utf-16 with BOM"),
        pytest.param('{"a": "é", "b": 1}'.encode("utf-16-le"), id="utf-16-le without BOM"),
        pytest.param('{"a": 1}'.encode("utf-32"), id="utf-32"),
        pytest.param(b'{"a": "\xed\xa0\x80"}', id="raw UTF-8-encoded surrogate bytes (invalid UTF-8)"),
    ],
)
def test_parse_json_still_refuses_a_body_that_is_not_utf8(body: bytes) -> None:
    """orjson says "str is not valid UTF-8: surrogates not allowed" for EVERY invalid UTF-8
    body, so the `"surrogate" in str(exc)` test sends all of them to json.loads(bytes), which
    guesses UTF-16/UTF-32 and decodes with surrogatepass. JSON on the wire is UTF-8 (RFC 8259
    8.1); before 12b1c73 each of these was a 400 invalid_json."""
    with pytest.raises(ApiError) as info:
        parse_json(body)
    assert info.value.code == "invalid_json"


def test_parse_json_lone_surrogate_escape_still_becomes_ufffd() -> None:
    # the intended behaviour of 12b1c73, which a fix must keep
    assert parse_json(b'{"a": "cut \\ud83d here"}') == {"a": "cut \ufffd here"}


# -- c0e2a43 config: the duplicate-key loader ---------------------------------------------


# -- 420c0a3 httpx: _read_within ---------------------------------------------------------
async def _post_chunked_past_limit(total: int) -> bytes:
    """A plain (not compressed) chunked body of ``total`` bytes still arriving when the
    handler reads it, against a route limit of 1000 bytes; the client's view of the answer."""

    from bridge.httpx import error_response, read_body

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, 1000)
        except ApiError as exc:
            return error_response(exc)
        return web.Response(text=str(len(body)))

    app = web.Application(client_max_size=8 * 1024 * 1024)  # as bridge.app sets it (at least 8 MB)
    app.router.add_post("/", handler)
    runner, port = await _serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"258\r\n" + b"a" * 600 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is now reading a body still arriving
        sent = 600
        while sent < total:
            writer.write(b"3e8\r\n" + b"b" * 1000 + b"\r\n")
            sent += 1000
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await runner.cleanup()


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` served on a free loopback port: its runner (to clean up) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def test_a_plain_chunked_body_past_the_limit_gets_a_413_the_client_can_read() -> None:
    """Before 420c0a3 a plain body past the route's limit (under client_max_size) was read
    and answered 413 on a kept-alive connection. Now _PastLimit abandons it (feed_eof +
    Connection: close) whatever its encoding: aiohttp skips its lingering drain, the socket
    closes with the client's bytes unread, and the kernel's RST destroys the 413: the client
    sees ECONNRESET, which Segment's SDKs retry, where a 413 is final."""
    try:
        answer = await _post_chunked_past_limit(200_000)
    except ConnectionResetError as exc:  # what HEAD gives
        pytest.fail(f"the client got no answer: {exc!r}")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]


def test_parse_json_skips_a_leading_utf8_bom() -> None:
    assert parse_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    assert parse_json(b'\xef\xbb\xbf{"a": "cut \\ud83d"}') == {"a": "cut \ufffd"}
    for bad in (b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf{}"):
        with pytest.raises(ApiError) as info:
            parse_json(bad)
        assert info.value.code == "invalid_json"


def test_parse_json_marks_numbers_past_a_double_only_when_asked() -> None:
    body = b'{"a": [1, 1e400], "b": -1e999, "c": 18446744073709551616, "d": 2.5}'
    with pytest.raises(ApiError) as info:
        parse_json(body)  # the default: orjson's 400
    assert info.value.code == "invalid_json"
    marked: list[OutOfRange] = []
    data = parse_json(body, out_of_range=marked)
    assert [m.text for m in marked] == ["1e400", "-1e999"]
    assert data["a"][1] is marked[0] and data["b"] is marked[1]
    assert (data["c"], data["d"]) == (orjson.loads(b"18446744073709551616"), 2.5)
    assert holds_out_of_range(data["a"]) is marked[0] and holds_out_of_range({"c": data["c"]}) is None
    # A lone surrogate beside a number past a double: orjson's 400 without the list (the
    # lenient reader made it null before), both read with it.
    body = b'{"a": "cut \\ud83d", "b": 1e400}'
    with pytest.raises(ApiError):
        parse_json(body)
    marked = []
    assert parse_json(body, out_of_range=marked) == {"a": "cut \ufffd", "b": marked[0]}


# -- httpx: a body that arrived whole is taken from aiohttp's buffer ----------------------
async def _post_whole(body: bytes, headers: bytes, *, ceiling: int, limit: int) -> bytes:
    """``body`` sent with its headers in one write (so it has arrived whole when the handler
    reads it) to a route of ``limit`` bytes on an app whose client_max_size is ``ceiling``;
    the raw answer. The handler answers the body's length and the number of chunks left."""

    from bridge.httpx import error_response, read_body

    async def handler(request: web.Request) -> web.Response:
        try:
            got = await read_body(request, limit)
        except ApiError as exc:
            return error_response(exc)
        return web.Response(text=f"{len(got)} {got[:4]!r} eof={request.content.is_eof()}")

    app = web.Application(client_max_size=ceiling)
    app.router.add_post("/", handler)
    runner, port = await _serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await runner.cleanup()


async def test_a_body_that_arrived_whole_is_read_whole() -> None:
    answer = await _post_whole(b"abcd" + b"x" * 5000, b"", ceiling=8 * 1024 * 1024, limit=10_000)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.endswith(b"5004 b'abcd' eof=True"), answer[-80:]


async def test_a_compressed_body_that_arrived_whole_past_the_ceiling_gets_a_413_and_closes() -> None:
    """As ``request.read()`` refused it: past the app's client_max_size the body may be a
    bomb, so the answer ends the connection (the route's own limit is not reached here)."""
    import gzip

    bomb = gzip.compress(b"\0" * 50_000)
    answer = await _post_whole(bomb, b"Content-Encoding: gzip\r\n", ceiling=10_000, limit=100_000)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head, head
    assert orjson.loads(body)["code"] == "payload_too_large"
