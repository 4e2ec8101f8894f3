"""Group commit for PostgreSQL: one collector task turns concurrent enqueue calls into
one transaction of three set-based statements (dedupe, jobs, links).

Dedupe is ``INSERT ... ON CONFLICT DO NOTHING RETURNING``: a key another node is
inserting at the same moment makes this one wait for its commit and then count as a
duplicate, so several nodes never both store one event.

Keys are inserted in one order on every node: two nodes storing the same keys in
different orders (a client that batches again on retry, two nodes' groups joining the
same requests differently) would each hold one the other waits for, and PostgreSQL would
fail one of them as a deadlock, a refusal (429 store_unavailable) for events nothing was wrong with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.store.base import EnqueueResult, IncomingEvent, StoreError
from bridge.store.postgres_schema import link_key

Connection = Any  # asyncpg.Connection (asyncpg ships no type hints)

MAX_CALLS_PER_COMMIT = 1000

# Dedupe keys and links are inserted in byte order ("C"): the same on every node whatever
# the database's collation (see the module docstring), and the cheapest to sort by.
DEDUPE_SQL = (
    "INSERT INTO dedupe (source, message_id, seen_at)"
    ' SELECT s, m, $3 FROM unnest($1::text[], $2::text[]) AS t(s, m) ORDER BY s COLLATE "C", m COLLATE "C"'
    " ON CONFLICT DO NOTHING RETURNING source, message_id"
)
JOBS_SQL = (
    "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, available_at, created_at)"
    " SELECT d, s, m, k, p, 0, $6, $6"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS t(d, s, m, k, p, n)"
    " ORDER BY n"
)
LINKS_SQL = (
    "INSERT INTO identity_links (namespace, from_id, to_id, updated_at)"
    " SELECT ns, f, t, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS x(ns, f, t)"
    ' ORDER BY ns COLLATE "C", f COLLATE "C"'
    " ON CONFLICT (namespace, from_id) DO UPDATE SET to_id = excluded.to_id, updated_at = excluded.updated_at"
)


@dataclass(slots=True)
class _Call:
    source: str
    events: Sequence[IncomingEvent]
    future: asyncio.Future[EnqueueResult]
    duplicates: list[int] = field(default_factory=list)
    fresh: list[IncomingEvent] = field(default_factory=list)


async def _write_group(conn: Connection, calls: list[_Call], now: float) -> None:
    keys = list(dict.fromkeys((c.source, e.message_id) for c in calls for e in c.events))
    rows = await conn.fetch(DEDUPE_SQL, [k[0] for k in keys], [k[1] for k in keys], now)
    new = {(r[0], r[1]) for r in rows}
    claimed: set[tuple[str, str]] = set()
    for call in calls:
        call.duplicates, call.fresh = [], []
        for index, event in enumerate(call.events):
            key = (call.source, event.message_id)
            if key in new and key not in claimed:
                claimed.add(key)
                call.fresh.append(event)
            else:
                call.duplicates.append(index)
    jobs = [
        (d, c.source, e.message_id, e.ordering_key, e.payload) for c in calls for e in c.fresh for d in e.destinations
    ]
    if jobs:
        columns = list(zip(*jobs, strict=True))
        await conn.execute(JOBS_SQL, *(list(col) for col in columns), now)
    # One statement may not upsert a key twice; the latest link wins, as in separate calls.
    links = {(link.namespace, link.from_id): link.to_id for c in calls for e in c.fresh for link in e.links}
    if links:
        await conn.execute(LINKS_SQL, [k[0] for k in links], [link_key(k[1]) for k in links], list(links.values()), now)


class GroupCommitter:
    """Collects enqueue calls and commits each group in one transaction."""

    def __init__(
        self,
        acquire: Callable[[], Any],
        to_store_error: Callable[[BaseException], BaseException],
        unavailable: Callable[[BaseException], bool] = lambda exc: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._acquire = acquire  # () -> async context manager yielding a connection
        self._clock = clock  # the store's (the database's) clock: rows are dated by it
        self._to_store_error = to_store_error
        # True for a failure of the database itself (it timed out, the connection was lost),
        # not of one call's data: every call alone would only wait as long again.
        self._unavailable = unavailable
        self._pending: list[_Call] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bridge-postgres-group-commit")

    async def stop(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        if self._closing or self._task is None:
            raise StoreError("the store is closed")
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Call(source, events, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                group = self._pending[:MAX_CALLS_PER_COMMIT]
                del self._pending[:MAX_CALLS_PER_COMMIT]
                await self._commit(group)
            if self._closing:
                return

    async def _commit(self, group: list[_Call]) -> None:
        try:
            await self._transaction(lambda conn: _write_group(conn, group, self._clock()))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                for call in group:
                    _fail(call, StoreError("the store was closed during enqueue"))
                raise
            if len(group) == 1 or self._unavailable(exc):
                error = self._to_store_error(exc)
                for call in group:
                    _fail(call, error)
                return
            # Something in the group is bad: commit each call alone so only it fails.
            for call in group:
                await self._commit([call])
            return
        for call in group:
            if not call.future.done():
                call.future.set_result(EnqueueResult(len(call.fresh), len(call.duplicates), tuple(call.duplicates)))

    async def _transaction(self, work: Callable[[Connection], Awaitable[None]]) -> None:
        async with self._acquire() as conn, conn.transaction():
            await work(conn)
        self.commits += 1


def _fail(call: _Call, error: BaseException) -> None:
    if not call.future.done():
        call.future.set_exception(error)
