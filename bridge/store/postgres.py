"""The scale-out store: PostgreSQL through asyncpg, shared by several bridge nodes.

Same job model as the SQLite store. What makes it safe with several nodes:
* dedupe is ``INSERT ... ON CONFLICT DO NOTHING`` (see ``postgres_ingest``);
* unordered leases pick rows ``FOR UPDATE SKIP LOCKED``;
* ordered leases take a transaction-scoped advisory lock per destination, so leases
  for one destination are serialised across nodes and the per-user check sees every
  other node's leases: two nodes never deliver one user's events out of order;
* every time the store writes or compares (leases, retries, settles) is on the
  database's clock, not the node's (``now``): a node whose clock runs ahead would take
  leases that have not expired, one behind would hand out leases that expire at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson
import structlog

from bridge.store.base import (
    DEAD_LETTER_COLUMNS,
    MAKE_DUE_STEP,
    RECORD_SLICE,
    DeadLetter,
    DeadLetterRecord,
    Delivered,
    DestinationState,
    Discard,
    DiscardRecord,
    EnqueueResult,
    ErasedLinks,
    Fence,
    IdentityLink,
    IncomingEvent,
    Job,
    MergedLinks,
    QueueStats,
    RecordFilter,
    Store,
    StoreError,
    StoreFull,
    dead_letter_record,
)
from bridge.store.merge_links import LinkRow, link_steps, merges_of, plan_merges
from bridge.store.ordering import KEY_SEPARATOR, OrderedSelection
from bridge.store.postgres_ingest import GroupCommitter
from bridge.store.postgres_schema import (
    ADDED_COLUMNS,
    DDL,
    DDL_LOCK,
    DELIVERED,
    DIGEST_MARK,
    LATE_DDL,
    LEASED,
    QUEUED,
    SCHEMA_VERSION,
    check_schema_name,
    link_key,
    schema_error,
)
from bridge.store.sql_filters import dollar, record_where

Connection = Any  # asyncpg.Connection (asyncpg ships no type hints)
_Settle = TypeVar("_Settle", DeadLetter, Discard)


log = structlog.get_logger(__name__)

DDL_TIMEOUT = 600.0
# How often a node measures its clock against the database's, and the gap worth a warning.
CLOCK_CHECK_SECONDS = 60.0
CLOCK_WARN_SECONDS = 1.0
# Rows deleted per prune statement: small enough to finish well inside command_timeout.
PRUNE_SLICE = 10_000

_CREATE_INDEX = re.compile(r"\s*CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+) ")

_JOB_COLUMNS = (
    "id, source, message_id, ordering_key, payload, attempts, created_at, first_attempt_at, delivered_outputs"
)


# The driver's own failures, which are neither PostgresError nor InterfaceError: a
# connection the server ended (a restart, a failover, pg_terminate_backend) whose end the
# driver has read only in part ("cannot switch to state ...; another operation is in
# progress", until it sees the close), no host of the URL fit for its target_session_attrs
# (mid-failover, none writable yet), a stream it cannot read. The database is away for
# now, as when unreachable: 429 store_unavailable, not a 500 with a traceback.
_DRIVER_FAILURES = asyncpg.exceptions.InternalClientError


def to_store_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(
        exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | asyncio.TimeoutError | _DRIVER_FAILURES
    ):
        # A timeout's text is empty ("postgres: " in a log says nothing): name it.
        return StoreError(f"postgres: {str(exc) or type(exc).__name__}")
    return exc


def unavailable(exc: BaseException) -> bool:
    """The database did not answer in time or the connection failed, as opposed to one
    statement's data being refused: retrying each call of a group alone would make the
    last caller wait a ``command_timeout`` per call before its refusal (429 store_unavailable)."""
    return isinstance(
        exc,
        asyncio.TimeoutError
        | OSError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.OperatorInterventionError  # query_canceled (statement_timeout), shutdown
        | asyncpg.exceptions.PostgresConnectionError
        | asyncpg.exceptions.InsufficientResourcesError  # disk full, out of memory, too many connections
        | _DRIVER_FAILURES,
    )


def _count(status: str) -> int:
    """Rows affected, from a command tag such as 'INSERT 0 3' or 'DELETE 2'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


# Leases are timed by the database's clock itself, read in their own statements: ``now``
# (this node's clock corrected by an offset measured every CLOCK_CHECK_SECONDS) went wrong
# by as much as the node's clock stepped between two measurements (NTP correcting a resumed
# VM), for up to a minute, when it would read other nodes' live leases as expired.
# The start of the statement (one value throughout it):
_DB_NOW = "extract(epoch FROM statement_timestamp())::float8"
# An ordered lease's: its destination's lock taken first (the time after the wait for it).
_LOCKED_NOW = (
    "WITH locked AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended($1, 0)))"
    " SELECT extract(epoch FROM clock_timestamp())::float8 FROM locked"
)


# Settles join the jobs with (id, attempts as leased) rows; a NULL count means no fence.
_FENCE_ROWS = "unnest($1::bigint[], $2::int[]) AS f(id, leased)"
_FENCED = "j.id = f.id AND (f.leased IS NULL OR j.attempts = f.leased)"


def _fence_arrays(job_ids: Sequence[int], fence: Fence | None) -> tuple[list[int], list[int | None]]:
    ids = list(job_ids)
    return ids, [fence.get(i) if fence is not None else None for i in ids]


async def _record_delivered(
    conn: Connection, job_ids: Sequence[int], fence: Fence | None, delivered: Delivered | None
) -> None:
    """Keep with each partly delivered job of ``job_ids`` the outputs it has delivered so
    far. Run before the settle's own statement (in its transaction), which may change the
    count a fence checks."""
    if not delivered:
        return
    ids = [i for i in job_ids if delivered.get(i)]
    if not ids:
        return
    await conn.execute(
        "UPDATE jobs j SET delivered_outputs = f.digests"
        " FROM unnest($1::bigint[], $2::int[], $3::bytea[]) AS f(id, leased, digests)"
        f" WHERE j.state = {LEASED} AND {_FENCED}",
        *_fence_arrays(ids, fence),
        [delivered[i] for i in ids],
    )


# Dead-lettering and discarding copy the jobs out, then delete them (``_delete_settled``).
# The copy locks the rows it reads: otherwise a lease that lapsed meanwhile could be taken
# by another node between the two statements, and the delete's fence then misses a job
# that was already copied, which is then both recorded and delivered. Locked, that node
# waits, and finds the job gone (or, if it leased first, the copy finds the fence moved on).
_HOLD_SETTLED = "FOR UPDATE OF j"


async def _delete_settled(conn: Connection, job_ids: Sequence[int], fence: Fence | None) -> None:
    """Drop the jobs just copied (and locked) out: the same match, in the same transaction."""
    await conn.execute(
        f"DELETE FROM jobs j USING {_FENCE_ROWS} WHERE j.state < {DELIVERED} AND {_FENCED}",
        *_fence_arrays(job_ids, fence),
    )


def _first_per_job(entries: Sequence[_Settle]) -> list[_Settle]:
    """One entry per job, the first, in the caller's order (one statement may not move a row twice)."""
    seen: dict[int, _Settle] = {}
    for entry in entries:
        seen.setdefault(entry.job_id, entry)
    return list(seen.values())


async def _run_ddl(conn: Connection, statements: Sequence[str], present: Collection[str]) -> None:
    """Run the schema ``statements``, but not an index's that ``present`` (the schema's
    relations) already holds."""
    for statement in statements:
        index = _CREATE_INDEX.match(statement)
        if index is not None and index.group(1) in present:
            # Even when the index is there, CREATE INDEX IF NOT EXISTS takes its table's
            # SHARE lock (held to the end of this transaction): it would wait for any long
            # write (a replay, a purge), and every node's ingest and delivery would queue
            # behind it.
            continue
        # Schema changes (an index on a big table, waiting for another node's migration
        # lock) may take longer than a queue statement should.
        await conn.execute(statement, timeout=DDL_TIMEOUT)


# A merge reads its links, then writes what it planned from them: a deletion's erasure that
# another node committed in between was undone (the link from the deleted user's id to the
# merged id written back, moved to the retained id). So a merge takes this schema's lock
# exclusively, and an erasure shared (erasures do not conflict with each other): no erasure
# falls between a merge's read and write, and the merge reads what one before it left.
# Taken in each one's first statement, which reads the acked jobs (not one query more), when
# the transaction holds no link, dead letter or discard: waiting for it, a transaction holds
# only the jobs its ack marked delivered, which the lock's holder, past that first
# statement, never waits for. So it adds no deadlock. Ingest takes no such lock (its links
# are newer than any a merge plans to write: the merge's write keeps them, below).
_LINKS_LOCK = "hashtextextended(current_schema(), 1)"  # seed 1: apart from ordered leases' keys (seed 0)
_DELIVERED_JOBS = (
    "WITH serialized AS ({lock}) SELECT id, destination, created_at FROM jobs, serialized"
    f" WHERE id = ANY($1::bigint[]) AND state = {DELIVERED}"
)
_MERGING_JOBS = _DELIVERED_JOBS.format(lock=f"SELECT pg_advisory_xact_lock({_LINKS_LOCK})")
_ERASING_JOBS = _DELIVERED_JOBS.format(lock=f"SELECT pg_advisory_xact_lock_shared({_LINKS_LOCK})")


async def _merge_links(conn: Connection, merge_links: MergedLinks) -> None:
    """Store.ack's ``merge_links``, in the ack's transaction, for the jobs now delivered."""
    stored = await conn.fetch(_MERGING_JOBS, list(merge_links))
    clean = {job_id: [(_text(a), _text(b)) for a, b in pairs] for job_id, pairs in merge_links.items()}
    merges = merges_of(((r[0], r[1], r[2]) for r in stored), clean)
    if not merges:
        return
    merged = list({m.merged for m in merges})
    # Read without row locks: the write below takes its rows in ingest's order (LINKS_SQL),
    # so the two cannot deadlock, and it changes only a row still as read (or older) here.
    # No erasure can run between the two (_LINKS_LOCK).
    held = await conn.fetch(
        "SELECT namespace, from_id, to_id, updated_at FROM identity_links WHERE namespace = ANY($1::text[])"
        " AND (from_id = ANY($2::text[]) OR to_id = ANY($3::text[]))",
        list({m.namespace for m in merges}),
        list({*merged, *map(link_key, merged)}),
        merged,
    )
    rows = plan_merges(merges, (LinkRow(*r) for r in held), link_key)
    if rows:
        await conn.execute(
            "INSERT INTO identity_links (namespace, from_id, to_id, updated_at)"
            " SELECT ns, f, t, u FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS x(ns, f, t, u)"
            ' ORDER BY ns COLLATE "C", f COLLATE "C"'
            " ON CONFLICT (namespace, from_id) DO UPDATE SET to_id = excluded.to_id, updated_at = excluded.updated_at"
            " WHERE identity_links.updated_at <= excluded.updated_at",
            *map(list, zip(*rows, strict=True)),
        )


async def _erase_links(conn: Connection, erase_links: ErasedLinks) -> None:
    """Store.ack's ``erase_links``, in the ack's transaction: only for a job now delivered
    (one whose fence failed is another holder's to ack, and to erase with)."""
    rows = await conn.fetch(_ERASING_JOBS, list(erase_links))
    erasing = []
    for job_id, namespace, created_at in rows:
        ids = [_text(i) for i in erase_links[job_id]]
        # As resolve_links looks them up: a long id under its digest, or as an older bridge
        # stored it. A to_id is stored as it is.
        erasing.append((namespace, created_at, {*ids, *map(link_key, ids)}, ids))
    if len(erasing) > 1:
        # Each DELETE below locks its own rows in order, but one job's after the other's: an
        # ack of two deletions held the second's rows while waiting for the first's, which
        # ingest could hold while waiting for the second's (a deadlock). Every job's rows are
        # locked first, at once, in ingest's order (a few that are kept may be locked too).
        await conn.execute(
            "SELECT 1 FROM identity_links WHERE namespace = ANY($1::text[]) AND updated_at <= $2"
            " AND (from_id = ANY($3::text[]) OR to_id = ANY($4::text[]))"
            ' ORDER BY namespace COLLATE "C", from_id COLLATE "C" FOR UPDATE',
            list({e[0] for e in erasing}),
            max(e[1] for e in erasing),
            list(set().union(*(e[2] for e in erasing))),
            list({i for e in erasing for i in e[3]}),
        )
        # Their dead letters and discards too, each table's in id order at once: one job's
        # after the other's, the ack held the first user's and waited for the second's lower
        # ids, which a replay or purge (taking them in id order) held while waiting for the first's.
        await _lock_records(conn, erasing)
    for namespace, created_at, keys, ids in erasing:
        # Rows locked in the order ingest's link upsert takes them (LINKS_SQL: byte order of
        # namespace and from_id), so the two cannot deadlock; the DELETE alone locked them in
        # whatever order its plan read them.
        await conn.execute(
            "DELETE FROM identity_links WHERE (namespace, from_id) IN ("
            "SELECT namespace, from_id FROM identity_links WHERE namespace = $1 AND updated_at <= $2"
            " AND (from_id = ANY($3::text[]) OR to_id = ANY($4::text[]))"
            ' ORDER BY namespace COLLATE "C", from_id COLLATE "C" FOR UPDATE)',
            namespace,
            created_at,
            list(keys),
            ids,
        )
        await _erase_records(conn, namespace, created_at, ids)


async def _lock_records(conn: Connection, erasing: list[tuple[str, float, set[str], list[str]]]) -> None:
    """Lock, in id order, every dead letter and discard that _erase_records will delete for
    the deletions of ``erasing`` (a few that are kept may be locked too)."""
    destinations = list({e[0] for e in erasing})
    ids = list({i for e in erasing for i in e[3]})
    await conn.execute(
        "SELECT 1 FROM dead_letters WHERE ordering_key = ANY($1::text[]) AND destination = ANY($2::text[])"
        " AND created_at <= $3 ORDER BY id FOR UPDATE",
        ids,
        destinations,
        max(e[1] for e in erasing),
    )
    await conn.execute(
        "SELECT 1 FROM discards WHERE ordering_key = ANY($1::text[]) AND destination = ANY($2::text[])"
        " ORDER BY id FOR UPDATE",
        ids,
        destinations,
    )


async def _erase_records(conn: Connection, destination: str, created_at: float, ids: list[str]) -> None:
    """The deleted user's dead letters (stored before the deletion) and discards of the
    deletion's destination (Store.ack's erase_links). Rows locked in id order, as a replay
    or purge takes them."""
    await conn.execute(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE ordering_key = ANY($1::text[])"
        " AND destination = $2 AND created_at <= $3 ORDER BY id FOR UPDATE)",
        ids,
        destination,
        created_at,
    )
    await conn.execute(
        "DELETE FROM discards WHERE id IN (SELECT id FROM discards WHERE ordering_key = ANY($1::text[])"
        " AND destination = $2 ORDER BY id FOR UPDATE)",
        ids,
        destination,
    )


def _text(value: str) -> str:
    """PostgreSQL text cannot hold U+0000, but event names, ids and upstream bodies can: one
    such byte must not fail a whole group commit or a settlement (payloads are bytea)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _clean_filter(flt: RecordFilter) -> RecordFilter:
    """An operator's filter as the rows were written (U+0000 stored as U+FFFD): sent as it
    is, PostgreSQL refuses the statement, a 500 for an admin request."""
    if "\x00" not in (flt.destination or "") + (flt.reason or ""):
        return flt
    return dataclasses.replace(
        flt,
        destination=_text(flt.destination) if flt.destination is not None else None,
        reason=_text(flt.reason) if flt.reason is not None else None,
    )


def _has_nul(e: IncomingEvent) -> bool:
    return (
        "\x00" in e.message_id
        or "\x00" in e.ordering_key
        or any("\x00" in k.namespace or "\x00" in k.from_id or "\x00" in k.to_id for k in e.links)
    )


def _clean_event(e: IncomingEvent) -> IncomingEvent:
    return e._replace(
        message_id=_text(e.message_id),
        ordering_key=_text(e.ordering_key),
        links=tuple(IdentityLink(_text(k.namespace), _text(k.from_id), _text(k.to_id)) for k in e.links),
    )


class PostgresStore(Store):
    def __init__(
        self,
        dsn: str,
        *,
        max_bytes: int | None = None,
        pool_size: int = 10,
        schema: str = "bridge",
        size_check_interval: float = 1.0,
        min_free_disk_bytes: int | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 10.0,
        upgrade: bool = True,
        create: bool = True,
        statement_cache_size: int = 100,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``min_free_disk_bytes`` is accepted for a uniform configuration and ignored:
        the database's disk belongs to the database server, which guards it itself.

        ``command_timeout`` bounds every statement and every wait for a pooled connection,
        like SQLite's busy timeout: a database that hangs (a lock held elsewhere, stalled
        I/O) becomes a StoreError, so ingest answers 429 instead of hanging and a lease
        is not held past its deadline by a settle that never returns.

        ``upgrade`` is accepted for a uniform interface: PostgreSQL's schema changes so far
        only add tables and indexes, which older nodes sharing the database do not notice.

        ``create=False`` (the CLI) opens only an existing store: a schema without the
        bridge's tables (a typo in ``?schema=``, another database) is a StoreError, and
        nothing is created in it.

        ``wall_clock`` is this node's clock; ``now()`` corrects it by its offset from the
        database's, measured at open and every CLOCK_CHECK_SECONDS after."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if pool_size < 2:
            raise ValueError(f"pool_size must be at least 2 (ingest holds one), got {pool_size}")
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.max_bytes = max_bytes
        self._pool_size = pool_size
        self._size_check_interval = size_check_interval
        self._connect_timeout = connect_timeout
        if command_timeout <= 0:
            raise ValueError(f"command_timeout must be positive, got {command_timeout}")
        self._command_timeout = command_timeout
        self._statement_cache_size = statement_cache_size
        self._pool: Any = None
        self._ingest_pool: Any = None
        self._ingest: GroupCommitter | None = None
        self._capacity_checked_at = float("-inf")
        self._full_reason: str | None = None
        self._capacity_lock = asyncio.Lock()
        # Measurements finished, and the failure of the last one if it failed (_check_capacity).
        self._capacity_measures = 0
        self._capacity_failure: StoreError | None = None
        self._create = create
        self._wall_clock = wall_clock
        self._clock_offset = 0.0
        self._clock_checked_at = float("-inf")
        self._clock_task: asyncio.Task[None] | None = None

    @property
    def commits(self) -> int:
        """Enqueue transactions committed since open (group commit makes this << calls)."""
        return 0 if self._ingest is None else self._ingest.commits

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        # Ingest's group commit (and the size check and /readyz before it) has a connection of
        # its own: deliveries waiting for a lock (another node's lease) held every connection of
        # a shared pool, and ingest was refused meanwhile, though it waits for none of them.
        pool = await self._create_pool(self._pool_size - 1)
        opened: list[Any] = []  # the pools made after it, closed with it if opening fails
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK, timeout=DDL_TIMEOUT)
                if not self._create and not await conn.fetchval(
                    "SELECT to_regclass(format('%I.schema_version', $1::text)) IS NOT NULL", self.schema
                ):
                    raise StoreError(
                        f"no bridge store in schema {self.schema!r} of this PostgreSQL database: "
                        "`bridge serve` creates it when it starts; check store.url (its database and ?schema=)"
                    )
                if await conn.fetchval("SELECT to_regnamespace($1) IS NULL", self.schema):
                    # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the database's CREATE
                    # privilege even when the schema is there, which a role given a schema of
                    # its own (CREATE SCHEMA bridge AUTHORIZATION bridge) usually lacks.
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await self._check_session(conn)
                present = {
                    str(r[0])
                    for r in await conn.fetch(
                        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE n.nspname = $1",
                        self.schema,
                    )
                }
                await _run_ddl(conn, DDL, present)
                for table, column, kind in ADDED_COLUMNS:
                    if not await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE"
                        " attrelid = to_regclass(format('%I.%I', $1::text, $2::text))"
                        " AND attname = $3 AND NOT attisdropped)",
                        self.schema,
                        table,
                        column,
                    ):
                        await conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}", timeout=DDL_TIMEOUT)
                await _run_ddl(conn, LATE_DDL, present)
                found = await conn.fetchval("SELECT max(version) FROM schema_version")
                if found is None:
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION)
                elif found > SCHEMA_VERSION:
                    raise schema_error(found)
            async with pool.acquire() as conn:
                await self._measure_clock(conn)
                durable = await conn.fetchval("SELECT current_setting('synchronous_commit')") != "off"
            # A 200 says the events are durable: with synchronous_commit off (the server's,
            # the database's or the role's, for speed) a commit returns before it is flushed,
            # and a crash of the database loses what was acknowledged. Ingest's connection
            # turns it back on; any other value (a standby's wait, remote_apply) stands.
            ingest_pool = await self._create_pool(1, **({} if durable else {"synchronous_commit": "on"}))
            opened.append(ingest_pool)
            if not durable:
                async with ingest_pool.acquire() as conn:
                    if await conn.fetchval("SELECT current_setting('synchronous_commit')") == "off":
                        # Dropped on the way, as _check_session says of the others.
                        log.warning(
                            "postgres_synchronous_commit_off",
                            risk="a crash of the database can lose acknowledged events",
                            fix="ALTER ROLE <user> SET synchronous_commit = on",
                        )
        except BaseException as exc:
            for each in (pool, *opened):
                await each.close()
            raise to_store_error(exc) from exc
        self._pool = pool
        self._ingest_pool = ingest_pool
        self._ingest = GroupCommitter(self._acquire_ingest, to_store_error, unavailable, self.now)
        self._ingest.start()
        # Leases measure the clock too, but a node whose destinations are all paused takes
        # none, and its ingest still dates rows: this keeps the offset fresh regardless.
        self._clock_task = asyncio.create_task(self._keep_clock(), name="bridge-postgres-clock")

    async def _create_pool(self, size: int, **settings: str) -> Any:
        """A pool of ``size`` connections, with the session ``settings`` besides ours."""
        try:
            return await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                statement_cache_size=self._statement_cache_size,
                server_settings={
                    "search_path": self.schema,
                    "application_name": "bridge",
                    # command_timeout is the client's: a node that stops mid-transaction (a
                    # partition, a paused process) sends no cancel, and the database would
                    # keep its locks (a destination's lease lock, a dedupe key being stored)
                    # until TCP gives up, hours later, with every other node waiting on them.
                    # Our transactions never pause between statements for longer than this.
                    "idle_in_transaction_session_timeout": str(max(1, round(self._command_timeout * 1000))),
                    **settings,
                },
            )
        except Exception as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc

    async def _check_session(self, conn: Connection) -> None:
        """Check that the settings ``open`` sends when it connects are in force. A pooler may
        drop them: PgBouncer refuses startup parameters it does not know, and its usual
        cure, ``ignore_startup_parameters``, leaves the server's defaults. Every statement
        names its tables unqualified, so the store would then be made and used in whatever
        schema the server's search_path names (``public``): beside the one ``?schema=``
        names, or shared with another deployment's queue."""
        current = await conn.fetchval("SELECT current_schema()")
        if current != self.schema:
            raise StoreError(
                f"the PostgreSQL connections use schema {current!r}, not {self.schema!r} (store.url ?schema=): "
                "something between the bridge and PostgreSQL (PgBouncer's ignore_startup_parameters) dropped "
                f"the search_path the bridge asks for; set it for the bridge's role: ALTER ROLE <user> SET "
                f"search_path = {self.schema} (see docs/operations.md, PgBouncer)"
            )
        if await conn.fetchval("SELECT current_setting('idle_in_transaction_session_timeout')") == "0":
            # Dropped the same way; not fatal, but a node that stops mid-transaction keeps its
            # locks (a destination's lease lock) until TCP gives up.
            log.warning(
                "postgres_idle_in_transaction_timeout_off",
                wanted_seconds=self._command_timeout,
                fix="ALTER ROLE <user> SET idle_in_transaction_session_timeout = ...",
            )

    async def close(self) -> None:
        clock, self._clock_task = self._clock_task, None
        if clock is not None:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
        ingest, self._ingest = self._ingest, None
        if ingest is not None:
            await ingest.stop()
        for pool in (self._pool, self._ingest_pool):
            if pool is not None:
                await pool.close()
        self._pool = self._ingest_pool = None

    def _acquire(self) -> Any:
        """A pooled connection, waiting at most ``command_timeout`` for one."""
        return self._pool.acquire(timeout=self._command_timeout)

    def _acquire_ingest(self) -> Any:
        """Ingest's own connection, waiting at most ``command_timeout`` for it."""
        return self._ingest_pool.acquire(timeout=self._command_timeout)

    # -- the database's clock ----------------------------------------------------------
    def now(self) -> float:
        return self._wall_clock() + self._clock_offset

    async def _measure_clock(self, conn: Connection) -> None:
        """Take the database's clock less this node's as the offset ``now`` adds, read
        between two readings of ours so the round trip splits evenly."""
        before = self._wall_clock()
        database = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
        after = self._wall_clock()
        offset = database - (before + after) / 2
        if abs(offset) >= CLOCK_WARN_SECONDS and abs(offset - self._clock_offset) >= CLOCK_WARN_SECONDS:
            log.warning("clock_offset_from_database", offset_seconds=round(offset, 3), using="database clock")
        self._clock_offset = offset
        self._clock_checked_at = time.monotonic()

    async def _keep_clock(self) -> None:
        while True:
            await asyncio.sleep(max(CLOCK_CHECK_SECONDS, 1.0))
            try:
                async with self._conn() as conn:
                    await self._check_clock(conn)
            except StoreError as exc:  # the database is away: the last offset stands
                log.warning("clock_check_failed", error=str(exc))

    async def _check_clock(self, conn: Connection) -> None:
        if time.monotonic() - self._clock_checked_at >= CLOCK_CHECK_SECONDS:
            await self._measure_clock(conn)

    @contextlib.asynccontextmanager
    async def _conn(self, transaction: bool = False, *, ingest: bool = False) -> AsyncIterator[Connection]:
        """A connection of the shared pool, or with ``ingest`` ingest's own (open)."""
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open")
        try:
            async with self._acquire_ingest() if ingest else self._acquire() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except BaseException as exc:
            error = to_store_error(exc)
            if error is exc:
                raise
            raise error from exc

    # -- backpressure ------------------------------------------------------------------
    async def _check_capacity(self) -> None:
        if self.max_bytes is None:
            return
        if time.monotonic() - self._capacity_checked_at >= self._size_check_interval:
            measures = self._capacity_measures
            async with self._capacity_lock:
                failure = self._capacity_failure
                if failure is not None and self._capacity_measures != measures:
                    # A measurement ended while this call waited, and failed (the database
                    # away): each waiter measuring again, one after the other, made the n-th
                    # wait n command_timeouts for its refusal (429 store_unavailable).
                    raise StoreError(str(failure))
                if time.monotonic() - self._capacity_checked_at >= self._size_check_interval:
                    failure = None
                    try:
                        self._full_reason = await self._measure(self.max_bytes)
                        self._capacity_checked_at = time.monotonic()
                    except StoreError as exc:
                        failure = exc
                        raise
                    finally:
                        self._capacity_failure = failure
                        self._capacity_measures += 1
        if self._full_reason is not None:
            raise StoreFull(self._full_reason)

    async def _measure(self, limit: int) -> str | None:
        async with self._conn(ingest=True) as conn:
            used = await conn.fetchval(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                self.schema,
            )
        if used > limit:
            return f"the store holds {used} bytes, over its limit of {limit} bytes"
        return None

    # -- ingest ------------------------------------------------------------------------
    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        if self._ingest is None:
            raise StoreError("the PostgreSQL store is not open")
        if not events:
            return EnqueueResult(0, 0)
        await self._check_capacity()
        if any(_has_nul(e) for e in events):
            events = [_clean_event(e) for e in events]
        return await self._ingest.enqueue(_text(source), events)

    # -- delivery ----------------------------------------------------------------------
    async def lease(
        self,
        destination: str,
        limit: int,
        lease_seconds: float,
        *,
        ordered: bool = True,
        ahead: Collection[int] = (),
    ) -> list[Job]:
        if limit <= 0:
            return []
        ahead = frozenset(ahead)
        async with self._conn(transaction=True) as conn:
            await self._check_clock(conn)
            if ordered:
                # The database's time, read after the lock, which may wait for another node's
                # lease: the lease's time starts when it is taken, or the worker would get
                # less than it counts on.
                now = float(await conn.fetchval(_LOCKED_NOW, f"{self.schema}:{destination}"))
                ids = await self._due_ids_ordered(conn, destination, limit, now, ahead)
                if not ids:
                    return []
                rows = await conn.fetch(
                    f"UPDATE jobs SET state = {LEASED}, attempts = attempts + 1, lease_until = $1,"
                    " first_attempt_at = COALESCE(first_attempt_at, $2)"
                    f" WHERE id = ANY($3::bigint[]) AND state < {DELIVERED} RETURNING {_JOB_COLUMNS}",
                    now + lease_seconds,
                    now,
                    ids,
                )
            else:
                rows = await conn.fetch(
                    f"UPDATE jobs SET state = {LEASED}, attempts = attempts + 1, lease_until = {_DB_NOW} + $1,"
                    f" first_attempt_at = COALESCE(first_attempt_at, {_DB_NOW})"
                    " WHERE id IN (SELECT id FROM jobs WHERE destination = $2"
                    f" AND state < {DELIVERED} AND ((state = {QUEUED} AND available_at <= {_DB_NOW})"
                    f" OR (state = {LEASED} AND lease_until <= {_DB_NOW})) AND id <> ALL($4::bigint[])"
                    " ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)"
                    f" RETURNING {_JOB_COLUMNS}",
                    lease_seconds,
                    destination,
                    limit,
                    list(ahead),
                )
        jobs = [
            Job(r[0], destination, r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7], bytes(r[8] or b""))
            for r in sorted(rows, key=lambda r: int(r[0]))
        ]
        return jobs

    @staticmethod
    async def _due_ids_ordered(
        conn: Connection, destination: str, limit: int, now: float, ahead: Collection[int]
    ) -> list[int]:
        selection = OrderedSelection(limit, now, ahead)
        while (query := selection.next_query()) is not None:
            after, excluded, window = query
            selection.take(
                await conn.fetch(
                    "SELECT id, ordering_key, state, available_at, lease_until FROM jobs"
                    f" WHERE destination = $1 AND state < {DELIVERED} AND id > $2"
                    " AND ordering_key <> ALL($3::text[]) ORDER BY id LIMIT $4",
                    destination,
                    after,
                    excluded,
                    window,
                )
            )
        return selection.chosen

    async def ack(
        self,
        job_ids: Sequence[int],
        mapping_version: str = "",
        *,
        fence: Fence | None = None,
        erase_links: ErasedLinks | None = None,
        merge_links: MergedLinks | None = None,
    ) -> None:
        if not job_ids:
            return
        if merge_links and erase_links:
            # One transaction wrote the merges' links, then erased the deletions' links: two
            # passes, each in byte order, but a merge's row held while waiting for a lower
            # one of a deletion's, which ingest (LINKS_SQL, in byte order) could hold while
            # waiting for the merge's: a deadlock. One transaction per step, each one pass,
            # in job order (link_steps), each job acked with its own links; the jobs that
            # change none with the first.
            linked = {*merge_links, *erase_links}
            for n, step in enumerate(link_steps(merge_links, erase_links)):
                mine = step.merges or step.erasures
                await self.ack(
                    [j for j in job_ids if j in mine or (n == 0 and j not in linked)],
                    mapping_version,
                    fence=fence,
                    merge_links=step.merges or None,
                    erase_links=step.erasures or None,
                )
            return
        # The payload of a delivered job is never read again; dropping it keeps the table small.
        async with self._conn(transaction=bool(erase_links or merge_links)) as conn:
            await conn.execute(
                f"UPDATE jobs j SET state = {DELIVERED}, settled_at = $3, mapping_version = $4,"
                f" lease_until = NULL, payload = '' FROM {_FENCE_ROWS} WHERE j.state < {DELIVERED} AND {_FENCED}",
                *_fence_arrays(job_ids, fence),
                self.now(),
                mapping_version,
            )
            if merge_links:
                await _merge_links(conn, merge_links)
            if erase_links:
                await _erase_links(conn, erase_links)

    async def retry(
        self,
        job_ids: Sequence[int],
        available_at: float,
        error: str,
        *,
        fence: Fence | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        if not job_ids:
            return
        async with self._conn(transaction=bool(delivered)) as conn:
            await _record_delivered(conn, job_ids, fence, delivered)
            await conn.execute(
                f"UPDATE jobs j SET state = {QUEUED}, available_at = $3, lease_until = NULL, last_error = $4"
                f" FROM {_FENCE_ROWS} WHERE j.state = {LEASED} AND {_FENCED}",
                *_fence_arrays(job_ids, fence),
                available_at,
                _text(error),
            )

    async def release(
        self, job_ids: Sequence[int], *, fence: Fence | None = None, delivered: Delivered | None = None
    ) -> None:
        if not job_ids:
            return
        # A job released before any real attempt forgets its first attempt too, so the
        # retry budget (measured from it) does not run while it was never tried.
        async with self._conn(transaction=bool(delivered)) as conn:
            await _record_delivered(conn, job_ids, fence, delivered)
            await conn.execute(
                f"UPDATE jobs j SET state = {QUEUED}, lease_until = NULL, attempts = GREATEST(j.attempts - 1, 0),"
                " first_attempt_at = CASE WHEN j.attempts <= 1 THEN NULL ELSE j.first_attempt_at END"
                f" FROM {_FENCE_ROWS} WHERE j.state = {LEASED} AND {_FENCED}",
                *_fence_arrays(job_ids, fence),
            )

    async def defer(
        self,
        job_ids: Sequence[int],
        available_at: float,
        reason: str,
        *,
        fence: Fence | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        if not job_ids:
            return
        async with self._conn(transaction=bool(delivered)) as conn:
            await _record_delivered(conn, job_ids, fence, delivered)
            await conn.execute(
                f"UPDATE jobs j SET state = {QUEUED}, lease_until = NULL, available_at = $3, last_error = $4,"
                " attempts = GREATEST(j.attempts - 1, 0),"
                " first_attempt_at = CASE WHEN j.attempts <= 1 THEN NULL ELSE j.first_attempt_at END"
                f" FROM {_FENCE_ROWS} WHERE j.state = {LEASED} AND {_FENCED}",
                *_fence_arrays(job_ids, fence),
                available_at,
                _text(reason),
            )

    async def dead_letter(self, entries: Sequence[DeadLetter], *, fence: Fence | None = None) -> None:
        unique = _first_per_job(entries)
        if not unique:
            return
        async with self._conn(transaction=True) as conn:
            await conn.execute(
                "INSERT INTO dead_letters (destination, source, message_id, ordering_key, payload, reason,"
                " status, response_body, request_body, label, attempts, created_at, first_attempt_at,"
                " failed_at, mapping_version, delivered_outputs)"
                " SELECT j.destination, j.source, j.message_id, j.ordering_key, j.payload, e.reason, e.status,"
                " e.response_body, e.request_body, e.label, j.attempts, j.created_at, j.first_attempt_at,"
                " $8, e.mapping_version, COALESCE(e.delivered, j.delivered_outputs)"
                " FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::bytea[], $6::text[],"
                " $7::text[], $9::int[], $10::bytea[]) WITH ORDINALITY"
                " AS e(job_id, reason, status, response_body, request_body, label, mapping_version, leased,"
                " delivered, n)"
                f" JOIN jobs j ON j.id = e.job_id WHERE j.state < {DELIVERED}"
                f" AND (e.leased IS NULL OR j.attempts = e.leased) ORDER BY e.n {_HOLD_SETTLED}",
                [e.job_id for e in unique],
                [_text(e.reason) for e in unique],
                [e.status for e in unique],
                [_text(e.response_body) for e in unique],
                [e.request_body for e in unique],
                [_text(e.label) for e in unique],
                [_text(e.mapping_version) for e in unique],
                self.now(),
                _fence_arrays([e.job_id for e in unique], fence)[1],
                [e.delivered_outputs or None for e in unique],
            )
            await _delete_settled(conn, [e.job_id for e in unique], fence)

    async def discard(self, entries: Sequence[Discard], *, fence: Fence | None = None) -> None:
        unique = _first_per_job(entries)
        if not unique:
            return
        async with self._conn(transaction=True) as conn:
            await conn.execute(
                "INSERT INTO discards (destination, source, message_id, payload, reason, label, detail,"
                " discarded_at, ordering_key, delivered_outputs)"
                " SELECT j.destination, j.source, j.message_id, j.payload, e.reason, e.label, e.detail, $5,"
                " j.ordering_key, j.delivered_outputs"
                " FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $6::int[]) WITH ORDINALITY"
                f" AS e(job_id, reason, label, detail, leased, n) JOIN jobs j ON j.id = e.job_id"
                f" WHERE j.state < {DELIVERED} AND (e.leased IS NULL OR j.attempts = e.leased) ORDER BY e.n"
                f" {_HOLD_SETTLED}",
                [e.job_id for e in unique],
                [_text(e.reason) for e in unique],
                [_text(e.label) for e in unique],
                [_text(e.detail) for e in unique],
                self.now(),
                _fence_arrays([e.job_id for e in unique], fence)[1],
            )
            await _delete_settled(conn, [e.job_id for e in unique], fence)

    async def resolve_links(self, namespace: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        # Looked up as ingest stored them: a long id under its digest, a U+0000 as U+FFFD
        # (PostgreSQL text cannot hold it, and sent as it is, it fails the whole lookup).
        by_key: dict[str, list[str]] = {}
        for i in ids:
            clean = _text(i)
            key = link_key(clean)
            by_key.setdefault(key, []).append(i)
            if key != clean and not clean.startswith(DIGEST_MARK):
                # Bridges before digests stored every id as it was (up to the ~2.7 KB the
                # index takes): their rows are read too, the latest link winning.
                by_key.setdefault(clean, []).append(i)
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT from_id, to_id, updated_at FROM identity_links"
                " WHERE namespace = $1 AND from_id = ANY($2::text[])",
                _text(namespace),
                list(by_key),
            )
        found: dict[str, tuple[float, str]] = {}
        for from_id, to_id, updated_at in rows:
            for i in by_key[from_id]:
                if i not in found or updated_at > found[i][0]:
                    found[i] = (updated_at, to_id)
        return {i: to_id for i, (_, to_id) in found.items()}

    # -- operators ---------------------------------------------------------------------
    async def list_dead(self, flt: RecordFilter, limit: int = 100) -> list[DeadLetterRecord]:
        where, params = record_where(_clean_filter(flt), "failed_at", dollar, first=2, arrays=True)
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters{where} ORDER BY failed_at DESC, id DESC LIMIT $1",
                limit,
                *params,
            )
        return [dead_letter_record(r) for r in rows]

    async def replay_dead(self, flt: RecordFilter) -> int:
        return await self._replay("dead_letters", "failed_at", flt)

    async def replay_discards(self, flt: RecordFilter) -> int:
        return await self._replay("discards", "discarded_at", flt)

    async def _replay(self, table: str, time_column: str, flt: RecordFilter) -> int:
        return await self._in_slices(
            table,
            time_column,
            flt,
            f"moved AS (DELETE FROM {table} r USING picked WHERE r.id = picked.id RETURNING r.id, r.destination,"
            " r.source, r.message_id, r.ordering_key, r.payload, r.delivered_outputs),"
            " done AS (INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, attempts,"
            " available_at, created_at, delivered_outputs) SELECT destination, source, message_id,"
            f" ordering_key, payload, {QUEUED}, 0, $2, $2, delivered_outputs FROM moved ORDER BY id RETURNING 1)",
            self.now(),
        )

    async def purge_dead(self, flt: RecordFilter) -> int:
        return await self._in_slices(
            "dead_letters",
            "failed_at",
            flt,
            "done AS (DELETE FROM dead_letters r USING picked WHERE r.id = picked.id RETURNING 1)",
        )

    async def _in_slices(self, table: str, time_column: str, flt: RecordFilter, action: str, *args: object) -> int:
        """Apply ``action`` to the records of ``table`` that ``flt`` selects, RECORD_SLICE
        at a time in id order (see RECORD_SLICE), and count them. ``action`` is a CTE named
        ``done`` (after any of its own) over ``picked``, the slice's ids; its parameters
        ``args`` are $2 on. A record another replay or purge took meanwhile is skipped, and
        so is one added meanwhile (its id is past the highest there was at the start): a
        replayed job dead-lettered again while the replay runs waits for the next one, as
        it would have after a single statement, instead of going round again."""
        where, params = record_where(_clean_filter(flt), time_column, dollar, first=2 + len(args), arrays=True)
        upto = f"${2 + len(args) + len(params)}"
        where += f" AND id > $1 AND id <= {upto}" if where else f" WHERE id > $1 AND id <= {upto}"
        async with self._conn() as conn:
            highest = await conn.fetchval(f"SELECT COALESCE(max(id), 0) FROM {table}")
        total, after = 0, 0
        while True:
            async with self._conn() as conn:
                # The slice's rows locked in id order before ``action`` takes them, as a
                # deletion's ack locks its user's (_erase_records): the action alone locked
                # them in its plan's order (a hash join reads the table as it lies on disk),
                # and a replay by ids deadlocked with such an ack. Counted from ``sliced``, which
                # does not lock: a row deleted meanwhile must not end the replay early.
                last, picked, done = await conn.fetchrow(
                    f"WITH sliced AS (SELECT id FROM {table}{where} ORDER BY id LIMIT {RECORD_SLICE}),"
                    f" picked AS (SELECT id FROM {table} WHERE id IN (SELECT id FROM sliced) ORDER BY id FOR UPDATE),"
                    f" {action} SELECT max(id), count(*), (SELECT count(*) FROM done) FROM sliced",
                    after,
                    *args,
                    *params,
                    highest,
                )
            total += int(done)
            if picked < RECORD_SLICE:
                return total
            after = last

    async def list_discards(self, flt: RecordFilter, limit: int = 100) -> list[DiscardRecord]:
        where, params = record_where(_clean_filter(flt), "discarded_at", dollar, first=2, arrays=True)
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT id, destination, source, message_id, payload, reason, label, detail, discarded_at"
                f" FROM discards{where} ORDER BY discarded_at DESC, id DESC LIMIT $1",
                limit,
                *params,
            )
        return [DiscardRecord(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

    async def queue_stats(self) -> dict[str, QueueStats]:
        async with self._conn() as conn:
            queued = await conn.fetch(
                f"SELECT destination, COUNT(*), MIN(created_at) FROM jobs WHERE state < {DELIVERED}"
                " GROUP BY destination"
            )
            dead = await conn.fetch("SELECT destination, COUNT(*) FROM dead_letters GROUP BY destination")
        stats = {r[0]: QueueStats(depth=r[1], oldest_created_at=r[2]) for r in queued}
        for destination, count in dead:
            current = stats.get(destination, QueueStats(depth=0, oldest_created_at=None))
            stats[destination] = QueueStats(current.depth, current.oldest_created_at, count)
        return stats

    async def users_waiting(
        self, destination: str, before: int, users: Sequence[str], ignore: Collection[int] = ()
    ) -> set[str]:
        waiting: set[str] = set()
        async with self._conn() as conn:
            for user in dict.fromkeys(users):
                # A key holds one user, or several joined by KEY_SEPARATOR (an alias): matched whole.
                found = await conn.fetchval(
                    f"SELECT 1 FROM jobs WHERE destination = $1 AND state < {DELIVERED} AND id < $2"
                    " AND strpos(chr(31) || ordering_key || chr(31), $3) > 0"
                    " AND id <> ALL($4::bigint[]) LIMIT 1",
                    destination,
                    before,
                    f"{KEY_SEPARATOR}{user}{KEY_SEPARATOR}",
                    list(ignore),
                )
                if found is not None:
                    waiting.add(user)
        return waiting

    async def delivered_version(self, destination: str, message_id: str) -> str | None:
        async with self._conn() as conn:
            version = await conn.fetchval(
                "SELECT mapping_version FROM jobs WHERE destination = $1 AND message_id = $2"
                f" AND state = {DELIVERED} ORDER BY id DESC LIMIT 1",
                destination,
                message_id,
            )
        return None if version is None else str(version)

    async def get_destination_states(self) -> dict[str, DestinationState]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT name, paused, reason, changed_at, extra FROM destination_state")
        return {r[0]: DestinationState(r[0], r[1], r[2], r[3], orjson.loads(r[4])) for r in rows}

    async def set_destination_state(self, state: DestinationState) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO destination_state (name, paused, reason, changed_at, extra)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,"
                " reason = excluded.reason, changed_at = excluded.changed_at, extra = excluded.extra",
                state.name,
                state.paused,
                state.reason,
                state.changed_at,
                orjson.dumps(state.extra).decode(),
            )

    async def make_due(self, destination: str) -> int:
        now, after, made = self.now(), 0, 0
        # Only the jobs there were at the resume: later ones are due anyway, and a retry
        # set after it (a new Retry-After) stands.
        async with self._conn() as conn:
            upto = int(await conn.fetchval("SELECT COALESCE(max(id), 0) FROM jobs"))
        while True:
            async with self._conn() as conn:
                row = await conn.fetchrow(
                    "WITH step AS (SELECT id FROM jobs WHERE destination = $1"
                    f" AND state < {DELIVERED} AND id > $2 AND id <= $5 ORDER BY id LIMIT $3),"
                    f" made AS (UPDATE jobs j SET available_at = $4 FROM step WHERE j.id = step.id"
                    f" AND j.state = {QUEUED} AND j.available_at > $4 RETURNING 1)"
                    " SELECT (SELECT count(*) FROM step) AS seen, (SELECT max(id) FROM step) AS last,"
                    " (SELECT count(*) FROM made) AS made",
                    destination,
                    after,
                    MAKE_DUE_STEP,
                    now,
                    upto,
                )
            made += int(row["made"])
            if row["seen"] < MAKE_DUE_STEP:
                return made
            after = int(row["last"])

    async def check_writable(self) -> None:
        # On ingest's connection: ready means ready to take events, which deliveries
        # waiting for locks on the shared pool do not hold up.
        async with self._conn(ingest=True) as conn:
            await self._check_clock(conn)
            await conn.execute(
                "INSERT INTO heartbeat (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                self.now(),
            )
        await self._check_capacity()  # ready means ready to accept events: not while ingest says full

    async def prune(self, dedupe_before: float, settled_before: float) -> int:
        # In slices, each its own short statement: after a backlog one DELETE of everything
        # would outlast command_timeout, roll back, and leave more for next time.
        removed = await self._prune_by_time("dedupe", "seen_at", dedupe_before)
        removed += await self._prune_delivered(settled_before)
        removed += await self._prune_by_time("discards", "discarded_at", settled_before)
        self._capacity_checked_at = float("-inf")
        return removed

    async def _prune_by_time(self, table: str, time_column: str, before: float) -> int:
        """Delete the rows of ``table`` from before ``before``, PRUNE_SLICE a statement; the
        time's index (dedupe_by_time, discards_by_time) finds them. Oldest first: without
        the order, once most rows were old enough the planner scanned the heap instead, and
        each slice read again the dead rows of the slices before it."""
        removed = 0
        while True:
            async with self._conn() as conn:
                n = _count(
                    await conn.execute(
                        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                        f"SELECT ctid FROM {table} WHERE {time_column} < $1"
                        f" ORDER BY {time_column} LIMIT {PRUNE_SLICE}))",
                        before,
                    )
                )
            removed += n
            if n < PRUNE_SLICE:
                return removed

    async def _prune_delivered(self, before: float) -> int:
        """Delete the delivered jobs settled before ``before``: walk the jobs in id order
        (the primary key), PRUNE_SLICE ids a statement, and stop at the first job created
        at or after ``before``.

        No index has settled_at (every ack would pay to keep one), so a DELETE by it read
        the whole table: every slice a sequential scan from the start of the heap (past
        the dead rows of the slices before it), and the last one, which finds too few to
        go on, all of it: every record of retention_hours, every prune. A job is settled
        after it was created, and ids come in creation order, so the walk reads what is
        old enough to go (and the old jobs still waiting), not the rest of the table.

        Only roughly in creation order: ids come from the table's sequence when a row is
        inserted, created_at from the clock of the node that enqueued it (its group's time,
        corrected to the database's clock as closely as a round trip measures it), taken
        before the insert; two nodes enqueueing at once, or one whose clock has drifted
        since it was last measured, may give a higher id an earlier created_at. The stop
        is still safe: every row deleted is checked for itself (delivered, settled before
        ``before``), as by the DELETE this replaces, so the stop only decides how far the
        walk looks. A job past it that was created and settled before the cutoff is left
        for a later prune, whose later cutoff takes the walk past the job it stopped at
        here. No record goes that the old DELETE would have kept; at worst some stay a
        prune or so longer."""
        removed, after = 0, 0
        while True:
            async with self._conn() as conn:
                # One statement, one snapshot: the DELETE's id range is exactly the walked
                # ids (a row inserted meanwhile is not yet visible to it, and is not
                # delivered), read by the primary key in id order. ``stop`` is the first
                # walked job created at or after the cutoff: the walk ends before it.
                row = await conn.fetchrow(
                    f"WITH walked AS (SELECT id, created_at FROM jobs WHERE id > $1 ORDER BY id LIMIT {PRUNE_SLICE}),"
                    " bounds AS (SELECT count(*) AS seen, max(id) AS last,"
                    " min(id) FILTER (WHERE created_at >= $2) AS stop FROM walked),"
                    " gone AS (DELETE FROM jobs WHERE id > $1 AND id < (SELECT COALESCE(stop, last + 1) FROM bounds)"
                    f" AND state = {DELIVERED} AND settled_at < $2 RETURNING 1)"
                    " SELECT seen, last, stop, (SELECT count(*) FROM gone) AS removed FROM bounds",
                    after,
                    before,
                )
            removed += int(row["removed"])
            if row["stop"] is not None or row["seen"] < PRUNE_SLICE:
                return removed
            after = int(row["last"])
