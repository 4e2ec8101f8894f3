"""What every stand-in upstream shares: recording, failure injection, waiting.

A stand-in is an aiohttp application that behaves like a real upstream API. Tests
and the sandbox talk to it over real sockets; failure injection (``plan``,
``refuse_all``, ``hold``) works the same way for every stand-in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# Real upstream caps are a few hundred KB; this only keeps aiohttp's own 1 MB limit
# from answering before the stand-in can answer like the upstream would.
CLIENT_MAX_SIZE = 64 * 1024 * 1024
LOG_BODY_CHARS = 2000

_log = structlog.get_logger("bridge.testing.standins")


@dataclass(frozen=True, slots=True)
class Planned:
    """One injected answer, consumed by the next request before normal handling.

    ``body`` None means the upstream's own error shape for ``status``; a dict or
    list is sent as JSON; str/bytes as is. ``hang`` never answers until the stand-in
    stops; ``reset`` closes the connection without answering."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request the stand-in accepted (answered by normal handling with 200)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    body: Any  # the parsed JSON body
    size: int  # bytes on the wire after content decoding


@dataclass(frozen=True, slots=True)
class Seen:
    """Every request received, with the status it got (0: no answer)."""

    method: str
    path: str
    status: int


class StandIn:
    """Base class: subclasses add routes in ``routes`` and the upstream's error shape."""

    name: ClassVar[str] = "upstream"

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.seen: list[Seen] = []
        self.received = 0
        self.log_requests = False
        self.latency = 0.0  # seconds every request waits before normal handling (a slow upstream)
        self._plan: deque[Planned] = deque()
        self._refuse: int | None = None
        self._poison: tuple[bytes, int, int | None] | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._stopped = asyncio.Event()
        self._changed = asyncio.Event()
        self._notes: dict[int, dict[str, Any]] = {}  # by id(request), popped once answered

    # -- to implement -------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def error_body(self, status: int, message: str | None = None, kind: str | None = None) -> Any:
        """The JSON body this upstream answers an error ``status`` with."""
        raise NotImplementedError

    def injected_error_body(self, request: web.Request, status: int) -> Any:
        """The body an injected refusal (``plan`` without a body, ``refuse_all``) of
        ``request`` carries: ``error_body``'s, unless the endpoint it reached answers
        ``status`` in a shape of its own."""
        return self.error_body(status)

    def log_fields(self) -> dict[str, Any]:
        """Fields naming this stand-in on each sandbox log line, beside ``upstream``."""
        return {}

    def error_headers(self, status: int) -> Mapping[str, str] | None:
        """The headers this upstream answers an error ``status`` with (none by default)."""
        return None

    # -- building and running ----------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._front], client_max_size=CLIENT_MAX_SIZE)
        app.add_routes(self.routes())
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        # A stand-in may be served again after a stop (an upstream coming back).
        self._stopped = asyncio.Event()

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.stop()

    def stop(self) -> None:
        """Let every held request go on and every hanging one answer 503."""
        self._stopped.set()
        self._gate.set()

    # -- failure injection ---------------------------------------------------------

    def plan(self, *responses: Planned) -> None:
        """Queue answers for the next requests, one each, in order."""
        self._plan.extend(responses)

    def refuse_all(self, status: int | None) -> None:
        """Answer every request with ``status`` (upstream-shaped body) until called with None."""
        self._refuse = status

    def fail_containing(self, marker: bytes | None, status: int = 500, retry_after: int | None = None) -> None:
        """Answer ``status`` (upstream-shaped body, with ``Retry-After`` if given) to every
        request whose body holds ``marker``, as an upstream that fails on one event's content
        does, every time, while it takes every other request; None stops it."""
        self._poison = None if marker is None else (marker, status, retry_after)

    def hold(self) -> None:
        """Keep every request waiting (unanswered) until ``release``."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # -- observing -----------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name} stand-in: condition not met within {timeout}s "
                    f"({self.received} requests received, {len(self.requests)} accepted)"
                )
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def note(self, request: web.Request, **fields: Any) -> None:
        """Facts about ``request`` for its sandbox log line (never credentials)."""
        self._notes[id(request)] = fields

    def record(self, request: web.Request, body: Any, size: int) -> None:
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                body=body,
                size=size,
            )
        )

    # -- answering -----------------------------------------------------------------

    def json_response(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    def error(self, status: int, message: str | None = None, kind: str | None = None) -> web.Response:
        return self.json_response(status, self.error_body(status, message, kind), self.error_headers(status))

    @staticmethod
    def request_id() -> str:
        return uuid.uuid4().hex

    async def _answer_planned(self, request: web.Request, planned: Planned) -> web.StreamResponse:
        if planned.hang:
            await self._stopped.wait()
            return self.error(503)
        if planned.delay > 0:
            await asyncio.sleep(planned.delay)
        if planned.reset:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)
        body, headers = planned.body, planned.headers
        if body is None and planned.status != 200:
            body = self.injected_error_body(request, planned.status)
            # The upstream's own headers for it (a 429's Retry-After), unless the plan names its own.
            headers = headers or self.error_headers(planned.status) or {}
        if isinstance(body, bytes | str):
            return web.Response(status=planned.status, body=body, headers=headers)
        if body is None:
            return web.Response(status=planned.status, headers=headers)
        return self.json_response(planned.status, body, headers)

    @web.middleware
    async def _front(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        self.received += 1
        self._notify()
        if not self._gate.is_set():
            await self._gate.wait()
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        response: web.StreamResponse
        if self._plan:
            planned = self._plan.popleft()
            response = await self._answer_planned(request, planned)
            if planned.reset:
                self._seen(request, 0)
                return response
        elif self._refuse is not None:
            response = self._refusal(request, self._refuse)
        elif self._poison is not None and self._poison[0] in await request.read():
            _, status, retry_after = self._poison
            response = self._refusal(request, status)
            if retry_after is not None:
                response.headers["Retry-After"] = str(retry_after)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # e.g. 404/405 from the router
                response = self.error(exc.status, exc.reason)
        self._seen(request, response.status)
        return response

    def _refusal(self, request: web.Request, status: int) -> web.Response:
        return self.json_response(status, self.injected_error_body(request, status), self.error_headers(status))

    def _seen(self, request: web.Request, status: int) -> None:
        self.seen.append(Seen(request.method, request.path, status))
        self._notify()
        notes = self._notes.pop(id(request), {})
        if self.log_requests:
            _log.info(
                "upstream_request",
                upstream=self.name,
                **self.log_fields(),
                method=request.method,
                path=request.path_qs,
                status=status,
                **notes,
            )


def clip(value: Any, limit: int = LOG_BODY_CHARS) -> str:
    """A compact JSON rendering, cut to ``limit`` characters, for log lines."""
    try:
        text = orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:  # nested past orjson's 254 levels: the log line shows its start
        text = repr(value)[: limit + 1]
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
