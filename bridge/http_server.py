"""The rejections aiohttp makes before any route sees a request, as JSON like every other.

aiohttp answers some requests itself: one it cannot parse (a malformed request line or
header, a header past its size limit, a Content-Length that is not a number), one whose
Content-Encoding it cannot decode (``br`` or ``zstd`` without their libraries), and an
``Expect`` other than ``100-continue``. Out of the box those answers are text/plain, so a
client that reads ``{code, message}`` from every 4xx (as the Segment SDKs log it) got a
body it could not read. Here they are the bridge's JSON errors, with the same status
aiohttp chose, except an encoding aiohttp cannot decode: 415 ``unsupported_encoding``,
as the bridge answers every other encoding it does not take.

aiohttp builds the protocol object that makes those answers (``RequestHandler``) in its
``Server``, which an ``AppRunner`` makes; ``BridgeRunner`` makes the same server and has
it build ``JsonErrorHandler`` instead. aiohttp's logging of them is unchanged (and turned
into one info line by bridge.observability.logging).
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from bridge.httpx import ApiError, error_response
from bridge.observability.redaction import redact_text

MAX_DETAIL = 200  # characters of aiohttp's own reason kept in the message


def server_error(status: int, exc: BaseException | None) -> ApiError:
    """What to answer for a request aiohttp refused with ``status`` because of ``exc``."""
    if isinstance(exc, ContentEncodingError):
        return ApiError(
            415, "unsupported_encoding", "Content-Encoding must be gzip, deflate or identity; this one is not supported"
        )
    if isinstance(exc, HttpProcessingError):
        # aiohttp's reason, first line only: later lines repeat the bytes it choked on.
        detail = redact_text((str(exc.message).strip().splitlines() or [""])[0][:MAX_DETAIL])
        if isinstance(exc, LineTooLong):
            return ApiError(status, "header_too_large", f"the request line or a header is too long: {detail}")
        return ApiError(status, "malformed_request", f"the request is not valid HTTP/1.1: {detail}")
    if status < 500:
        return ApiError(status, "http_error", "the request could not be handled")
    return ApiError(status, "internal_error", "the bridge failed to handle this request")


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol object, answering its own rejections as JSON {code, message}."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own first: it logs the error, and refuses (ConnectionError) when part
        # of a response has already gone out. Its text/plain answer is then replaced.
        super().handle_error(request, status, exc, message)
        response = error_response(server_error(status, exc))
        response.force_close()  # the stream may be out of step with the requests in it
        return response


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


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's handling of ``Expect`` (100-continue goes ahead), with a JSON 417 for any
    other expectation instead of its text/plain one."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        return error_response(
            ApiError(417, "expectation_failed", f"only Expect: 100-continue is supported, got {expect[:100]!r}")
        )
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The 100 is not part of the response: aiohttp's own handler resets this too.
        request.writer.output_size = 0
    return None
