"""The shared HTTP path: every failure becomes a Response, never an exception."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import socket
import time

import pytest
from aiohttp import web

from bridge.destinations import http
from bridge.destinations.base import Response
from bridge.testing.standins import MoEngageStandIn, Planned
from tests.destinations.keepalive import StaleKeepAliveProxy


def test_basic_auth_header_encodes_user_colon_password():
    value = http.basic_auth("WS1", "k:ey")
    scheme, token = value.split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == "WS1:k:ey"
    assert http.basic_auth("writekey", "") == "Basic " + base64.b64encode(b"writekey:").decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), (" 7 ", 7.0), ("1.5", 1.5), ("-3", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_retry_after_seconds(value, expected):
    assert http.parse_retry_after(value) == expected


def test_retry_after_http_date_is_seconds_from_now():
    now = 1_800_000_000.0
    future = email.utils.formatdate(now + 90, usegmt=True)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert http.parse_retry_after(future, now=now) == pytest.approx(90.0)
    assert http.parse_retry_after(past, now=now) == 0.0
    assert http.parse_retry_after("Wed, 99 Foo 2026 25:61:00 GMT", now=now) is None


@pytest.fixture
async def upstream(aiohttp_server):
    standin = MoEngageStandIn("WS1", "key")
    server = await aiohttp_server(standin.app())
    return standin, str(server.make_url("/v1/event/WS1"))


async def test_post_reports_status_body_and_retry_after_seconds(upstream):
    standin, url = upstream
    standin.plan(Planned(429, headers={"Retry-After": "17"}))
    async with http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {"Content-Type": "application/json"}, 5.0)
    assert response.status == 429
    assert response.retry_after == 17.0
    assert response.error is None
    assert '"RateLimitError"' in response.body


async def test_post_parses_retry_after_http_date(upstream):
    standin, url = upstream
    standin.plan(Planned(503, headers={"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)}))
    async with http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {}, 5.0)
    assert response.status == 503
    assert response.retry_after is not None
    assert 50.0 <= response.retry_after <= 61.0


async def test_post_timeout_is_reported_not_raised(upstream):
    standin, url = upstream
    standin.plan(Planned(200, delay=3.0))
    async with http.create_session(5.0) as session:
        started = time.monotonic()
        response = await http.post(session, url, b"{}", {}, 0.3)
    assert response == Response(0, error="timeout")
    assert time.monotonic() - started < 2.5


async def test_post_hang_is_a_timeout(upstream):
    standin, url = upstream
    standin.plan(Planned(hang=True))
    async with http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {}, 0.3)
    assert response.status == 0
    assert response.error == "timeout"
    standin.stop()


async def test_post_connection_reset_is_a_connection_error(upstream):
    standin, url = upstream
    standin.plan(Planned(reset=True))
    async with http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {}, 5.0)
    assert response.status == 0
    assert response.error is not None
    assert response.error.startswith("connection_error: ")
    assert standin.received == 1


async def test_post_connection_refused_is_a_connection_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with http.create_session(5.0) as session:
        response = await http.post(session, f"http://127.0.0.1:{port}/x", b"{}", {}, 2.0)
    assert response.status == 0
    assert response.error is not None
    assert response.error.startswith("connection_error: ")


async def test_post_on_a_closed_session_or_bad_url_does_not_raise():
    session = http.create_session(1.0)
    await session.close()
    closed = await http.post(session, "http://127.0.0.1:9/x", b"{}", {}, 1.0)
    assert closed.status == 0
    assert closed.error is not None
    assert closed.error.startswith("connection_error: ")
    async with http.create_session(1.0) as fresh:
        bad = await http.post(fresh, "not a url", b"{}", {}, 1.0)
    assert bad.status == 0
    assert bad.error is not None
    assert bad.error.startswith("connection_error: ")


async def test_post_keeps_only_the_first_4_kb_of_a_large_body(aiohttp_server):
    async def big(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="x" * 100_000)

    app = web.Application()
    app.router.add_post("/", big)
    server = await aiohttp_server(app)
    async with http.create_session(5.0) as session:
        response = await http.post(session, str(server.make_url("/")), b"", {}, 5.0)
    assert response.status == 500
    assert response.body == "x" * http.BODY_KEEP_BYTES


async def test_post_does_not_follow_redirects(aiohttp_server):
    async def moved(_request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    app = web.Application()
    app.router.add_post("/", moved)
    server = await aiohttp_server(app)
    async with http.create_session(5.0) as session:
        response = await http.post(session, str(server.make_url("/")), b"{}", {}, 5.0)
    assert response.status == 307


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api-01.moengage.com", True),
        ("http://127.0.0.1:8080/proxy", True),
        ("api.segment.io", False),
        ("ftp://x", False),
        ("https://x/?a=1", False),
    ],
)
def test_check_url(url, ok):
    assert (http.check_url(url) is None) is ok


class RawAnswer:
    """A TCP server that reads one request and answers with ``raw``, then resets the
    connection (``then="reset"``) or leaves it hanging (``then="hang"``): an answer whose
    status line arrives but whose body does not, as a proxy or a dying upstream sends."""

    def __init__(self, raw: bytes, then: str) -> None:
        self.raw, self.then = raw, then
        self.requests = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/x"

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        self.requests += 1
        writer.write(self.raw)
        await writer.drain()
        if self.then == "reset":
            writer.transport.abort()
        else:
            await asyncio.sleep(3600)


@pytest.mark.parametrize("then", ["reset", "hang"])
@pytest.mark.parametrize("status", [200, 413, 400])
async def test_a_status_that_arrived_decides_even_when_its_body_does_not(status, then):
    # The upstream answered: a 200 was processed (retrying would send it twice), a 413
    # must split, a 400 bisect. Losing the status to the body's failure did all three wrong.
    raw = b'HTTP/1.1 %d X\r\nContent-Length: 1000\r\n\r\n{"status":' % status
    async with RawAnswer(raw, then) as url, http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {}, 0.5)
    assert response.status == status, response
    assert response.error is None
    assert response.body.startswith("(the response body could not be read: "), response.body


async def test_a_redirect_says_where_it_pointed():
    raw = b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://elsewhere.example/v1/x\r\nContent-Length: 0\r\n\r\n"
    async with RawAnswer(raw, "reset") as url, http.create_session(5.0) as session:
        response = await http.post(session, url, b"{}", {}, 2.0)
    assert response.status == 308
    assert response.body.startswith("Location: https://elsewhere.example/v1/x"), response.body


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),  # seconds to wait
        ("1700000090", 90.0),  # epoch seconds
        ("1700000090000", 90.0),  # epoch milliseconds
        ("1699999990", 0.0),  # already past
        (None, None),
        ("soon", None),
        ("-5", None),
        ("nan", None),
    ],
)
def test_x_ratelimit_reset_is_read_as_a_wait_an_epoch_or_epoch_millis(value, expected):
    assert http.parse_rate_limit_reset(value, now=1_700_000_000.0) == (
        pytest.approx(expected) if expected is not None else None
    )


AUTH = {"Authorization": http.basic_auth("WS1", "key"), "MOE-APPKEY": "WS1", "Content-Type": "application/json"}
EVENT = b'{"type":"event","customer_id":"u1","actions":[{"action":"Opened","attributes":{}}]}'


@pytest.fixture
async def standin_port(aiohttp_server):
    standin = MoEngageStandIn("WS1", "key")
    server = await aiohttp_server(standin.app())
    return standin, server.port


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_a_request_on_a_stale_pooled_connection_is_sent_again_at_once(standin_port, drop):
    # The upstream closed the kept-alive connection as the second request was written:
    # nothing reached it, so the request goes again on a new connection, in this one call.
    standin, port = standin_port
    proxy = StaleKeepAliveProxy(port, drop=drop)
    url = await proxy.start() + "/v1/event/WS1"
    try:
        async with http.create_session(5.0) as session:
            first = await http.post(session, url, EVENT, AUTH, 5.0)
            second = await http.post(session, url, EVENT, AUTH, 5.0)
    finally:
        await proxy.close()
    assert first.status == 200
    assert second.status == 200, second.error
    assert proxy.dropped == 1 and proxy.connections == 2
    assert standin.received == 2


async def test_a_stale_connection_is_retried_once_only(standin_port):
    standin, port = standin_port
    proxy = StaleKeepAliveProxy(port)
    url = await proxy.start() + "/v1/event/WS1"
    try:
        async with http.create_session(5.0) as session:
            assert (await http.post(session, url, EVENT, AUTH, 5.0)).status == 200
            standin.plan(Planned(reset=True))  # the resend, on its new connection, fails too
            second = await http.post(session, url, EVENT, AUTH, 5.0)
    finally:
        await proxy.close()
    assert second.status == 0
    assert second.error is not None and second.error.startswith("connection_error: ")
    assert proxy.dropped == 1 and proxy.connections == 2
    assert standin.received == 2  # the first request and the one resend, nothing more


async def test_a_connection_closed_mid_answer_is_not_sent_again(standin_port):
    # Part of a status line came back: the upstream was processing the request, so a
    # resend could deliver it twice. It is a failed attempt, as before.
    standin, port = standin_port
    proxy = StaleKeepAliveProxy(port, drop="partial")
    url = await proxy.start() + "/v1/event/WS1"
    try:
        async with http.create_session(5.0) as session:
            assert (await http.post(session, url, EVENT, AUTH, 5.0)).status == 200
            second = await http.post(session, url, EVENT, AUTH, 5.0)
    finally:
        await proxy.close()
    assert second.status == 0
    assert second.error is not None and second.error.startswith("connection_error: ")
    assert proxy.dropped == 1 and proxy.connections == 1
    assert standin.received == 2


async def test_a_timeout_on_a_reused_connection_is_not_sent_again(upstream):
    standin, url = upstream
    async with http.create_session(5.0) as session:
        assert (await http.post(session, url, EVENT, AUTH, 5.0)).status == 200
        standin.plan(Planned(hang=True))
        second = await http.post(session, url, EVENT, AUTH, 0.3)
    standin.stop()
    assert second == Response(0, error="timeout")
    assert standin.received == 2
