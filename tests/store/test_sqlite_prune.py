"""The SQLite store's periodic prune: what it deletes, what it reads, and that it lets
acknowledgements through while it runs."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bridge.store import sqlite_ops as ops
from bridge.store.base import Discard
from bridge.store.sqlite import SqliteStore
from tests.store.helpers import event

DAY = 86400.0


async def opened(path: Path) -> SqliteStore:
    store = SqliteStore(str(path), min_free_disk_bytes=0)
    await store.open()
    return store


async def _delivered(store: SqliteStore, prefix: str, count: int) -> list[int]:
    """``count`` jobs, enqueued, leased and acked: delivered records."""
    await store.enqueue("web", [event(f"{prefix}-{i}", f"u{i}") for i in range(count)])
    jobs = await store.lease("moe", count, 30, ordered=False)
    await store.ack([j.id for j in jobs], "v1")
    return sorted(j.id for j in jobs)


def _age(store: SqliteStore, ids: list[int], created: float, settled: float | None) -> None:
    """Back-date jobs: the store's clock is the wall clock, so age is written directly."""
    conn = sqlite3.connect(store.path)
    with conn:
        conn.executemany(
            "UPDATE jobs SET created_at = ?, settled_at = COALESCE(?, settled_at) WHERE id = ?",
            [(created, settled, i) for i in ids],
        )
    conn.close()


def _job_ids(store: SqliteStore) -> list[int]:
    conn = sqlite3.connect(store.path)
    ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY id")]
    conn.close()
    return ids


async def test_a_prune_deletes_old_delivered_records_past_the_jobs_it_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk in id order deletes every delivered record settled before the cutoff, steps
    over the old jobs it keeps (still queued, or settled lately), and stops at the first
    job created after the cutoff."""
    monkeypatch.setattr("bridge.store.sqlite.PRUNE_STEP", 3)  # the walk crosses steps
    store = await opened(tmp_path / "b.db")
    now = time.time()
    old = await _delivered(store, "old", 4)
    # Old and still queued (for a destination delivering nothing): kept.
    await store.enqueue("web", [event("waiting-0", "w0", destinations=("paused",))])
    waiting = [i for i in _job_ids(store) if i not in old]
    settled_lately = await _delivered(store, "late", 2)  # created long ago, settled today: kept
    older_still = await _delivered(store, "old2", 3)  # after kept jobs: still deleted
    young = await _delivered(store, "young", 2)  # created after the cutoff: kept
    _age(store, old + older_still, now - 5 * DAY, now - 4 * DAY)
    _age(store, waiting, now - 5 * DAY, None)
    _age(store, settled_lately, now - 5 * DAY, now - 1)
    _age(store, young, now - DAY, now - 4 * DAY)  # an odd clock: never reached by the walk
    removed = await store.prune(now - 2 * DAY, now - 3 * DAY)
    # 14 dedupe keys were merged just now, so none is old enough to go.
    assert removed == len(old) + len(older_still)
    assert _job_ids(store) == sorted(waiting + settled_lately + young)
    assert (await store.queue_stats())["paused"].depth == 1
    assert await store.prune(now - 2 * DAY, now - 3 * DAY) == 0
    await store.close()


async def test_a_prune_never_scans_the_jobs_table(tmp_path: Path) -> None:
    """settled_at has no index (an ack would pay to keep one up), so a DELETE by it read
    every delivered record of the retention window, in one writer operation that every
    acknowledgement waited behind. Every statement the prune runs must find its rows
    through an index or the rowid."""
    store = await opened(tmp_path / "b.db")
    ids = await _delivered(store, "m", 5)
    now = time.time()
    _age(store, ids[:2], now - 5 * DAY, now - 4 * DAY)
    statements: list[str] = []
    await store._run(lambda conn: conn.set_trace_callback(statements.append))
    try:
        assert await store.prune(now - 2 * DAY, now - 3 * DAY) == 2
    finally:
        await store._run(lambda conn: conn.set_trace_callback(None))
    conn = sqlite3.connect(store.path)
    plans = {}
    for sql in statements:
        head = sql.lstrip().split(None, 1)[0].upper()
        if head in ("SELECT", "DELETE", "UPDATE", "INSERT") and "jobs" in sql:
            plans[sql] = " / ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    conn.close()
    assert any(sql.startswith("DELETE FROM jobs") for sql in plans), plans
    scans = {sql: plan for sql, plan in plans.items() if "SCAN jobs" in plan}
    assert not scans
    await store.close()


async def test_acknowledgements_are_written_between_the_steps_of_a_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune is many short writer operations, not one: an enqueue made while it runs is
    committed and answered before the prune ends."""
    monkeypatch.setattr("bridge.store.sqlite.PRUNE_STEP", 2)
    store = await opened(tmp_path / "b.db")
    ids = await _delivered(store, "m", 12)
    now = time.time()
    _age(store, ids, now - 5 * DAY, now - 4 * DAY)
    stepped = asyncio.Event()
    real_step = ops.prune_settled_step

    def step(conn: sqlite3.Connection, **kw: Any) -> tuple[int, int | None]:
        stepped.set()
        return real_step(conn, **kw)

    monkeypatch.setattr(ops, "prune_settled_step", step)
    pruning = asyncio.create_task(store.prune(now - 2 * DAY, now - 3 * DAY))
    await stepped.wait()
    assert (await store.enqueue("web", [event("during-prune", "u")])).stored == 1
    assert not pruning.done()  # answered while the prune still had steps to go
    assert await pruning == 12
    await store.close()


async def test_discards_go_in_steps_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bridge.store.sqlite.PRUNE_STEP", 2)
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event(f"k-{i}", f"u{i}") for i in range(5)])
    jobs = await store.lease("moe", 5, 30, ordered=False)
    await store.discard([Discard(j.id, "anonymous_user") for j in jobs])
    steps: list[str] = []
    real_discards = ops.prune_discards_step
    monkeypatch.setattr(ops, "prune_discards_step", partial(_counting, steps, real_discards))
    now = time.time()
    assert await store.prune(now + 1, now + 1) == 5 + 5  # the keys' generation, and the discards
    assert steps.count("discards") == 3  # 2 + 2 + 1
    assert (await store.enqueue("web", [event("k-0", "u0")])).stored == 1  # forgotten
    await store.close()


def _counting(steps: list[str], real: Any, conn: sqlite3.Connection, **kw: Any) -> int:
    steps.append("discards")
    return int(real(conn, **kw))
