"""The floor: the least a durable ingest endpoint can do on this machine.

Bare aiohttp + orjson + SQLite (WAL, synchronous=FULL) with group commit on one writer
thread; one row per raw event; no auth, validation, mapping or dedupe. It answers the
same paths as the bridge so one load generator drives both.

    python -m bench.floor --db /tmp/floor.db [--port 0] [--cpu 0]
        [--deliver-to URL --workspace WS --api-key KEY]

With ``--deliver-to`` it is also the delivery floor (``bench/floor_delivery.py``): a
``POST /_floor/deliver`` starts delivering what it stored to that MoEngage-like upstream,
and ``/healthz`` counts what was delivered.

Prints ``READY <port>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import orjson
from aiohttp import web

from bench.floor_delivery import FloorDelivery
from bench.loadgen import pin

Rows = list[tuple[float, bytes]]
_OK = orjson.dumps({"success": True})
_BAD = orjson.dumps({"success": False, "code": "invalid_json"})


class GroupCommitter:
    """One writer thread: whatever arrived while the last commit was syncing goes in the next.

    No timer: a lone request is committed at once, and under load the group grows to
    match the fsync time (flush when idle or when the writer is free).
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Rows, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, received_at REAL, body BLOB)")
        self.commits = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="floor-writer", daemon=True)
        self._thread.start()

    def write(self, rows: Rows) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._queue.put((rows, fut))
        return fut

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                group.append(item)
            error: Exception | None = None
            try:
                self._db.execute("BEGIN")
                for rows, _ in group:
                    self._db.executemany("INSERT INTO events (received_at, body) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
                self.commits += 1
                self.rows += sum(len(rows) for rows, _ in group)
            except sqlite3.Error as exc:
                error = exc
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            self._loop.call_soon_threadsafe(_settle, [fut for _, fut in group], error)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        self._db.close()


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def events_in(path: str, data: Any) -> list[Any] | None:
    """The raw events of a request, by endpoint shape; None when the shape is not there."""
    if path.startswith("/moengage/streams/"):
        if isinstance(data, dict):
            if isinstance(data.get("events"), list):
                return list(data["events"])
            if "event" in data:
                return [data["event"]]
        return None
    if path in ("/v1/batch", "/v1/import"):
        batch = data.get("batch") if isinstance(data, dict) else None
        return batch if isinstance(batch, list) else None
    return [data] if isinstance(data, dict) else None


COMMITTER = web.AppKey("committer", GroupCommitter)
DELIVERY = web.AppKey("delivery", FloorDelivery)


async def ingest(request: web.Request) -> web.Response:
    rows = rows_of(request.path, await request.read())
    if rows is None:
        return web.Response(status=400, body=_BAD, content_type="application/json")
    await request.app[COMMITTER].write(rows)
    return web.Response(body=_OK, content_type="application/json")


def rows_of(path: str, body: bytes) -> Rows | None:
    """The rows to store for a request, or None for a body that is not the path's shape.

    A plain function, so the parsed body is freed before the handler waits for the
    commit: held through that wait by the requests in flight, it cost the floor about
    5 us of CPU a batch event (docs/benchmarks.md, session 18). The bridge does the same.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    events = events_in(path, data)
    if events is None:
        return None
    now = time.time()
    dumps = orjson.dumps
    return [(now, dumps(e)) for e in events]


async def healthz(request: web.Request) -> web.Response:
    committer = request.app[COMMITTER]
    health: dict[str, Any] = {"status": "ok", "rows": committer.rows, "commits": committer.commits}
    delivery = request.app.get(DELIVERY)
    if delivery is not None:
        health["delivered"], health["delivery_error"] = delivery.delivered, delivery.error
    return web.json_response(health)


async def deliver(request: web.Request) -> web.Response:
    request.app[DELIVERY].start()
    return web.json_response({"started": True})


def build_app(db_path: str, upstream: tuple[str, str, str] | None = None) -> web.Application:
    """``upstream``: (base URL, workspace, API key) of a MoEngage-like upstream to deliver to."""
    app = web.Application(client_max_size=8 * 1024 * 1024)

    async def lifecycle(app: web.Application) -> Any:
        app[COMMITTER] = GroupCommitter(db_path, asyncio.get_running_loop())
        if upstream is not None:
            app[DELIVERY] = FloorDelivery(db_path, *upstream)
        yield
        if upstream is not None:
            await app[DELIVERY].close()
        app[COMMITTER].close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/{call}", ingest)
    app.router.add_post("/moengage/streams/{source}", ingest)
    app.router.add_get("/healthz", healthz)
    if upstream is not None:
        app.router.add_post("/_floor/deliver", deliver)
    return app


async def serve(db_path: str, host: str, port: int, upstream: tuple[str, str, str] | None = None) -> None:
    runner = web.AppRunner(build_app(db_path, upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--db", required=True, help="SQLite file to write (created)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: do not pin)")
    p.add_argument("--deliver-to", metavar="URL", help="a MoEngage-like upstream: be the delivery floor too")
    p.add_argument("--workspace", default="", help="with --deliver-to: the MoEngage workspace id")
    p.add_argument("--api-key", default="", help="with --deliver-to: the Data API key")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.db))):
        p.error(f"--db: directory of {args.db} does not exist")
    if args.deliver_to and not (args.workspace and args.api_key):
        p.error("--deliver-to needs --workspace and --api-key")
    upstream = (args.deliver_to, args.workspace, args.api_key) if args.deliver_to else None
    pin(None if args.cpu < 0 else args.cpu)
    from bench.httpload import run

    run(lambda: serve(args.db, args.host, args.port, upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
