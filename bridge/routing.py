"""The app's routes: each handler wrapped once in ``httpx.json_errors``, and a catch-all
that answers what no route takes (404, or 405 with the methods the path has) the same way.

Not an aiohttp middleware: with any middleware, aiohttp runs every request through the
middleware's coroutine and through one of its own (the wrapper that switches the current
app). A wrapper per route is one coroutine, and it knows its route's label (the path
template, e.g. ``/v1/track``) from registration instead of asking each request for it.
Counted with bench/instructions.py, a single Tracking API call went from 492.7k to 479.1k
instructions (-2.8%).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import hdrs, web

from bridge.httpx import Handler, StatusObserver, cors_preflight, expect_handler, json_errors

# The label of requests no route took (404 and 405): raw paths would make a metric's
# label set unbounded.
UNMATCHED_ROUTE = "unmatched"
# The rest of a path, whatever it holds: aiohttp matches the decoded path, so ".*" would
# stop at a newline sent as %0A, and such a request would miss a catch-all.
ANY_PATH = r"[\s\S]*"


class Routes:
    """Registers routes on ``router``; ``finish`` once every route is in."""

    def __init__(self, router: web.UrlDispatcher, observe: StatusObserver | None = None) -> None:
        self._router = router
        self._observe = observe
        self._finished = False

    def add(self, method: str, path: str, handler: Handler, *, cors: bool = False, label: str | None = None) -> None:
        """``cors``: browsers on any site may call the route (its OPTIONS preflight too).
        ``label``: the route's name in logs and metrics, when not its own path template (a
        second path for one route, such as the same with a trailing slash)."""
        if self._finished:
            # The catch-all answers 405 only for the routes it knew of when it was added.
            raise RuntimeError(f"route {method} {path} added after Routes.finish()")
        resource = self._router.add_resource(path)
        route = label or resource.canonical
        wrapped = json_errors(handler, route, self._observe, cors=cors)
        expect = expect_handler(route, self._observe, cors=cors)
        if method == hdrs.METH_GET:
            resource.add_route(hdrs.METH_HEAD, wrapped, expect_handler=expect)  # as aiohttp's add_get does
        resource.add_route(method, wrapped, expect_handler=expect)
        if cors:
            preflight = json_errors(cors_preflight, route, self._observe)
            resource.add_route(hdrs.METH_OPTIONS, preflight, expect_handler=expect)

    def add_get(self, path: str, handler: Handler) -> None:
        self.add(hdrs.METH_GET, path, handler)

    def add_post(self, path: str, handler: Handler, *, cors: bool = False, label: str | None = None) -> None:
        self.add(hdrs.METH_POST, path, handler, cors=cors, label=label)

    def resources(self) -> list[web.AbstractResource]:
        return list(self._router.resources())

    def finish(self) -> None:
        """Add the catch-all for requests no route takes; no route may be added after it."""
        catch_all = json_errors(unmatched(self.resources()), UNMATCHED_ROUTE, self._observe)
        expect = expect_handler(UNMATCHED_ROUTE, self._observe)
        self._router.add_route(hdrs.METH_ANY, "/{path:" + ANY_PATH + "}", catch_all, expect_handler=expect)
        self._finished = True


def unmatched(resources: Sequence[web.AbstractResource]) -> Handler:
    """A handler for requests that none of ``resources`` took: 405 and the methods that
    exist when one of them has the path, else 404 (rendered by ``json_errors``)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in resources:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
        raise web.HTTPNotFound()

    return answer
