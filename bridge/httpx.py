"""HTTP plumbing shared by every inbound route: JSON errors, bounded bodies, auth helpers.

Every rejection is a JSON ``{"code", "message"}`` with a 4xx status; a 5xx is only ever
the bridge's own fault, never an answer to bad input. Backpressure (a full store) is a 429
with Retry-After, as Segment's Tracking API answers (sources/base.py: BACKPRESSURE), and a
503 with Retry-After on /segment/webhook, whose sender retries a 5xx only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http import HttpVersion11
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

log = structlog.get_logger("bridge.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long one request body may take to arrive (server.body_timeout); set on the app.
BODY_TIMEOUT = web.AppKey("body_timeout", float)
DEFAULT_BODY_TIMEOUT = 60.0


class ApiError(Exception):
    """An answer to bad or unacceptable input: rendered as JSON {code, message, ...}."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(err: ApiError) -> web.Response:
    response = json_response({"code": err.code, "message": err.message, **err.extra}, err.status, err.headers)
    if err.headers.get("Connection") == "close":
        response.force_close()  # the header alone does not stop aiohttp keeping the connection
    return response


_HTTP_CODES = {
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "method not allowed on this endpoint"),
    413: ("payload_too_large", "request body too large"),
}


# Called once per request with its route's label and the final status (e.g. to count it).
StatusObserver = Callable[[str, int], None]


def bearer_only(handler: Handler, token: str, what: str, realm: str) -> Handler:
    """``handler`` for requests with ``Authorization: Bearer <token>`` (compared in constant
    time); others get 401 naming ``what`` needs it, with the challenge a 401 must carry
    (RFC 9110 15.5.2) for ``realm``."""
    challenge = {"WWW-Authenticate": f'Bearer realm="{realm}"'}

    async def check(request: web.Request) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not same_secret(given.strip(), token):
            raise ApiError(401, "unauthorized", f"{what} needs Authorization: Bearer <token>", headers=challenge)
        return await handler(request)

    return check


def json_errors(handler: Handler, route: str, observe: StatusObserver | None = None, *, cors: bool = False) -> Handler:
    """``handler`` with every error rendered as JSON {code, message}, and ``observe`` told
    each request's final status under ``route`` (the route's template, never the raw URL).
    With ``cors``, a browser's request (one with an Origin) may read every answer, errors
    included (see ``allow_browsers``).

    A wrapper per route rather than an aiohttp middleware: see bridge/routing.py."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as err:
            _log_rejection(route, request, err)
            response = error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                if observe is not None:
                    observe(route, exc.status)
                raise
            code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
            mapped = ApiError(exc.status, code, message, headers=_keep_headers(exc))
            _log_rejection(route, request, mapped)
            response = error_response(mapped)
        except Exception:
            # A bug of ours: say so without leaking internals; the log has the traceback.
            log.exception("unhandled_error", route=route)
            response = error_response(ApiError(500, "internal_error", "the bridge failed to handle this request"))
        if cors and hdrs.ORIGIN in request.headers:
            allow_browsers(response)
        if observe is not None:
            observe(route, response.status)
        return response

    return answer


# Browsers (analytics.js) post to the Tracking API from any site. The write key is in the
# body, never in a cookie, so any origin may call, and "*" (no credentials) is enough.
# An answer the page cannot read is, to analytics.js, a network error: it would resend
# the same events, a 400 included, until its retries ran out.
CORS_EXPOSED = "Retry-After"
# How long a browser may reuse a preflight's answer (Chromium caps it at 2 hours).
CORS_MAX_AGE = "7200"
CORS_DEFAULT_HEADERS = "Content-Type, Authorization"
_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_MAX_REQUESTED_HEADERS = 1024


def allow_browsers(response: web.StreamResponse) -> None:
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = CORS_EXPOSED


async def cors_preflight(request: web.Request) -> web.StreamResponse:
    """The answer to a browser's preflight (OPTIONS) for a POST route: any origin may post,
    with the headers it asks for (e.g. analytics.js's custom batch headers). It carries
    no credentials and stores nothing, so, alone of the routes, it is not authenticated."""
    requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").strip()
    if not (len(requested) <= _MAX_REQUESTED_HEADERS and _HEADER_NAMES.fullmatch(requested)):
        requested = CORS_DEFAULT_HEADERS
    response = web.Response(
        status=204,
        headers={
            hdrs.ALLOW: "POST, OPTIONS",
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: "POST, OPTIONS",
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: requested,
            hdrs.ACCESS_CONTROL_MAX_AGE: CORS_MAX_AGE,
        },
    )
    allow_browsers(response)
    return response


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


# Set on a request whose client waits for "100 Continue" before it sends the body.
_CONTINUE_PENDING = web.RequestKey("continue_pending", bool)


def expect_handler(route: str, observe: StatusObserver | None = None, *, cors: bool = False) -> ExpectHandler:
    """A route's handling of ``Expect``, which aiohttp runs before the route's handler.

    100-continue is answered when the handler first reads the body (``read_body``), not
    here as aiohttp does: a request refused on its headers alone (a wrong key, a body
    declared too large) then gets its answer at once, and its body is never sent. Any
    other expectation gets a JSON 417, logged and counted under ``route`` like every other
    rejection, where aiohttp answered text/plain that nothing logged or counted."""

    async def check(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None  # HTTP/1.0 has no 100 Continue: aiohttp ignores Expect there too
        expect = request.headers.get(hdrs.EXPECT, "")
        if expect.lower() == "100-continue":
            request[_CONTINUE_PENDING] = True
            return None
        err = ApiError(417, "expectation_failed", f"only Expect: 100-continue is supported, got {expect[:100]!r}")
        _log_rejection(route, request, err)
        if observe is not None:
            observe(route, err.status)
        response = error_response(err)
        if cors and hdrs.ORIGIN in request.headers:
            allow_browsers(response)
        return response

    return check


def _log_rejection(route: str, request: web.Request, err: ApiError) -> None:
    # One line per rejected request (not per event); messages never carry credentials.
    log.info(
        "request_rejected",
        route=route,
        status=err.status,
        code=err.code,
        reason=err.message,
        remote=request.remote,
    )


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read the (already gzip-decoded) body, refusing more than ``limit`` bytes, or a body
    that takes longer than the app's BODY_TIMEOUT to arrive (a client trickling bytes would
    otherwise hold its connection and our buffer for ever).

    A body still arriving is read only up to ``limit`` (decoded bytes, so a decompression
    bomb stops there too) and then refused: a compressed one closing the connection, a
    plain one left for aiohttp to discard, so the client reads the 413. One that arrived with
    the headers is read whole by aiohttp, which stops at the app's client_max_size, and
    then checked against ``limit``.
    """
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None:  # (most requests have none: the checks cost only those that do)
        # Every header of the name: aiohttp decodes by the last, so "gzip" then "x-custom"
        # must not pass as gzip. Two or more are refused, as one list of codings is.
        encoding = ", ".join(request.headers.getall("Content-Encoding")).strip().lower()
        if encoding not in _ENCODINGS:
            # aiohttp inflates what it knows and passes any other value through as if it
            # were identity: refuse it rather than guess.
            raise ApiError(
                415,
                "unsupported_encoding",
                f"Content-Encoding {encoding[:40]!r} is not supported; send one of: {_ACCEPTED}",
            )
    length = request.content_length
    if length is not None and length > limit and encoding in _IDENTITY:
        raise _too_large(limit)
    if request.get(_CONTINUE_PENDING):
        # The client waits for this before it sends the body (see expect_handler).
        request[_CONTINUE_PENDING] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim answer is not part of the response: aiohttp's handler resets this too.
        request.writer.output_size = 0
    timeout = 0.0
    try:
        content = request.content
        if content.is_eof():
            # Usually the whole body came with the headers: no timer (one costs ~5 µs).
            body = _arrived(request, content)
        else:
            timeout = request.app.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT)
            async with asyncio.timeout(timeout):
                body = await _read_within(request, limit)
    except _PastLimit:
        # A compressed body's rest is not read (it may be a bomb): the connection ends with
        # the answer. A plain one is left to aiohttp, which discards the rest (for at most
        # its lingering time) so the client reads the 413 rather than a reset.
        err = _too_large(limit)
        raise (err if encoding in _IDENTITY else _abandon_body(request, err)) from None
    except web.HTTPRequestEntityTooLarge:
        # A compressed body past the ceiling may be a bomb: do not let aiohttp go on
        # inflating the rest after we answer. A plain one is drained, cheaply, so the client
        # reads the 413 rather than a reset.
        err = _too_large(limit)
        raise (err if encoding in _IDENTITY else _abandon_body(request, err)) from None
    except TimeoutError:
        raise _abandon_body(
            request, ApiError(408, "request_timeout", f"the request body did not arrive within {timeout:g} s")
        ) from None
    except ConnectionError:
        # The client went away mid-body: nobody reads this answer, but the log should say
        # what happened rather than blame the encoding.
        raise _abandon_body(
            request, ApiError(400, "incomplete_body", "the connection closed before the body arrived")
        ) from None
    except (ValueError, OSError, RequestPayloadError) as exc:
        # aiohttp raises while inflating a corrupt gzip stream.
        raise _abandon_body(request, ApiError(400, "invalid_encoding", f"cannot decode request body: {exc}")) from None
    if len(body) > limit:
        raise _too_large(limit)
    return body


class _PastLimit(Exception):
    pass


def _arrived(request: web.Request, content: StreamReader) -> bytes:
    """A body that has arrived whole (``content.is_eof()``), taken from aiohttp's buffer
    as it is: usually one chunk, handed over without a copy. ``request.read()`` would copy
    it twice (into a bytearray, then into bytes) and go round its read loop and the
    stream's twice: about 150 interpreter steps a request, near 4% of a single call's.
    The app's ceiling (client_max_size) is kept as ``request.read()`` keeps it."""
    body = content.read_nowait()
    ceiling = request.client_max_size
    if ceiling and len(body) > ceiling:
        raise web.HTTPRequestEntityTooLarge(max_size=ceiling, actual_size=len(body))
    return body


async def _read_within(request: web.Request, limit: int) -> bytes:
    """The body as it arrives, given up as soon as it passes ``limit``: a chunked or
    compressed body has no length to check first, and read whole (as ``request.read``
    does) it would be held up to the app's client_max_size, and waited for to its end,
    only to be refused."""
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise _PastLimit
        chunks.append(chunk)
    return b"".join(chunks)


_IDENTITY = (None, "", "identity")
# What aiohttp inflates here: br and zstd only when their libraries are installed.
_ENCODINGS = frozenset(
    {"", "identity", "gzip", "deflate", *(["br"] if HAS_BROTLI else []), *(["zstd"] if HAS_ZSTD else [])}
)
_ACCEPTED = ", ".join(sorted(_ENCODINGS - {""}))


def _abandon_body(request: web.Request, err: ApiError) -> ApiError:
    """The rest of the body will not be read: mark it ended, so aiohttp does not try to
    drain it after we answer (and log the same error again as unhandled, or wait on the
    same slow client), and close the connection, whose framing is lost."""
    request.content.feed_eof()
    err.headers["Connection"] = "close"
    return err


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")


# Objects and arrays a batch body may hold, per event it may carry, before it is parsed.
CONTAINERS_PER_EVENT = 200


def check_containers(body: bytes, max_events: int) -> None:
    """Refuse, before parsing, a body with more JSON objects and arrays than ``max_events``
    events could hold. Parsed, a body of nested empty containers takes some 35 times its
    size: 16 KB of gzip, 16 MiB inflated, became 500 MB. Brackets inside strings count too,
    which only ever overestimates; a real batch holds a few dozen an event."""
    limit = max_events * CONTAINERS_PER_EVENT
    found = body.count(b"{") + body.count(b"[")
    if found > limit:
        raise ApiError(
            400,
            "too_many_values",
            f"the body holds {found} JSON objects and arrays; at most {limit}"
            f" ({CONTAINERS_PER_EVENT} for each of the {max_events} events a request may carry)",
        )


# Many HTTP stacks (.NET's, PowerShell's, Java's with some writers) start a UTF-8 body with
# a byte order mark, which orjson refuses.
UTF8_BOM = b"\xef\xbb\xbf"


class OutOfRange:
    """A number JSON allows but a double cannot hold (``1e400``), in place of the value when
    ``parse_json`` is given an ``out_of_range`` list: the caller refuses only what holds one."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"OutOfRange({self.text[:40]!r})"


def parse_json(body: bytes, *, out_of_range: list[OutOfRange] | None = None) -> Any:
    """The body as JSON, or a 400 ``invalid_json``. A leading UTF-8 BOM is skipped.

    With ``out_of_range`` (a list the caller checks afterwards), a number orjson refuses
    as infinite is read as an ``OutOfRange`` appended there, so one odd value need not cost
    the request's other events; the whole body is still parsed strictly, so a body that is
    not JSON is a 400 as before. Without it such a body is a 400, as orjson answers."""
    if body[:3] == UTF8_BOM:
        body = body[3:]
    if not body:
        raise ApiError(400, "invalid_json", "request body is empty; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = str(exc)
    if "surrogate" in error or (out_of_range is not None and "infinity" in error):
        # A lone \uD83D escape (an emoji cut in half, a client's bad decoding): JSON as the
        # grammar goes, which orjson refuses. Refusing it refused the request's other events
        # too, for one character: read it, and make the half U+FFFD. Or a number too large.
        try:
            return _parse_leniently(body, out_of_range)
        except (ValueError, RecursionError):
            pass
    raise ApiError(400, "invalid_json", f"invalid JSON: {error}")


# orjson reads an integer in this range as an int, and a larger one as a float.
_INT_RANGE = range(-(2**63), 2**64)


def _parse_leniently(body: bytes, out_of_range: list[OutOfRange] | None) -> Any:
    """What orjson reads, read by json.loads: with lone surrogate escapes as U+FFFD and,
    into ``out_of_range`` when given, the numbers a double cannot hold."""

    def number(text: str) -> Any:
        value = float(text)
        if math.isfinite(value):
            return value
        if out_of_range is None:
            raise ValueError(f"number out of range: {text[:40]}")
        marked = OutOfRange(text)
        out_of_range.append(marked)
        return marked

    def integer(text: str) -> Any:
        # int() refuses more than 4300 digits; such a number is past a double too.
        if len(text) <= 21 and (value := int(text)) in _INT_RANGE:
            return value
        return number(text)

    # Decoded as UTF-8 first: orjson names "surrogates" for every body that is not UTF-8,
    # and json.loads(bytes) would read UTF-16 and UTF-32 (and encoded surrogates) where
    # JSON on the wire is UTF-8 only.
    text = body.decode("utf-8")
    value = json.loads(text, parse_constant=_no_constant, parse_float=number, parse_int=integer)
    return _without_lone_surrogates(value)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins the valid pairs


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads reads NaN and Infinity; orjson does not


def holds_out_of_range(value: Any) -> OutOfRange | None:
    """The first ``OutOfRange`` in ``value``, walked without recursion (a parsed value
    may be nested as deep as json.loads goes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is OutOfRange:
            return item
    return None


def _without_lone_surrogates(value: Any) -> Any:
    if type(value) is str:
        return _LONE_SURROGATE.sub("\ufffd", value)
    if type(value) is dict:
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if type(value) is list:
        return [_without_lone_surrogates(v) for v in value]
    return value


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(username, password) from a Basic Authorization header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), non-ASCII text, or not UTF-8 inside
        raise ApiError(401, "invalid_authorization", "malformed Basic authorization header") from None
    user, _, password = decoded.partition(":")
    return user, password


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison (through digests, so lengths do not leak either)."""
    # aiohttp decodes header bytes it cannot read as UTF-8 to lone surrogates: still a
    # (wrong) credential, never a crash.
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b) and bool(expected)


def secret_digest(value: str) -> bytes:
    """Key for looking a secret up in a dict without comparing the secret itself."""
    return hashlib.sha256(value.encode("utf-8")).digest()


def header_digest(value: str) -> bytes:
    """``secret_digest`` of a header as received: aiohttp decodes bytes it cannot read as
    UTF-8 to lone surrogates, which are still a (wrong) credential, never a crash."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
