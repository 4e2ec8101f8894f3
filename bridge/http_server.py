"""The rejections aiohttp makes before any route sees a request, as JSON like every other.

aiohttp answers some requests itself: one it cannot parse (a malformed request line or
header, a header past its size limit, a Content-Length that is not a number), and one
whose Content-Encoding it cannot decode (``br`` or ``zstd`` without their libraries).
Out of the box those answers are text/plain, so a client that reads ``{code, message}``
from every 4xx (as the Segment SDKs log it) got a body it could not read. Here they are
the bridge's JSON errors, with the status aiohttp chose, except an encoding aiohttp cannot
decode: 415 ``unsupported_encoding``, as the bridge answers every other encoding it does
not take. (An ``Expect`` other than 100-continue is the routes' own: httpx.expect_handler;
but for a request no route takes, one aiohttp cannot quote back: ``JsonErrorHandler``.)

The messages are fixed texts, never aiohttp's: its reasons quote the bytes it choked on,
and those may be a header's value, such as an oversized or mistyped Authorization.

aiohttp builds the protocol object that makes those answers (``RequestHandler``) in its
``Server``, which an ``AppRunner`` makes; ``BridgeRunner`` makes the same server and has
it build ``JsonErrorHandler`` instead. aiohttp's logging of them is unchanged (and turned
into one info line by bridge.observability.logging).
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import MatchInfoError

from bridge.destinations.base import ConfigError
from bridge.httpx import ApiError, error_response


def server_error(status: int, exc: BaseException | None) -> ApiError:
    """What to answer for a request aiohttp refused with ``status`` because of ``exc``."""
    if isinstance(exc, ContentEncodingError):
        return ApiError(
            415, "unsupported_encoding", "Content-Encoding must be gzip, deflate or identity; this one is not supported"
        )
    if isinstance(exc, UnreadableExpectation):
        return ApiError(417, "expectation_failed", "only Expect: 100-continue is supported")
    if isinstance(exc, LineTooLong):
        return ApiError(status, "header_too_large", "the request line or a header is longer than the server accepts")
    if isinstance(exc, InvalidHeader):
        return ApiError(status, "malformed_request", "a header of the request is malformed (its name or its value)")
    if isinstance(exc, BadStatusLine):
        return ApiError(status, "malformed_request", "the request line is not an HTTP/1.1 request line")
    if isinstance(exc, TransferEncodingError | ContentLengthError):
        return ApiError(status, "malformed_request", "the body's Content-Length or Transfer-Encoding is not valid")
    if isinstance(exc, HttpProcessingError):
        return ApiError(status, "malformed_request", "the request is not valid HTTP/1.1")
    if status < 500:
        return ApiError(status, "http_error", "the request could not be handled")
    return ApiError(status, "internal_error", "the bridge failed to handle this request")


class UnreadableExpectation(HttpProcessingError):
    """An ``Expect`` that aiohttp's own handler failed on (see ``JsonErrorHandler``)."""

    def __init__(self) -> None:
        super().__init__(code=417, message="the Expect header is not UTF-8")


def _unroutable(request: web.BaseRequest) -> bool:
    """Whether ``request`` matched no route, not even the catch-all: ``CONNECT`` (its target
    a host and port) and ``OPTIONS *`` name no path for one to match."""
    return isinstance(getattr(request, "_match_info", None), MatchInfoError)


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol object, answering its own rejections as JSON {code, message}."""

    __slots__ = ("_stopping",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = False  # set by close() and shutdown(): see data_received

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500 and hdrs.EXPECT in request.headers and _unroutable(request):
            # No handler of ours runs for such a request, its Expect handler neither:
            # aiohttp's quotes the value in its 417 and fails (UnicodeEncodeError) on bytes
            # that are not UTF-8. A client's bad header: the 417 every route answers, and
            # an info line (bad_http_request) rather than a traceback in the error log.
            status, exc = 417, UnreadableExpectation()
        # aiohttp's own first: it logs the error, and refuses (ConnectionError) when part
        # of a response has already gone out. Its text/plain answer is then replaced.
        super().handle_error(request, status, exc, message)
        response = error_response(server_error(status, exc))
        response.force_close()  # the stream may be out of step with the requests in it
        return response

    # A stop (SIGTERM) calls close() on every connection, and shutdown() on those still
    # open: both mark the connection as stopping, so that data_received, which runs for
    # every request, asks one flag of its own rather than aiohttp's private ones.
    def close(self) -> None:
        self._stopping = True
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        self._stopping = True
        await super().shutdown(timeout)

    def data_received(self, data: bytes) -> None:
        """Once a stop began (aiohttp's ``close`` and ``shutdown`` set its flags), aiohttp
        drops every byte that arrives, the rest of the body of the request being handled
        too: that request then waited out the whole shutdown timeout, holding up the
        deliveries' drain behind it, and its client got a closed connection instead of an
        answer. The body of a request in hand is still read, so it is answered (and its
        events stored) as the stop promises; the connection closes after it all the same."""
        if not self._stopping:
            _data_received(self, data)
            return
        # aiohttp's private flags, read with a default: a release renaming any of them
        # falls back to its own behaviour rather than failing the read.
        flags = getattr(self, "_close", None), getattr(self, "_force_close", None)
        if True in flags and None not in flags and getattr(self, "_request_in_progress", False):
            self._close = self._force_close = False
            try:
                _data_received(self, data)
            finally:
                self._close, self._force_close = bool(flags[0]), bool(flags[1])
            return
        _data_received(self, data)


# aiohttp's own, called without super()'s lookup (it runs for every request).
_data_received = RequestHandler.data_received


class JsonErrorServer(web.Server):
    """aiohttp's ``Server``, building ``JsonErrorHandler`` for each connection."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class BridgeRunner(web.AppRunner):
    """An ``AppRunner`` whose server answers aiohttp's own rejections as JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The server the app configured (handler, request factory, handler arguments),
        # only with the connections' protocol class changed: JsonErrorServer adds no state.
        server.__class__ = JsonErrorServer
        return server


async def start_site(site: web.TCPSite, where: str) -> None:
    """Start listening. An address in use or not this machine's is the operator's to fix
    (``where`` names the setting): a one-line config error, not a traceback."""
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot listen on {site.name}: {exc.strerror or exc}") from exc
