"""The one HTTP client path every destination posts through.

``post`` never raises for network or HTTP trouble: it turns everything into a
``Response`` so the delivery engine can apply one retry policy to all destinations.
"""

from __future__ import annotations

import base64
import email.utils
import math
import time
from collections.abc import Mapping
from datetime import UTC
from urllib.parse import urlsplit

import aiohttp

from bridge import __version__
from bridge.destinations.base import Response
from bridge.observability.redaction import redact_text

BODY_KEEP_BYTES = 4096
# Read past the kept part by this much and redact before cutting: a credential the
# upstream echoes across the cut would otherwise be kept in part, unrecognised.
SECRET_MARGIN = 1024
USER_AGENT = f"bridge/{__version__}"


def create_session(timeout: float, *, connections: int = 64) -> aiohttp.ClientSession:
    """A session for one destination: pooled keep-alive connections, no env proxies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
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
    """Why ``value`` is not a usable http(s) base URL, or None when it is."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return f"must start with http:// or https://, got {value!r}"
    if not parts.netloc:
        return f"has no host: {value!r}"
    if "@" in parts.netloc:
        # The destination sends its own Authorization header; credentials in the URL would
        # clash with it on every request (and be shown wherever the URL is).
        return "must not contain user:password@ (credentials come from the destination's own keys)"
    if parts.query or parts.fragment:
        return f"must not have a query or fragment: {value!r}"
    return None


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
    """POST ``body`` and report what happened; never raises for network/HTTP failures."""
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
                text = redact_text(raw.decode("utf-8", errors="replace"))[:BODY_KEEP_BYTES]
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                text = f"(the response body could not be read: {type(exc).__name__}: {exc})"
            location = resp.headers.get("Location")
            if location and 300 <= resp.status < 400:
                text = f"Location: {location}\n{text}"  # where a redirect pointed, for the DLQ
            return Response(
                status=resp.status,
                body=text,
                retry_after=_retry_after(resp.headers),
            )
    except TimeoutError:
        return Response(0, error="timeout")
    except (aiohttp.ClientError, OSError, ValueError, RuntimeError) as exc:
        # ValueError covers invalid URLs; RuntimeError a session closed under us.
        detail = str(exc) or type(exc).__name__
        return Response(0, error=f"connection_error: {type(exc).__name__}: {detail}")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """How long the upstream asked us to wait: Retry-After, else X-RateLimit-Reset."""
    wait = parse_retry_after(headers.get("Retry-After"))
    return wait if wait is not None else parse_rate_limit_reset(headers.get("X-RateLimit-Reset"))
