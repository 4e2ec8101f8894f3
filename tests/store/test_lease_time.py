"""A lease's time starts when it is taken, not when it was asked for.

A lease that waited (behind the SQLite writer's other work, a long prune or a dedupe
merge; behind another PostgreSQL node's lease of the destination) must still give the
worker its whole ``lease_seconds``: the worker sends until half of it is gone, and a lease
that lapsed meanwhile would let another loop or node send the same user's jobs at once."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SqliteStore
from tests.store.conftest import PG_DSN, pg_problem
from tests.store.helpers import event

LEASE = 2.0
STALL = 1.5  # the wait before the lease is taken: more than LEASE - (time slept below)


async def test_a_sqlite_lease_waiting_behind_the_writer_still_lasts_its_time(tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "b.db"))
    await store.open()
    try:
        await store.enqueue("web", [event("m1", "alice")])
        stall = asyncio.create_task(store._run(lambda conn: time.sleep(STALL)))
        await asyncio.sleep(0.05)  # the stall holds the writer
        [job] = await store.lease("moe", 10, LEASE)
        await stall
        await asyncio.sleep(1.0)  # within the lease, counted from when it was taken
        assert await store.lease("moe", 10, LEASE) == [], "the lease lapsed while its holder could still send"
        await asyncio.sleep(LEASE)
        assert [j.id for j in await store.lease("moe", 10, LEASE)] == [job.id]  # and it does lapse
    finally:
        await store.close()


@pytest.mark.skipif(pg_problem() is not None, reason=str(pg_problem()))
async def test_a_postgres_lease_waiting_for_another_nodes_lock_still_lasts_its_time(pg_schema: str) -> None:
    store = PostgresStore(PG_DSN, schema=pg_schema, pool_size=3)
    await store.open()
    blocker = await asyncpg.connect(PG_DSN)
    try:
        await store.enqueue("web", [event("m1", "alice")])
        # Another node's ordered lease of the destination holds its advisory lock.
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{pg_schema}:moe")
        leasing = asyncio.create_task(store.lease("moe", 10, LEASE))
        await asyncio.sleep(STALL)
        await lock.commit()
        [job] = await leasing
        await asyncio.sleep(1.0)
        assert await store.lease("moe", 10, LEASE) == [], "the lease lapsed while its holder could still send"
        await asyncio.sleep(LEASE)
        assert [j.id for j in await store.lease("moe", 10, LEASE)] == [job.id]
    finally:
        await blocker.close()
        await store.close()
