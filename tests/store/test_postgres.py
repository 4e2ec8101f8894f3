"""What only the PostgreSQL store does: several nodes sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from bridge.store.base import DeadLetter, IdentityLink, RecordFilter, StoreError
from bridge.store.postgres import PostgresStore
from bridge.store.postgres_schema import DELIVERED
from tests.store.conftest import PG_DSN, end_connections, pg_problem
from tests.store.helpers import check_outputs_survive, event

pytestmark = pytest.mark.skipif(pg_problem() is not None, reason=str(pg_problem()))


@pytest.fixture
async def nodes(pg_schema: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two bridge nodes sharing one database schema."""
    a = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4)
    b = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4)
    await asyncio.gather(a.open(), b.open())  # schema creation must not race
    yield a, b
    await a.close()
    await b.close()


async def test_two_nodes_never_both_store_one_event(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    batches = [[event(f"m{i}-{k}", f"u{k}") for k in range(10)] for i in range(30)]
    results = await asyncio.gather(*(node.enqueue("web", batch) for batch in batches for node in (a, b)))
    assert sum(r.stored for r in results) == 300
    assert sum(r.duplicates for r in results) == 300
    assert (await a.queue_stats())["moe"].depth == 300


async def test_ordered_leases_on_two_nodes_keep_each_users_order(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    users, per_user = 15, 6
    await a.enqueue("web", [event(f"{u}-{n}", f"user{u}") for n in range(per_user) for u in range(users)])
    delivered: dict[str, list[int]] = {}
    rounds = 0
    while sum(len(v) for v in delivered.values()) < users * per_user:
        rounds += 1
        assert rounds < 200, "the queue did not drain"
        got_a, got_b = await asyncio.gather(a.lease("moe", 7, 30), b.lease("moe", 7, 30))
        keys_a = {j.ordering_key for j in got_a}
        keys_b = {j.ordering_key for j in got_b}
        assert not keys_a & keys_b, f"one user's jobs were leased to two nodes at once: {keys_a & keys_b}"
        assert not {j.id for j in got_a} & {j.id for j in got_b}
        for job in sorted(got_a + got_b, key=lambda j: j.id):
            delivered.setdefault(job.ordering_key, []).append(int(job.message_id.split("-")[1]))
        await asyncio.gather(a.ack([j.id for j in got_a]), b.ack([j.id for j in got_b]))
    assert all(seq == list(range(per_user)) for seq in delivered.values()), delivered


async def test_unordered_leases_on_two_nodes_skip_each_others_rows(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await a.enqueue("web", [event(f"m{i}", "same-user") for i in range(200)])
    leased = await asyncio.gather(*(node.lease("moe", 25, 30, ordered=False) for node in (a, b) * 5))
    ids = [j.id for batch in leased for j in batch]
    assert len(ids) == len(set(ids)) == 200


async def test_check_writable_fails_when_the_schema_is_gone(pg_schema: str) -> None:
    store = PostgresStore(PG_DSN, schema=pg_schema)
    await store.open()
    await store.check_writable()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="postgres"):
        await store.check_writable()
    with pytest.raises(StoreError):
        await store.enqueue("web", [event("m1")])
    await store.close()


async def test_unreachable_server_and_bad_options() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        await store.open()
    with pytest.raises(ValueError, match="schema name"):
        PostgresStore(PG_DSN, schema="Robert'); DROP TABLE jobs;--")
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore(PG_DSN, pool_size=1)


async def test_a_hung_database_is_a_store_error_not_a_hang(pg_schema: str) -> None:
    """A lock held elsewhere stalls every statement: ingest must fail fast (429 store_unavailable), not wait."""
    store = PostgresStore(PG_DSN, schema=pg_schema, command_timeout=0.5)
    await store.open()
    blocker = await asyncpg.connect(PG_DSN)
    try:
        async with blocker.transaction():
            await blocker.execute(f'LOCK TABLE "{pg_schema}".jobs IN ACCESS EXCLUSIVE MODE')
            # wait_for's 10 s is only a backstop: a TimeoutError from it is not a StoreError.
            with pytest.raises(StoreError, match="postgres"):
                await asyncio.wait_for(store.enqueue("web", [event("hung-1", "u1")]), 10)
            # Named: a timeout's own text is empty, and "postgres: " in lease_failed said nothing.
            with pytest.raises(StoreError, match=r"^postgres: .*Timeout"):
                await asyncio.wait_for(store.lease("moe", 10, 30), 10)
        # Once the lock is gone the same store works again: nothing was left half-done.
        assert (await store.enqueue("web", [event("hung-1", "u1")])).stored == 1
    finally:
        await blocker.close()
        await store.close()


async def test_prune_works_in_slices(pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each prune statement deletes a bounded slice, and the prune goes on until all is gone."""
    monkeypatch.setattr("bridge.store.postgres.PRUNE_SLICE", 4)
    store = PostgresStore(PG_DSN, schema=pg_schema)
    await store.open()
    try:
        await store.enqueue("web", [event(f"slice-{i}", f"u{i}") for i in range(11)])
        jobs = await store.lease("moe", 20, 30, ordered=False)
        await store.ack([j.id for j in jobs], "v1")
        now = time.time()
        assert await store.prune(now + 1, now + 1) == 11 + 11  # dedupe keys and delivered jobs
        assert await store.prune(now + 1, now + 1) == 0
        assert (await store.enqueue("web", [event("slice-0", "u0")])).stored == 1  # forgotten
    finally:
        await store.close()


DAY = 86400.0


class Logged(PostgresStore):
    """A store that keeps every statement it runs, with its arguments."""

    statements: list[tuple[str, tuple[object, ...]]]

    @contextlib.asynccontextmanager
    async def _conn(self, transaction: bool = False, *, ingest: bool = False) -> AsyncIterator[asyncpg.Connection]:
        def keep(record: asyncpg.connection.LoggedQuery) -> None:
            self.statements.append((record.query, tuple(record.args)))

        async with super()._conn(transaction, ingest=ingest) as conn:
            conn.add_query_logger(keep)
            try:
                yield conn
            finally:
                conn.remove_query_logger(keep)


async def _plans(conn: asyncpg.Connection, query: str, args: tuple[object, ...]) -> list[str]:
    """``query``'s plan with these arguments (as a first run plans it), then its generic
    plan (as a prepared statement's plan may become after a few runs, which asyncpg's
    statement cache makes of every prune statement on a pooled connection)."""
    custom = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE pruning AS {query}")
    try:
        # EXECUTE takes no bound arguments: these are numbers, written as literals.
        literals = ", ".join(repr(a) for a in args)
        generic = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE pruning({literals})"))
    finally:
        await conn.execute("DEALLOCATE pruning")
        await conn.execute("RESET plan_cache_mode")
    return [custom, generic]


async def test_a_prune_reads_jobs_by_their_primary_key_not_the_whole_table(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index has settled_at, so pruning delivered records by it was a sequential scan of
    jobs in every slice, and the last one read all of it: every record of retention_hours,
    every 10 minutes. Each statement a prune runs, explained on 50,000 delivered records
    with fresh statistics (so the planner's choice is the one it makes on a real table),
    reads jobs by an index."""
    monkeypatch.setattr("bridge.store.postgres.PRUNE_SLICE", 1000)  # the walk crosses slices
    store = Logged(PG_DSN, schema=pg_schema)
    await store.open()
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        now = store.now()
        # One record every 5.76 s over 80 h, in id order, each settled a second after it was
        # created: the 8 h before the 72 h kept are 5,000 of them.
        await conn.execute(
            "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, available_at,"
            f" created_at, settled_at) SELECT 'moe', 'web', 'm' || g, 'u' || g, '', {DELIVERED}, t, t, t + 1"
            " FROM generate_series(1, 50000) AS g, LATERAL (SELECT $1::float8 - 80 * 3600 + g * 5.76 AS t) AS x",
            now,
        )
        await conn.execute("ANALYZE")
        store.statements = []
        assert await store.prune(now - DAY, now - 3 * DAY) == 5000 - 1  # the 5,000th is created at the cutoff
        on_jobs = [s for s in store.statements if " jobs " in s[0]]
        assert len(on_jobs) >= 5
        for query, args in store.statements:
            for plan in await _plans(conn, query, args):
                assert "Seq Scan on jobs" not in plan, f"{query}\n{plan}"
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 45001
    finally:
        await conn.close()
        await store.close()


async def _delivered(store: PostgresStore, prefix: str, count: int) -> list[int]:
    """``count`` jobs, enqueued, leased and acked: delivered records."""
    await store.enqueue("web", [event(f"{prefix}-{i}", f"u{i}") for i in range(count)])
    jobs = await store.lease("moe", count, 30, ordered=False)
    await store.ack([j.id for j in jobs], "v1")
    return sorted(j.id for j in jobs)


async def test_a_prune_deletes_old_delivered_records_past_the_jobs_it_keeps_and_stops_at_a_newer_job(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk in id order deletes every delivered record settled before the cutoff, steps
    over the old jobs it keeps (still queued, or settled lately), and stops at the first
    job created after the cutoff: a record past it, dated earlier by another node's clock,
    waits for a later prune."""
    monkeypatch.setattr("bridge.store.postgres.PRUNE_SLICE", 3)  # the walk crosses slices
    store = PostgresStore(PG_DSN, schema=pg_schema)
    await store.open()
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})

    async def age(ids: list[int], created: float, settled: float | None) -> None:
        await conn.execute(
            "UPDATE jobs SET created_at = $2, settled_at = COALESCE($3, settled_at) WHERE id = ANY($1::bigint[])",
            ids,
            created,
            settled,
        )

    async def job_ids() -> list[int]:
        return [r[0] for r in await conn.fetch("SELECT id FROM jobs ORDER BY id")]

    try:
        now = store.now()
        old = await _delivered(store, "old", 4)
        # Old and still queued (for a destination delivering nothing): kept.
        await store.enqueue("web", [event("waiting-0", "w0", destinations=("paused",))])
        waiting = [i for i in await job_ids() if i not in old]
        settled_lately = await _delivered(store, "late", 2)  # created long ago, settled today: kept
        older_still = await _delivered(store, "old2", 3)  # after kept jobs: still deleted
        young = await _delivered(store, "young", 2)  # created after the cutoff: where the walk stops
        beyond = await _delivered(store, "beyond", 2)  # dated old by a node's clock, past the stop
        await age(old + older_still + beyond, now - 5 * DAY, now - 4 * DAY)
        await age(waiting, now - 5 * DAY, None)
        await age(settled_lately, now - 5 * DAY, now - 1)
        await age(young, now - 2.5 * DAY, now - 4 * DAY)  # an odd clock: never reached by the walk
        removed = await store.prune(now - 2 * DAY, now - 3 * DAY)
        # 15 dedupe keys were stored just now, so none is old enough to go.
        assert removed == len(old) + len(older_still)
        assert await job_ids() == sorted(waiting + settled_lately + young + beyond)
        assert (await store.queue_stats())["paused"].depth == 1
        assert await store.prune(now - 2 * DAY, now - 3 * DAY) == 0
        # A later cutoff takes the walk past the young jobs, to what it left.
        assert await store.prune(now - 2 * DAY, now - 2 * DAY) == len(young) + len(beyond)
        assert await job_ids() == sorted(waiting + settled_lately)
    finally:
        await conn.close()
        await store.close()


async def test_replay_and_purge_work_in_slices(pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay or purge of a whole DLQ was one statement: past about a million records it
    outlasted command_timeout and was cancelled, every time. Each slice now commits alone:
    here the first slices are queued while a later record is held by another session."""
    monkeypatch.setattr("bridge.store.postgres.RECORD_SLICE", 2)
    a = PostgresStore(PG_DSN, schema=pg_schema)
    b = PostgresStore(PG_DSN, schema=pg_schema)
    await a.open()
    await b.open()
    blocker = await asyncpg.connect(PG_DSN)
    try:
        await a.enqueue("web", [event(f"s{i}", f"u{i}") for i in range(25)])
        jobs = await a.lease("moe", 30, 30)
        await a.dead_letter([DeadLetter(j.id, "http_400") for j in jobs])
        ids = sorted(r.id for r in await a.list_dead(RecordFilter(), 100))
        async with blocker.transaction():
            await blocker.execute(f'SELECT 1 FROM "{pg_schema}".dead_letters WHERE id = $1 FOR UPDATE', ids[4])
            replay = asyncio.create_task(a.replay_dead(RecordFilter(ids=tuple(ids[:5]))))
            held_by = await blocker.fetchval("SELECT pg_backend_pid()")
            waiting = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))"
            while not await blocker.fetchval(waiting, held_by):  # the replay waits for the held record
                await asyncio.sleep(0.01)
            assert [j.message_id for j in await b.lease("moe", 10, 30)] == ["s0", "s1", "s2", "s3"]
        assert await replay == 5
        # Two replays and a purge at once, slice by slice: each record moved or purged once.
        rest = RecordFilter(ids=tuple(ids[5:]))
        moved = await asyncio.gather(a.replay_dead(rest), b.replay_dead(rest), b.purge_dead(RecordFilter()))
        assert sum(moved) == 20
        assert await a.list_dead(RecordFilter()) == []
        queued = [j.message_id for j in await a.lease("moe", 30, 30)]
        assert len(queued) == len(set(queued)) == 1 + moved[0] + moved[1]  # s4, and the replayed
    finally:
        await blocker.close()
        await a.close()
        await b.close()


async def test_opening_drops_the_old_index_of_delivered_jobs_by_message_id(pg_schema: str) -> None:
    """Earlier versions kept an index that every ack paid for; a store opened on such a
    schema drops it, and the audit lookup still answers."""
    store = PostgresStore(PG_DSN, schema=pg_schema)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        await conn.execute("CREATE INDEX jobs_delivered ON jobs (destination, message_id) WHERE state = 2")
        store = PostgresStore(PG_DSN, schema=pg_schema)
        await store.open()
        indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", pg_schema)
        assert "jobs_delivered" not in {r["indexname"] for r in indexes}
        await store.enqueue("web", [event("m1")])
        [job] = await store.lease("moe", 10, 30)
        await store.ack([job.id], "v7")
        assert await store.delivered_version("moe", "m1") == "v7"
        await store.close()
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def dedupe_locked(schema: str) -> AsyncIterator[None]:
    """The dedupe table locked by another connection, as a hung database holds it: every
    enqueue waits on it until the lock is gone."""
    locker = await asyncpg.connect(PG_DSN)
    tr = locker.transaction()
    await tr.start()
    try:
        await locker.execute(f'LOCK TABLE "{schema}".dedupe IN ACCESS EXCLUSIVE MODE')
        yield
    finally:
        await tr.rollback()
        await locker.close()


async def test_a_hung_database_fails_a_whole_group_within_one_timeout(pg_schema: str) -> None:
    """README: "on PostgreSQL every statement and every wait for a pooled connection is
    bounded by 10 s" (then ingest answers 429). A group that times out was committed
    again call by call, each waiting its own timeout: the n-th caller waited n+1."""
    store = PostgresStore(PG_DSN, schema=pg_schema, command_timeout=0.5)
    await store.open()
    await store.enqueue("web", [event("warm")])
    t0 = time.monotonic()
    waited: list[float] = []

    async def one(i: int) -> None:
        with pytest.raises(StoreError):
            await store.enqueue("web", [event(f"m{i}")])
        waited.append(time.monotonic() - t0)

    async with dedupe_locked(pg_schema):
        await asyncio.gather(*(one(i) for i in range(8)))
    try:
        assert max(waited) < 3.0, sorted(waited)  # one by one, 8 calls took 4.5 s
        # and the store works again once the database answers
        assert (await store.enqueue("web", [event("after")])).stored == 1
    finally:
        await store.close()


async def test_a_link_an_older_bridge_stored_under_a_long_raw_id_is_still_found(pg_schema: str) -> None:
    store = PostgresStore(PG_DSN, schema=pg_schema)
    await store.open()
    long_id = "u" * 1500  # indexable (< 2.7 KB), so a bridge before 6a5e24b stored it as it was
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(
            f'INSERT INTO "{pg_schema}".identity_links (namespace, from_id, to_id, updated_at)'
            " VALUES ('moe', $1, 't1', $2)",
            long_id,
            time.time(),
        )
    finally:
        await conn.close()
    try:
        assert await store.resolve_links("moe", [long_id]) == {long_id: "t1"}
        # a newer link learnt by this version wins over the old raw row
        await store.enqueue("web", [event("m1", long_id, links=(IdentityLink("moe", long_id, "t2"),))])
        assert await store.resolve_links("moe", [long_id]) == {long_id: "t2"}
    finally:
        await store.close()


async def test_a_schema_from_before_gains_the_discards_ordering_key_and_later_opens_take_no_lock(
    pg_schema: str,
) -> None:
    """The column is added where missing; where it is there, opening (a node's start, each
    CLI command) must not wait for readers of discards, as even a no-op ALTER would."""
    first = PostgresStore(PG_DSN, schema=pg_schema)
    await first.open()
    await first.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'ALTER TABLE "{pg_schema}".discards DROP COLUMN ordering_key')
        upgraded = PostgresStore(PG_DSN, schema=pg_schema)
        await upgraded.open()
        await upgraded.close()
        assert await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'discards' AND column_name = 'ordering_key'",
            pg_schema,
        )
        reader = conn.transaction()
        await reader.start()
        await conn.execute(f'SELECT * FROM "{pg_schema}".discards LIMIT 1')  # holds its share lock
        try:
            node = PostgresStore(PG_DSN, schema=pg_schema, command_timeout=2)
            await asyncio.wait_for(node.open(), 10)
            try:
                assert (await node.enqueue("web", [event("locked-1", "u1")])).stored == 1
            finally:
                await node.close()
        finally:
            await reader.rollback()
    finally:
        await conn.close()


async def test_a_schema_from_before_gains_the_delivered_outputs_columns(pg_schema: str) -> None:
    """A database made before jobs remembered their delivered outputs: its jobs lease as
    having delivered nothing, and a partly delivered one's record then survives a retry, a
    dead letter and its replay."""
    first = PostgresStore(PG_DSN, schema=pg_schema)
    await first.open()
    await first.enqueue("web", [event("o1", "alice"), event("o2", "bob")])
    await first.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        for table in ("jobs", "dead_letters", "discards"):
            await conn.execute(f'ALTER TABLE "{pg_schema}".{table} DROP COLUMN delivered_outputs')
        store = PostgresStore(PG_DSN, schema=pg_schema)
        await store.open()
        try:
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM information_schema.columns"
                    " WHERE table_schema = $1 AND column_name = 'delivered_outputs'",
                    pg_schema,
                )
                == 3
            )
            await check_outputs_survive(store)
        finally:
            await store.close()
    finally:
        await conn.close()


async def test_a_replay_leaves_what_is_dead_lettered_while_it_runs(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay goes in slices, each its own statement: a record added while it runs (a
    replayed job dead-lettered again by a destination still refusing) was picked up by a
    later slice, so one replay could send the same refused events round and round. It
    stops at the highest id there was when it started, as one statement would have."""
    monkeypatch.setattr("bridge.store.postgres.RECORD_SLICE", 3)

    class Replaying(PostgresStore):
        hook: Callable[[], Awaitable[None]] | None = None

        @contextlib.asynccontextmanager
        async def _conn(self, transaction: bool = False, *, ingest: bool = False) -> AsyncIterator[asyncpg.Connection]:
            async with super()._conn(transaction, ingest=ingest) as conn:
                yield conn
            hook, self.hook = self.hook, None
            if hook is not None:
                await hook()  # once, after the replay's first statement

    a = Replaying(PG_DSN, schema=pg_schema, pool_size=4)
    b = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4)
    await a.open()
    await b.open()
    try:
        await a.enqueue("web", [event(f"d{i}", f"u{i}") for i in range(7)])
        jobs = await a.lease("moe", 10, 30)
        *refused, late = jobs
        await a.dead_letter([DeadLetter(j.id, "http_400") for j in refused])

        async def dead_letter_late() -> None:
            await b.dead_letter([DeadLetter(late.id, "http_400")])

        a.hook = dead_letter_late
        assert await a.replay_dead(RecordFilter(reason="http_400")) == 6
        assert [r.message_id for r in await a.list_dead(RecordFilter())] == ["d6"]
        assert sorted(j.message_id for j in await a.lease("moe", 10, 30)) == [f"d{i}" for i in range(6)]
    finally:
        await a.close()
        await b.close()


async def test_a_failover_with_no_writable_host_yet_is_a_store_error(pg_schema: str, pg_role: str) -> None:
    """target_session_attrs=read-write in the URL (asyncpg's, passed on as README says), as
    one naming a primary and its standbys has: mid-failover, when the old primary's
    connections are gone and no host takes writes yet, the driver raises its own
    TargetServerAttributeNotMatched, neither a PostgresError nor an InterfaceError. It went
    past ingest's 429 store_unavailable as a 500 (and past /readyz, the admin API's 503)."""
    url = f"postgresql://{pg_role}@127.0.0.1:5432/test?target_session_attrs=read-write"
    store = PostgresStore(url, schema=pg_schema, pool_size=2, command_timeout=2)
    await store.open()
    admin = await asyncpg.connect(PG_DSN)
    try:
        assert (await store.enqueue("web", [event("before")])).stored == 1
        # The only host now refuses writes, and the connections the bridge had are cut.
        await admin.execute(f"ALTER ROLE {pg_role} SET default_transaction_read_only = on")
        await end_connections(pg_role)
        refusals = []
        for i in range(4):  # on the connection that was cut, then on new ones, which no host is fit for
            with pytest.raises(StoreError) as refused:
                await store.enqueue("web", [event(f"during-{i}")])
            refusals.append(str(refused.value))
        assert "target attribute" in refusals[-1], refusals
        with pytest.raises(StoreError, match="target attribute"):
            await store.check_writable()  # /readyz: 503 not ready, not a 500
        await admin.execute(f"ALTER ROLE {pg_role} RESET default_transaction_read_only")
        assert (await store.enqueue("web", [event("after")])).stored == 1
    finally:
        await admin.close()
        await store.close()


async def test_a_role_given_a_schema_of_its_own_opens_the_store_in_it(pg_schema: str, pg_role: str) -> None:
    """A database owned by someone else, and a schema made for the bridge's role by its
    owner (CREATE SCHEMA ... AUTHORIZATION), the role with no CREATE on the database: every
    node failed to start, "permission denied for database", at CREATE SCHEMA IF NOT EXISTS,
    which asks for that privilege even when the schema is there."""
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f"REVOKE CREATE ON DATABASE test FROM {pg_role}")
        await admin.execute(f'CREATE SCHEMA "{pg_schema}" AUTHORIZATION {pg_role}')
    finally:
        await admin.close()
    nodes = [
        PostgresStore(f"postgresql://{pg_role}@127.0.0.1:5432/test", schema=pg_schema, pool_size=2) for _ in range(2)
    ]
    try:
        opened = await asyncio.gather(*(node.open() for node in nodes), return_exceptions=True)
        assert opened == [None, None]
        assert (await nodes[0].enqueue("web", [event("m1")])).stored == 1
        assert (await nodes[1].enqueue("web", [event("m1")])).duplicates == 1
    finally:
        for node in nodes:
            await node.close()


class Measured(PostgresStore):
    """A store that counts its measurements of its size (store.max_bytes)."""

    measures = 0

    async def _measure(self, limit: int) -> str | None:
        self.measures += 1
        return await super()._measure(limit)


async def test_a_hung_database_fails_the_calls_waiting_for_one_size_check_with_it(pg_schema: str) -> None:
    """With store.max_bytes, each call first checks the store's size, one check at a time.
    When the database hangs, a check fails after command_timeout, and each call that waited
    for it checked again, and waited as long: the n-th waited n timeouts for its 429
    (8 calls, 4 s at 0.5 s), where README promises 10 s. The calls that waited for a
    check that failed fail with it."""
    store = Measured(PG_DSN, schema=pg_schema, command_timeout=0.5, max_bytes=10**12, size_check_interval=0.0)
    await store.open()
    await store.enqueue("web", [event("warm")])
    store.measures = 0
    async with dedupe_locked(pg_schema):
        calls = [store.enqueue("web", [event(f"m{i}")]) for i in range(8)]
        refused = await asyncio.gather(*calls, return_exceptions=True)
    try:
        assert [type(r) for r in refused] == [StoreError] * 8, refused
        assert store.measures == 1
        # and the next call checks again, and is stored once the database answers
        assert (await store.enqueue("web", [event("after")])).stored == 1
        assert store.measures == 2
    finally:
        await store.close()


async def test_ingest_commits_durably_where_the_database_says_synchronous_commit_off(
    pg_schema: str, pg_role: str
) -> None:
    """README: "Acknowledged means durable." With synchronous_commit off (here the role's;
    the server's or the database's alike, set for speed), PostgreSQL answers a COMMIT before
    it is flushed: a crash of the database then loses events already acknowledged. Ingest's
    commits must be flushed whatever the default; the other work keeps it."""
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f"ALTER ROLE {pg_role} SET synchronous_commit = off")
    finally:
        await admin.close()
    store = PostgresStore(f"postgresql://{pg_role}@127.0.0.1:5432/test", schema=pg_schema, pool_size=2)
    await store.open()
    try:
        assert (await store.enqueue("web", [event("m1")])).stored == 1
        async with store._conn(ingest=True) as conn:
            assert await conn.fetchval("SELECT current_setting('synchronous_commit')") == "on"
        async with store._conn() as conn:
            assert await conn.fetchval("SELECT current_setting('synchronous_commit')") == "off"
    finally:
        await store.close()


async def test_a_store_that_fails_to_open_leaves_no_pool_open(
    pg_schema: str, pg_role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening makes two pools, the shared one and ingest's own: a failure after the second
    was made (here its check of synchronous_commit) closes both, not the first alone, or its
    connection stayed open for the life of the process."""
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f"ALTER ROLE {pg_role} SET synchronous_commit = off")
    finally:
        await admin.close()
    made: list[Any] = []
    failing: list[Any] = []
    create, acquire = PostgresStore._create_pool, asyncpg.pool.Pool.acquire

    async def recorded(self: PostgresStore, size: int, **settings: str) -> Any:
        pool = await create(self, size, **settings)
        made.append(pool)
        if settings.get("synchronous_commit") == "on":  # ingest's: its check then fails
            failing.append(pool)
        return pool

    def acquire_or_fail(pool: Any, *args: Any, **kwargs: Any) -> Any:
        if pool in failing:
            raise OSError("the database went away")
        return acquire(pool, *args, **kwargs)

    monkeypatch.setattr(PostgresStore, "_create_pool", recorded)
    monkeypatch.setattr(asyncpg.pool.Pool, "acquire", acquire_or_fail)
    store = PostgresStore(f"postgresql://{pg_role}@127.0.0.1:5432/test", schema=pg_schema, pool_size=2)
    with pytest.raises(StoreError):
        await store.open()
    assert len(made) == 2
    assert all(pool.is_closing() for pool in made)
