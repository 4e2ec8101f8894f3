"""Enqueue throughput of the job stores: 100-event batches from 32 concurrent callers.

    python -m bench.bench_store [--seconds 5] [--batch 100] [--concurrency 32] [--postgres DSN]
    python -m bench.bench_store --grow 3000000 [--step 500000] [--counted-ids]

Also runs a bare baseline: the same batches written by a minimal group-commit writer
(one thread, one table, executemany, WAL + synchronous=FULL) with no dedupe or jobs
model, so the store's overhead over the floor is visible as a ratio.

``--grow N`` instead enqueues N events into one SQLite store and prints the rate and
CPU per event for every ``--step`` of them: what dedupe costs as its keys pile up.
``--counted-ids`` sends ids in counting order, to compare with random ones.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import queue
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

import orjson

from bridge.store.base import IncomingEvent, Store
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SqliteStore

EVENT = {
    "type": "track",
    "event": "Order Completed",
    "userId": "user-0",
    "properties": {"orderId": "o-1", "revenue": 42.5, "currency": "EUR", "items": [{"sku": "a", "qty": 2}]},
    "context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "ip": "203.0.113.9"},
    "timestamp": "2026-11-23T21:00:00.000Z",
}


PAYLOAD = orjson.dumps(EVENT)


COUNTER = itertools.count()


def make_batch(size: int, counted: bool = False) -> list[IncomingEvent]:
    """Random message ids (like SDKs' UUIDs: the hard case for a dedupe index), one payload;
    ``counted`` ids sort in arrival order instead."""
    bits = random.getrandbits
    if counted:
        ids = [f"bench-{next(COUNTER):016d}" for _ in range(size)]
    else:
        ids = [f"{bits(64):016x}{bits(64):016x}" for _ in range(size)]
    return [IncomingEvent(m, f"user-{i % 50}", PAYLOAD, ("moengage",)) for i, m in enumerate(ids)]


async def drive(
    call: Callable[[list[IncomingEvent]], Awaitable[object]], seconds: float, batch: int, concurrency: int
) -> float:
    """Events per second that ``call`` sustained."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            events = make_batch(batch)
            await call(events)
            done += len(events)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


class BareWriter:
    """The floor: group commit of raw rows, nothing else."""

    def __init__(self, path: str) -> None:
        self._queue: queue.SimpleQueue[tuple[list[tuple[str, bytes]], asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, message_id TEXT, payload BLOB)")
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
            conn.execute("BEGIN IMMEDIATE")
            for rows, _ in items:
                conn.executemany("INSERT INTO events (message_id, payload) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            futures = [f for _, f in items]
            self._loop.call_soon_threadsafe(_resolve, futures)

    async def write(self, events: list[IncomingEvent]) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(([(e.message_id, e.payload) for e in events], future))
        await future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


async def bench_store(store: Store, args: argparse.Namespace) -> tuple[float, int]:
    """Events/s, and the commits it took (group commit: far fewer than calls)."""
    await store.open()
    try:
        rate = await drive(lambda events: store.enqueue("web", events), args.seconds, args.batch, args.concurrency)
        return rate, int(getattr(store, "commits", 0))
    finally:
        await store.close()


async def grow(args: argparse.Namespace) -> None:
    """Enqueue ``args.grow`` events into one store, reporting each ``args.step``."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        store = SqliteStore(os.path.join(tmp, "store.db"), min_free_disk_bytes=0)
        await store.open()
        done = reported = 0
        mark, cpu = time.perf_counter(), time.process_time()

        async def worker() -> None:
            nonlocal done, reported, mark, cpu
            while done < args.grow:
                events = make_batch(args.batch, args.counted_ids)
                await store.enqueue("web", events)
                done += len(events)
                if done - reported >= args.step:
                    now, used = time.perf_counter(), time.process_time()
                    n = done - reported
                    print(
                        f"{done / 1e6:6.2f}M keys: {n / (now - mark):9,.0f} events/s"
                        f"  {(used - cpu) / n * 1e6:5.1f} us CPU per event",
                        flush=True,
                    )
                    reported, mark, cpu = done, now, used

        try:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        finally:
            await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", metavar="DSN", help="also measure PostgresStore (uses schema bench_store)")
    parser.add_argument("--grow", type=int, metavar="N", help="enqueue N events into one store, reporting each step")
    parser.add_argument("--step", type=int, default=500_000, help="events per report line with --grow")
    parser.add_argument("--counted-ids", action="store_true", help="ids in counting order instead of random")
    args = parser.parse_args()
    if args.grow:
        await grow(args)
        return

    floor = sqlite_rate = 0.0
    commits = 0
    # Alternating rounds, best of each: other work on the machine only ever slows a round.
    for _round in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            bare = BareWriter(os.path.join(tmp, "bare.db"))
            floor = max(floor, await drive(bare.write, args.seconds, args.batch, args.concurrency))
            bare.stop()
            store = SqliteStore(os.path.join(tmp, "store.db"), min_free_disk_bytes=0)
            rate, used = await bench_store(store, args)
            if rate > sqlite_rate:
                sqlite_rate, commits = rate, used
    print(f"batch={args.batch} concurrency={args.concurrency} seconds={args.seconds} rounds={args.rounds} (best)")
    print(f"bare sqlite group commit : {floor:10.0f} events/s")
    print(
        f"SqliteStore.enqueue      : {sqlite_rate:10.0f} events/s  ({sqlite_rate / floor:.2f}x bare, {commits} commits)"
    )
    if args.postgres:
        pg = PostgresStore(args.postgres, schema="bench_store")
        rate, pg_commits = await bench_store(pg, args)
        print(f"PostgresStore.enqueue    : {rate:10.0f} events/s  ({pg_commits} commits)")


if __name__ == "__main__":
    asyncio.run(main())
