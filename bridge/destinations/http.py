"""The one HTTP client path every destination posts through.

``post`` never raises for network or HTTP trouble: it turns everything into a
``Response`` so the delivery engine can apply one retry policy to all destinations.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler

from bridge import __version__
from bridge.destinations.base import Response
from bridge.observability.redaction import longest_form, redact_text

BODY_KEEP_BYTES = 4096
# Read past the kept part by this much and redact before cutting: a credential the
# upstream echoes across the cut would otherwise be kept in part, unrecognised.
SECRET_MARGIN = 1024
USER_AGENT = f"bridge/{__version__}"


class _TrackedConnection(ResponseHandler):
    """aiohttp's protocol for one connection, also noting how many requests it has carried
    and whether any byte came back for the current one: what tells a stale pooled
    connection apart from an upstream that failed while answering."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.requests = 0
        self.answered = False

    def set_response_params(self, **kwargs: Any) -> None:
        # aiohttp calls this once per request, in the task sending it, before writing it.
        self.requests += 1
        self.answered = False
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.connection = self
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if data:
            self.answered = True
        super().data_received(data)


class _Connector(aiohttp.TCPConnector):
    def __init__(self, *, limit: int, force_close: bool) -> None:
        super().__init__(limit=limit, force_close=force_close)
        # aiohttp builds every connection's protocol with this factory (not a public
        # hook: the stale-connection tests in tests/destinations/test_http.py fail if a
        # new aiohttp stops using it, and without it no request is ever retried).
        # (partial is invariant to mypy, though a _TrackedConnection is a ResponseHandler)
        self._factory = cast(
            "functools.partial[ResponseHandler]", functools.partial(_TrackedConnection, loop=self._loop)
        )


@dataclass(slots=True)
class _Attempt:
    """The connection one ``post`` attempt was written to, as its protocol noted it."""

    connection: _TrackedConnection | None = None

    @property
    def on_stale_connection(self) -> bool:
        """Sent on a reused keep-alive connection, and nothing at all came back on it."""
        conn = self.connection
        return conn is not None and conn.requests > 1 and not conn.answered


# Set by ``post`` around each attempt; read by the connection's protocol in the same task.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("bridge_http_attempt", default=None)
# Failures of a request that can be those of a connection the upstream closed while idle in
# the pool (no timeout: ServerTimeoutError is a TimeoutError, caught before these).
_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


# A destination's pooled connections. A request waiting in aiohttp's pool for one spends its
# timeout there: the delivery engine starts no more requests at once (DestinationWorker).
CONNECTIONS = 64


def create_session(timeout: float, *, connections: int = CONNECTIONS, fresh: bool = False) -> aiohttp.ClientSession:
    """A session for one destination: pooled keep-alive connections, no env proxies.
    ``fresh``: a new connection for every request, none kept."""
    return aiohttp.ClientSession(
        connector=_Connector(limit=connections, force_close=fresh),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
        raise_for_status=False,
    )


class LazySession:
    """A destination's own HTTP session (its isolation from other destinations), opened
    on first use or at start, closed at shutdown."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = create_session(self.timeout)
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        return await post(await self.open(), url, body, headers, self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def basic_auth(username: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP Basic auth."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None
    when absent or unparseable. Dates in the past give 0."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT even when the zone is missing
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def parse_rate_limit_reset(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from an ``X-RateLimit-Reset`` value, which Segment's 429 carries
    (with or instead of Retry-After): an epoch time, in milliseconds or seconds, or else a
    number of seconds to wait. None when absent or unreadable."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    current = time.time() if now is None else now
    if number >= 1e12:  # epoch milliseconds
        return max(0.0, number / 1000 - current)
    if number >= 1e9:  # epoch seconds
        return max(0.0, number - current)
    return number


def as_url(host_or_url: str) -> str:
    """``host_or_url`` as a URL: a bare host[:port][/path], as a Segment client's host
    setting is written, is read as https://host[:port][/path]."""
    return host_or_url if "://" in host_or_url else f"https://{host_or_url}"


def check_url(value: str) -> str | None:
    """Why ``value`` is not a usable http(s) base URL, or None when it is. The answer
    quotes ``value`` only when it holds no '@'."""
    if "@" in value:
        # The destination sends its own Authorization header; credentials in the URL would
        # clash with it on every request (and be shown wherever the URL is). Checked first,
        # on the text as written and without quoting it: in a mistyped URL ("htp://u:p@h",
        # "u:p@h", a password with a '/') urlsplit finds no user:password, and the message
        # quoting the value printed the password.
        return "must not contain user:password@ (credentials come from the destination's own keys)"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises for a port that is no number, or past 65535
    except ValueError as exc:  # an unclosed "[" of an IPv6 host, a port that is no number
        return f"is not a usable URL: {exc}: {value!r}"
    if any(c.isspace() or not c.isprintable() for c in value):
        # No request could be made to it: every delivery failed, where `bridge check` passed.
        return f"contains whitespace or a control character: {value!r}"
    if parts.scheme not in ("http", "https"):
        return f"must start with http:// or https://, got {value!r}"
    if not parts.netloc:
        return f"has no host: {value!r}"
    if parts.query or parts.fragment:
        return f"must not have a query or fragment: {value!r}"
    return None


def kept_text(raw: bytes, *, cut_short: bool) -> str:
    """What is kept of a response body read in part (``cut_short``) or whole: redacted, then
    cut to BODY_KEEP_BYTES. A body read in part may end in part of a secret, which redaction
    cannot recognise. That tail is dropped after redacting, not assumed to lie past the
    kept part: a long credential before it (a Bearer token, a base64 word) shrinks to its
    fingerprint and would pull the tail inside the kept part."""
    text = redact_text(raw.decode("utf-8", errors="replace"))
    if cut_short:
        # Redaction leaves a part of a secret it cannot recognise as it was, at the very end.
        text = text[: max(len(text) - longest_form(), 0)]
    return text[:BODY_KEEP_BYTES]


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    # Error pages can be large; keep only what is useful in a DLQ reason.
    chunks: list[bytes] = []
    kept = 0
    while kept < limit:
        chunk = await resp.content.read(limit - kept)
        if not chunk:
            break
        chunks.append(chunk)
        kept += len(chunk)
    return b"".join(chunks)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
) -> Response:
    """POST ``body`` and report what happened; never raises for network/HTTP failures.

    A request that meets a stale pooled connection is sent once more, at once, on a new
    connection, within the same ``timeout``."""
    deadline = time.monotonic() + timeout
    attempt = _Attempt()
    response, dropped = await _attempt_post(session, url, body, headers, timeout, attempt)
    remaining = deadline - time.monotonic()
    if not (dropped and attempt.on_stale_connection and remaining > 0):
        return response
    # The upstream (or a load balancer) closed a kept-alive connection while it sat idle
    # in the pool, and our request met the closed socket: dropped or reset while being
    # written or before a single byte of an answer. Resend it once, at once, on a new
    # connection; an upstream that fails that too fails the attempt as before.
    # Why a POST may be resent (RFC 9112 9.3.1 allows it only where a resend is known to
    # be harmless): from here we cannot tell a connection closed before the request was
    # read from an upstream that read it, processed it and died before answering. Either
    # way there was no answer, and a request with no answer is a connection error that
    # the delivery engine retries later with the same body, so resending now risks no
    # duplicate that delivery at least once does not already accept; it only spares the
    # attempt, the backoff and the guard. What is never resent here: a timeout (the
    # upstream may still be working on it), a connection that carried any byte of an
    # answer (the request was being answered), and a failure on a new connection.
    async with create_session(remaining, connections=1, fresh=True) as new:
        resent, _ = await _attempt_post(new, url, body, headers, remaining, _Attempt())
    return resent


async def _attempt_post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
    attempt: _Attempt,
) -> tuple[Response, bool]:
    """One POST as a Response, and whether it failed as on a dropped connection."""
    token = _ATTEMPT.set(attempt)
    try:
        async with session.post(
            url,
            data=body,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            # From here the upstream has answered: its status decides (a 2xx was
            # processed, a 413 must split), even when the body then fails to arrive.
            try:
                raw = await _read_prefix(resp, BODY_KEEP_BYTES + SECRET_MARGIN)
                text = kept_text(raw, cut_short=len(raw) >= BODY_KEEP_BYTES + SECRET_MARGIN)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                text = f"(the response body could not be read: {type(exc).__name__}: {exc})"
            location = resp.headers.get("Location")
            if location and 300 <= resp.status < 400:
                text = f"Location: {location}\n{text}"  # where a redirect pointed, for the DLQ
            return Response(status=resp.status, body=text, retry_after=_retry_after(resp.headers)), False
    except TimeoutError:
        return Response(0, error="timeout"), False
    except (aiohttp.ClientError, OSError, ValueError, RuntimeError) as exc:
        # ValueError covers invalid URLs; RuntimeError a session closed under us.
        detail = str(exc) or type(exc).__name__
        return Response(0, error=f"connection_error: {type(exc).__name__}: {detail}"), isinstance(exc, _DROPPED)
    finally:
        _ATTEMPT.reset(token)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """How long the upstream asked us to wait: Retry-After, else X-RateLimit-Reset."""
    wait = parse_retry_after(headers.get("Retry-After"))
    return wait if wait is not None else parse_rate_limit_reset(headers.get("X-RateLimit-Reset"))
