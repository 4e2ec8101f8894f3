"""The aiohttp application: sources, health, metrics and admin routes, and `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from bridge.admin.routes import add_admin_routes
from bridge.bindings import PrometheusBindings
from bridge.config.model import Config
from bridge.http_server import BridgeRunner, start_site
from bridge.httpx import BODY_TIMEOUT, bearer_only, json_response
from bridge.runtime import Runtime
from bridge.sources.segment.routes import SegmentSources
from bridge.sources.streams.routes import StreamsSources
from bridge.stop_signals import stop_event
from bridge.store.base import StoreError, StoreFull

log = structlog.get_logger("bridge")

RUNTIME = web.AppKey("runtime", Runtime)
BINDINGS = web.AppKey("bindings", PrometheusBindings)
# /readyz's last answer, "" when ready: its problems are logged when it changes.
READINESS = web.AppKey("readiness", list[str])


def build_app(runtime: Runtime, bindings: PrometheusBindings) -> web.Application:
    """The HTTP app. The runtime is started/stopped by the app's cleanup context."""
    cfg = runtime.config
    # Bodies are read by our own bounded reader; this is only the hard ceiling.
    app = web.Application(
        client_max_size=max(cfg.server.max_request_bytes, cfg.server.max_webhook_bytes, 8 * 1024 * 1024),
        # Also the time limit on receiving a request's headers (server.idle_timeout).
        handler_args={"keepalive_timeout": cfg.server.idle_timeout},
    )
    app[RUNTIME] = runtime
    app[BODY_TIMEOUT] = cfg.server.body_timeout
    app[BINDINGS] = bindings
    app[READINESS] = [""]
    runtime.on_reload = bindings.metrics.mapping_reload
    routes = bindings.routes(app)
    for source_kind in (SegmentSources(cfg, runtime.ingestor), StreamsSources(cfg, runtime.ingestor)):
        source_kind.add_routes(routes)
    routes.add_get("/healthz", healthz)
    routes.add_get("/readyz", readyz)
    # Open by default, for scrapers; with admin.metrics_token it is not, since the metrics
    # name every source and destination.
    routes.add_get(
        "/metrics",
        bearer_only(metrics, cfg.metrics_token, "/metrics (admin.metrics_token)", "bridge-metrics")
        if cfg.metrics_token
        else metrics,
    )
    add_admin_routes(routes, runtime, cfg.admin_token)
    routes.finish()
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    bindings = app[BINDINGS]
    await runtime.start()
    gauges = asyncio.create_task(bindings.refresh_gauges_forever(runtime), name="queue-gauges")
    yield
    gauges.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gauges
    await runtime.stop()


# Young, middle and old generation thresholds once serving (``bench.variant`` may replace them).
GC_THRESHOLDS = (20_000, 20, 50)


def settle_garbage_collector() -> None:
    """Move everything built at start-up (modules, compiled mappings, config) out of the
    collector's sight and collect the young generation less often.

    Per-request garbage is short-lived dicts; with default thresholds the collector kept
    re-walking the long-lived start-up objects, which made the p99 ack latency at
    5k req/s ~50-80 ms instead of ~3 ms and cost 20-30% of ingest throughput (bench/)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    # (what the answer says, what the log adds): the probe is as open as the ingest routes,
    # so its answer names the problem but not its detail (file paths, database hosts, a
    # mapping file's text), which goes to the log, once per change.
    problems: list[tuple[str, str]] = []
    if runtime.stopping:
        # Draining: tell the load balancer first, so it stops sending before the listener closes.
        problems.append(("shutting down", ""))
    try:
        await runtime.store.check_writable()
    except StoreFull as exc:
        problems.append(("store full", str(exc)))
    except StoreError as exc:
        problems.append(("store not writable", str(exc)))
    if runtime.mappings_error:
        problems.append(("mappings not loaded", runtime.mappings_error))
    said = "; ".join(problem for problem, _ in problems)
    if said != request.app[READINESS][0]:
        request.app[READINESS][0] = said
        if problems:
            log.warning("not_ready", problems={problem: detail for problem, detail in problems})
        else:
            log.info("ready")
    if problems:
        return json_response({"status": "not_ready", "code": "not_ready", "message": said}, 503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    bindings = request.app[BINDINGS]
    try:
        await bindings.refresh_gauges(request.app[RUNTIME])  # scrapes see the queue as it is now
    except Exception as exc:
        # A store outage is when metrics matter most: serve the rest, with the last known queue.
        log.warning("queue_gauges_stale", error=str(exc))
    body, content_type = bindings.metrics.render(request.headers.get("Accept"))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def serve(
    config: Config, *, ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting, drain in-flight requests and
    deliveries within server.shutdown_timeout, and exit with nothing lost. A signal during
    start-up abandons it, within the same timeout. ``stop`` is the signals' event when the
    caller took them over already (the sandbox, before its stand-ins start)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = stop_event(loop)
    bindings = PrometheusBindings()
    runtime = Runtime(config, ingest_metrics=bindings.ingest, delivery_metrics=bindings.delivery)
    runtime.load_mappings()  # fail fast, before binding the port
    # Before the store opens (on PostgreSQL it may wait minutes for another node's schema
    # lock): SIGHUP's default action would end the process mid-start.
    loop.add_signal_handler(signal.SIGHUP, _reload_on_hangup(runtime, loop))
    app = build_app(runtime, bindings)
    # drain_seconds is part of shutdown_timeout: HTTP draining gets what is left of it.
    http_drain = max(config.server.shutdown_timeout - config.server.drain_seconds, 0.0)
    runner = BridgeRunner(app, shutdown_timeout=http_drain, access_log=None)
    try:
        started = await _start_unless_stopped(runner, config, stop)
    except BaseException:
        await runner.cleanup()  # the store is open and delivery started: close them as a stop would
        raise
    if not started:
        await runner.cleanup()
        log.info("stopped")
        return
    settle_garbage_collector()  # after start-up: everything built so far lives for the process
    port = _bound_port(runner)
    log.info(
        "listening",
        host=config.server.host,
        port=port,
        pid=os.getpid(),  # what `kill -HUP <pid>` (reload the mappings) takes
        region=config.server.region,
        store=config.store.url.split("://", 1)[0],
    )
    if ready is not None:
        ready(port)
    try:
        await stop.wait()
        log.info("shutting_down", timeout=config.server.shutdown_timeout, drain=config.server.drain_seconds)
        _exit_when_overdue(config.server.shutdown_timeout)
        runtime.begin_stop()
        if config.server.drain_seconds:
            await asyncio.sleep(config.server.drain_seconds)  # /readyz is 503; still serving
    finally:
        # SIGHUP stays handled (and ignored: the runtime is stopping) until the drain is over:
        # its default action ended the process mid-drain, with the deliveries in flight unacked.
        try:
            await runner.cleanup()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
        log.info("stopped")


async def _start_unless_stopped(runner: web.AppRunner, config: Config, stop: asyncio.Event) -> bool:
    """Start the runtime (store, delivery) and the listener: True once serving, False if a
    stop signal came first. Then start-up is cancelled, and given server.shutdown_timeout
    to close what it opened: a store that hangs must not keep the process from exiting."""
    starting = asyncio.create_task(_start(runner, config), name="start-up")
    signalled = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        if not starting.done():
            starting.cancel()  # a stop signal, or serve itself cancelled
    if starting.done() and not starting.cancelled():
        starting.result()  # serving, or a start-up error (a port in use, a bad store) for the caller
        return True
    log.info("shutting_down", during="start-up", timeout=config.server.shutdown_timeout)
    _exit_when_overdue(config.server.shutdown_timeout)
    await asyncio.wait({starting}, timeout=config.server.shutdown_timeout)
    return False


async def _start(runner: web.AppRunner, config: Config) -> None:
    await runner.setup()  # the store opens and delivery starts (_lifecycle)
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await start_site(site, "server.host/server.port")


# After server.shutdown_timeout, what cancelled work does on its way out (leases given
# back, the store closed) gets this long before the process exits regardless.
STOP_GRACE = 5.0


def _exit_when_overdue(timeout: float) -> None:
    """The last resort of a stop, armed when it begins, until the process ends: exit 1 once
    ``timeout`` + STOP_GRACE have passed. A PostgreSQL that stopped answering (a partition,
    a hung proxy) hung the stop for good: awaiting a cancelled query, giving leases back or
    closing the pool has no end of its own, and SIGTERM never ended the process. Acked events
    are committed before their 2xx, so none is lost; jobs still leased wait out their lease."""

    def give_up() -> None:
        log.error(
            "shutdown_timed_out",
            after=timeout + STOP_GRACE,
            hint="the store did not answer in time; jobs still leased are delivered once their lease lapses",
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    asyncio.get_running_loop().call_later(timeout + STOP_GRACE, give_up)


def _reload_on_hangup(runtime: Runtime, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """SIGHUP's handler: one reload for any number of signals that arrive before it starts,
    and none once shutdown began. A signal during a reload's compile (in a thread) asks for
    one more after it: the files may have changed again since they were read."""
    pending = False
    running: set[asyncio.Task[None]] = set()  # held, so a reload is not collected mid-way

    async def reload() -> None:
        nonlocal pending
        pending = False
        if not runtime.stopping:
            try:
                await runtime.reload_mappings()
            except Exception:  # nobody awaits this task: said here, or never
                log.exception("mapping_reload_error")

    def on_hangup() -> None:
        nonlocal pending
        if not pending:
            pending = True
            task = loop.create_task(reload(), name="reload-on-hangup")
            running.add(task)
            task.add_done_callback(running.discard)

    return on_hangup


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0
