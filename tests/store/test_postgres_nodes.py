"""Several nodes on one PostgreSQL database when timing goes wrong: a lease that lapses while
its holder settles, a node that stops answering mid-transaction, two nodes storing the same
events in different orders."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import asyncpg
import pytest

import bridge.store.postgres as postgres
from bridge.store.base import DeadLetter, Discard, IdentityLink, Job, RecordFilter, StoreError
from bridge.store.postgres import PostgresStore
from tests.store.conftest import PG_DSN, pg_problem
from tests.store.helpers import event

pytestmark = pytest.mark.skipif(pg_problem() is not None, reason=str(pg_problem()))


@pytest.fixture
async def nodes(pg_schema: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two bridge nodes sharing one schema, with a short command timeout (still longer than
    PostgreSQL's deadlock_timeout, 1 s, so a deadlock shows as one)."""
    a = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4, command_timeout=2.0)
    b = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4, command_timeout=2.0)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def _lapsed_lease(a: PostgresStore) -> Job:
    """One job leased by ``a`` whose lease has already run out."""
    await a.enqueue("web", [event("lapsed-1", "u1")])
    (job,) = await a.lease("moe", 10, 0.05)
    await asyncio.sleep(0.1)
    return job


@pytest.mark.parametrize("settle", ["dead_letter", "discard"])
async def test_a_lease_lapsing_while_its_holder_settles_leaves_the_job_in_one_place(
    nodes: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch, settle: str
) -> None:
    """Dead-lettering (or discarding) copies the job out, then deletes it, fenced. Another
    node that leases the lapsed job between the two statements made the fence miss the
    delete only: the job was then both a dead letter and leased for delivery (a replay
    would send it twice), or a discard that was delivered anyway."""
    a, b = nodes
    job = await _lapsed_lease(a)
    leased_meanwhile: list[Job] = []
    delete_settled = postgres._delete_settled

    async def other_node_leases_first(conn: Any, job_ids: Any, fence: Any) -> None:
        # Node B leases between the copy and the delete. If the copy holds the row, B
        # waits for this transaction instead (bounded here, so the test cannot hang).
        lease = asyncio.ensure_future(b.lease("moe", 10, 30))
        done, _ = await asyncio.wait({lease}, timeout=0.5)
        if done:
            leased_meanwhile.extend(lease.result())
        else:
            pending.append(lease)
        await delete_settled(conn, job_ids, fence)

    pending: list[asyncio.Future[list[Job]]] = []
    monkeypatch.setattr(postgres, "_delete_settled", other_node_leases_first)
    fence = {job.id: job.attempts}
    if settle == "dead_letter":
        await a.dead_letter([DeadLetter(job.id, "http_400")], fence=fence)
        recorded = len(await a.list_dead(RecordFilter()))
    else:
        await a.discard([Discard(job.id, "anonymous_user")], fence=fence)
        recorded = len(await a.list_discards(RecordFilter()))
    for lease in pending:
        leased_meanwhile.extend(await lease)

    queued = (await a.queue_stats()).get("moe")
    in_queue = queued.depth if queued is not None else 0
    # Either the settle won (recorded, gone from the queue, not leased again) or the
    # other node did (leased, nothing recorded): never both.
    assert (recorded, in_queue, len(leased_meanwhile)) in ((1, 0, 0), (0, 1, 1)), (recorded, in_queue)


async def test_a_node_stalled_mid_lease_does_not_stop_the_others_leasing(
    nodes: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ordered lease holds its destination's advisory lock until its transaction ends.
    A node that stops mid-transaction (a partition, a paused VM or process) kept it for as
    long as the database kept the session: hours, until TCP keepalive gave up; meanwhile
    no node could lease for that destination. The database now ends such a transaction
    once it has been idle for the command timeout."""
    a, b = nodes
    await a.enqueue("web", [event("stalled-1", "u1")])
    stalled = asyncio.Event()

    async def stall(*args: Any) -> list[int]:
        stalled.set()
        await asyncio.Event().wait()  # never: this node stops answering, lock held
        return []

    monkeypatch.setattr(a, "_due_ids_ordered", stall)
    stuck = asyncio.create_task(a.lease("moe", 10, 30))
    try:
        await stalled.wait()
        leased: list[Job] = []
        deadline = asyncio.get_running_loop().time() + 6
        while not leased and asyncio.get_running_loop().time() < deadline:
            try:
                leased = await b.lease("moe", 10, 30)
            except StoreError:  # waited a command timeout for the lock
                continue
        assert [j.message_id for j in leased] == ["stalled-1"]
    finally:
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await stuck


@pytest.mark.parametrize("held", ["dedupe", "identity_links"])
async def test_two_nodes_storing_keys_in_different_orders_do_not_deadlock(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str, held: str
) -> None:
    """Clients that batch again on retry (analytics.js, the mobile SDKs), or two nodes' group
    commits joining the same retried requests in other orders, insert one set of dedupe keys
    in two orders; two users' events learn one alias pair in two orders. Each node then held
    a key the other waited for, and PostgreSQL broke the deadlock by failing one: a 503 for
    events nothing was wrong with. A third session holding one key lines both nodes up
    behind it, so each round gives the deadlock its chance."""
    a, b = nodes
    blocker = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        for i in range(10):
            x, y = IdentityLink("moe", f"x-{i}", f"user-{i}"), IdentityLink("moe", f"y-{i}", f"user-{i}")
            if held == "dedupe":  # the same two events
                on_a, on_b = [event(f"x-{i}"), event(f"y-{i}")], [event(f"y-{i}"), event(f"x-{i}")]
                hold = "INSERT INTO dedupe (source, message_id, seen_at) VALUES ('web', $1, 0)"
            else:  # two events, each learning the same two links
                on_a, on_b = [event(f"a-{i}", links=(x, y))], [event(f"b-{i}", links=(y, x))]
                hold = "INSERT INTO identity_links (namespace, from_id, to_id, updated_at) VALUES ('moe', $1, '', 0)"
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute(hold, f"x-{i}")
            first = asyncio.create_task(a.enqueue("web", on_a))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(b.enqueue("web", on_b))
            await asyncio.sleep(0.05)
            await holding.rollback()
            results = await asyncio.gather(first, second)
            assert sum(r.stored for r in results) == 2
    finally:
        await blocker.close()


async def test_an_ack_erasing_several_users_links_does_not_deadlock_with_ingest(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str
) -> None:
    """An ack with two deletions erased their links one deletion after the other: each
    deletion's rows in order, but the second's before the first's. Ingest learning both
    links takes them in byte order (LINKS_SQL): the ack held b-id and waited for a-id, ingest
    held a-id and waited for b-id, and PostgreSQL failed one of them. Here a session holds
    a-id as ingest would, then takes b-id once the ack waits for it."""
    a, _ = nodes
    learnt = (IdentityLink("moe", "a-id", "crm-a"), IdentityLink("moe", "b-id", "crm-b"))
    await a.enqueue("web", [event("learn", "a-id", links=learnt)])
    await a.enqueue("web", [event("del-b", "b-id"), event("del-a", "a-id")])
    jobs = {j.message_id: j for j in await a.lease("moe", 10, 30)}
    erase = {jobs["del-b"].id: ["b-id"], jobs["del-a"].id: ["a-id"]}
    # Re-learnt after the deletions were stored: kept.
    await ack_beside_ingest(pg_schema, a.ack(list(erase), erase_links=erase), relearn=("b-id", "crm-b2"))
    assert await a.resolve_links("moe", ["a-id", "b-id"]) == {"b-id": "crm-b2"}


async def ack_beside_ingest(pg_schema: str, ack: Coroutine[Any, Any, None], relearn: tuple[str, str]) -> None:
    """Run ``ack`` while a session holds link a-id as ingest would (LINKS_SQL takes its rows
    in byte order), and once the ack waits for it, have that session learn ``relearn``
    (from, to) too, then commit: a deadlock fails one of the two."""
    ingest = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        learning = ingest.transaction()
        await learning.start()
        await ingest.execute("SELECT 1 FROM identity_links WHERE namespace = 'moe' AND from_id = 'a-id' FOR UPDATE")
        acking = asyncio.create_task(ack)
        me = await ingest.fetchval("SELECT pg_backend_pid()")
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
        while not await ingest.fetchval(blocked, me):
            assert not acking.done(), acking
            await asyncio.sleep(0.01)
        await ingest.execute(
            "INSERT INTO identity_links (namespace, from_id, to_id, updated_at) VALUES ('moe', $1, $2, 1e12)"
            " ON CONFLICT (namespace, from_id) DO UPDATE SET to_id = excluded.to_id, updated_at = excluded.updated_at",
            *relearn,
        )
        await learning.commit()
        await acking
    finally:
        await ingest.close()


async def _dead_letters(store: PostgresStore, prefix: str, user: str, count: int) -> None:
    await store.enqueue("web", [event(f"{prefix}-{i}", user) for i in range(count)])
    jobs = await store.lease("moe", count, 30)
    await store.dead_letter([DeadLetter(j.id, "http_400") for j in jobs], fence={j.id: j.attempts for j in jobs})


async def test_a_replay_by_ids_does_not_deadlock_with_a_deletion_erasing_the_same_user(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str
) -> None:
    """A delivered deletion erases its user's dead letters locking them in id order; a replay
    (or purge) locked its slice in its plan's order, which for a replay by ids read the table
    as it lies on disk, where a newer dead letter can sit in the space an older purge freed.
    The replay held u's newer rows and waited for the older ones the ack held, the ack waited
    for the newer ones, and PostgreSQL failed the replay. Here a session holds one of u's
    older rows so that the ack waits part-way, and the replay starts then."""
    a, b = nodes
    await _dead_letters(a, "filler", "f", 300)
    await _dead_letters(a, "u-old", "u", 20)
    await _dead_letters(a, "o", "o", 3000)
    session = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        assert await a.purge_dead(RecordFilter(ids=tuple(range(1, 301)))) == 300
        await session.execute("VACUUM dead_letters")
        await _dead_letters(a, "u-new", "u", 20)  # into the space the purge freed
        await session.execute("ANALYZE dead_letters")
        users = [r[0] for r in await session.fetch("SELECT id FROM dead_letters WHERE ordering_key = 'u' ORDER BY id")]
        others = [r[0] for r in await session.fetch("SELECT id FROM dead_letters WHERE ordering_key = 'o' LIMIT 10")]
        await a.enqueue("web", [event("del-u", "u")])
        (deletion,) = await a.lease("moe", 10, 30)
        holding = session.transaction()
        await holding.start()
        await session.execute("SELECT 1 FROM dead_letters WHERE id = $1 FOR UPDATE", users[5])
        me = await session.fetchval("SELECT pg_backend_pid()")
        blocked_by = "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
        ack = asyncio.create_task(a.ack([deletion.id], erase_links={deletion.id: ["u"]}))
        while (acking := await session.fetchval(blocked_by, me)) is None:
            assert not ack.done(), ack
            await asyncio.sleep(0.01)
        replay = asyncio.create_task(b.replay_dead(RecordFilter(ids=tuple(users + others))))
        while await session.fetchval(blocked_by, acking) is None:
            assert not replay.done(), replay
            await asyncio.sleep(0.01)
        await holding.rollback()
        await ack
        assert await replay == len(others)  # u's were erased first; none of the others lost
        assert await session.fetchval("SELECT count(*) FROM dead_letters WHERE ordering_key = 'u'") == 0
        assert await session.fetchval("SELECT count(*) FROM jobs WHERE ordering_key = 'o' AND state = 0") == 10
    finally:
        await session.close()


async def test_an_ack_erasing_several_users_records_does_not_deadlock_with_a_replay(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str
) -> None:
    """An ack with two deletions erased one user's dead letters, then the other's: each in
    id order, but the second's lower ids after the first's higher ones. A replay takes them
    all in id order: it held the second user's first dead letter and waited for the first
    user's, which the ack held while it waited for the second's. Here a session holds the
    first user's discard, so that the ack waits between the two users, and the replay starts then."""
    a, b = nodes
    for i, user in enumerate(("u2", "u1", "u2", "u1")):
        await _dead_letters(a, f"dead-{i}", user, 1)
    await a.enqueue("web", [event("discarded-u1", "u1")])
    (discarded,) = await a.lease("moe", 10, 30)
    await a.discard([Discard(discarded.id, "anonymous_user")])
    await a.enqueue("web", [event("del-u1", "u1"), event("del-u2", "u2")])
    jobs = {j.message_id: j for j in await a.lease("moe", 10, 30)}
    erase = {jobs["del-u1"].id: ["u1"], jobs["del-u2"].id: ["u2"]}
    session = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        holding = session.transaction()
        await holding.start()
        await session.execute("SELECT 1 FROM discards FOR UPDATE")
        me = await session.fetchval("SELECT pg_backend_pid()")
        blocked_by = "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
        ack = asyncio.create_task(a.ack(list(erase), erase_links=erase))
        while (acking := await session.fetchval(blocked_by, me)) is None:
            assert not ack.done(), ack
            await asyncio.sleep(0.01)
        replay = asyncio.create_task(b.replay_dead(RecordFilter(destination="moe")))
        while await session.fetchval(blocked_by, acking) is None:
            assert not replay.done(), replay
            await asyncio.sleep(0.01)
        await holding.rollback()
        await ack
        assert await replay == 0  # every one of them was the deleted users'
        assert await session.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await session.fetchval("SELECT count(*) FROM discards") == 0
    finally:
        await session.close()


@pytest.mark.parametrize("table", ["jobs", "dedupe", "dead_letters", "discards"])
async def test_opening_a_store_does_not_queue_behind_a_long_write(pg_schema: str, table: str) -> None:
    """Every open (a node's start, each CLI command) ran CREATE INDEX IF NOT EXISTS, which
    takes its table's SHARE lock even when the index is there: it waited for any long write
    (`bridge dlq replay` of a large DLQ, a big purge), and every other node's ingest, leases
    and settles queued behind it, answering 503 until the write ended."""
    node = PostgresStore(PG_DSN, schema=pg_schema, command_timeout=2.0)
    await node.open()
    writer = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        async with writer.transaction():
            await writer.execute(f"DELETE FROM {table} WHERE false")  # holds ROW EXCLUSIVE to the end
            cli = PostgresStore(PG_DSN, schema=pg_schema, create=False, command_timeout=2.0)
            opening = asyncio.create_task(cli.open())
            try:
                await asyncio.sleep(0.2)
                assert (await node.enqueue("web", [event("during-open", "u1")])).stored == 1
                await asyncio.wait_for(opening, 5)
            finally:
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreError):
                    await opening
                await cli.close()
    finally:
        await writer.close()
        await node.close()


async def test_an_ack_merging_and_erasing_does_not_deadlock_with_ingest(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str
) -> None:
    """An ack with a merge and a deletion wrote the merge's links, then erased the deleted
    user's: two passes, each in byte order, but the merge's rows (m-x) held while waiting
    for a lower one of the deletion's (a-id). Ingest learning both links takes them in
    byte order (LINKS_SQL): it held a-id and waited for m-x, and PostgreSQL failed one of
    them (a 503 for events nothing was wrong with, or an ack that failed and sent its
    batch again). Here a session holds a-id as ingest would, then takes m-x once the ack
    waits for it."""
    a, _ = nodes
    learnt = (IdentityLink("moe", "a-id", "crm-a"), IdentityLink("moe", "m-x", "old-1"))
    await a.enqueue("web", [event("learn", "a-id", links=learnt)])
    await a.enqueue("web", [event("alias", "new-1"), event("del-a", "a-id")])
    jobs = {j.message_id: j for j in await a.lease("moe", 10, 30)}
    merge = {jobs["alias"].id: [("old-1", "new-1")]}
    erase = {jobs["del-a"].id: ["a-id"]}
    # Re-learnt after the merge was stored: kept.
    acking = a.ack([*merge, *erase], merge_links=merge, erase_links=erase)
    await ack_beside_ingest(pg_schema, acking, relearn=("m-x", "crm-x"))
    assert await a.resolve_links("moe", ["a-id", "m-x", "old-1"]) == {"m-x": "crm-x", "old-1": "new-1"}


class _EraseAfterReading:
    """A merge's connection that, once the merge has read its links, has another node ack
    a deletion, and waits until that ack is done or waits for the merge."""

    def __init__(self, conn: Any, erase: Coroutine[Any, Any, None], watcher: asyncpg.Connection) -> None:
        self._conn = conn
        self._erase = erase
        self._watcher = watcher
        self.erasing: asyncio.Task[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        rows = await self._conn.fetch(query, *args)
        if "FROM identity_links" in query and self.erasing is None:
            self.erasing = asyncio.create_task(self._erase)
            blocked = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
            merging = self._conn.get_server_pid()
            while not self.erasing.done() and not await self._watcher.fetchval(blocked, merging):
                await asyncio.sleep(0.01)
        return rows


async def test_a_deletion_acked_by_another_node_during_a_merge_is_not_undone(
    nodes: tuple[PostgresStore, PostgresStore], pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge read its links without locks, then wrote what it planned from them. Another
    node's ack of a deletion that erased one of them in between (dev's link to old, dev
    deleted) had it written back, moved to the retained user: a deleted user's link
    restored. Here node B acks the deletion just after node A's merge has read; the merge
    and the erasure now go one after the other, and dev keeps no link either way."""
    a, b = nodes
    await a.enqueue("web", [event("learn", "dev", links=(IdentityLink("moe", "dev", "old"),))])
    await asyncio.sleep(0.01)  # the deletion is stored after the link, the alias after both
    await a.enqueue("web", [event("del-dev", "dev")])
    await asyncio.sleep(0.01)
    await a.enqueue("web", [event("alias", "new")])
    jobs = {j.message_id: j for j in await a.lease("moe", 10, 30)}
    deletion, alias = jobs["del-dev"], jobs["alias"]
    await a.ack([jobs["learn"].id])
    watcher = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        erase = b.ack([deletion.id], fence={deletion.id: deletion.attempts}, erase_links={deletion.id: ["dev", "old"]})
        interleaved = _EraseAfterReading(None, erase, watcher)
        merge_links = postgres._merge_links

        async def merge_while_erasing(conn: Any, links: Any) -> None:
            interleaved._conn = conn
            await merge_links(interleaved, links)

        monkeypatch.setattr(postgres, "_merge_links", merge_while_erasing)
        await a.ack([alias.id], fence={alias.id: alias.attempts}, merge_links={alias.id: [("old", "new")]})
        assert interleaved.erasing is not None
        await interleaved.erasing
    finally:
        await watcher.close()
    assert await a.resolve_links("moe", ["dev", "old", "new"]) == {"old": "new"}


async def test_ingest_is_not_refused_while_every_lease_waits_for_a_lock(pg_schema: str) -> None:
    """A node stalled mid-lease holds its destinations' lease locks until the database ends
    its session; meanwhile the other nodes' delivery loops wait for them, each holding a
    pooled connection. They took every connection of the pool, and ingest, which needs one
    for its group commit, was refused (429 store_unavailable) for as long, though nothing
    it does waits for those locks. Group commit has a connection of its own."""
    store = PostgresStore(PG_DSN, schema=pg_schema, pool_size=4, command_timeout=5.0)
    await store.open()
    stalled = await asyncpg.connect(PG_DSN)  # the stalled node, its transaction left open
    leases: list[asyncio.Task[list[Job]]] = []
    try:
        await stalled.execute("BEGIN")
        await stalled.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{pg_schema}:moe")
        leases = [asyncio.create_task(store.lease("moe", 10, 30)) for _ in range(6)]
        pool = store._pool
        while pool.get_idle_size() or pool.get_size() < pool.get_max_size():
            await asyncio.sleep(0.01)  # until the waiting leases hold every connection
        stored = asyncio.create_task(store.enqueue("web", [event("during")]))
        done, _ = await asyncio.wait([stored, *leases], return_when=asyncio.FIRST_COMPLETED)
        assert stored in done, "ingest waited for the leases' connections"
        assert stored.result().stored == 1
    finally:
        await stalled.close()  # the database ends the stalled session: the leases go on
        await asyncio.gather(*leases, return_exceptions=True)
        await store.close()
