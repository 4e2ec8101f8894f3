"""The SQLite store's operations: plain functions of a connection, run by the writer thread.

Each runs inside the writer's transaction (and its own SAVEPOINT), so it must not commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from itertools import chain, filterfalse, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple, TypeVar

import orjson

from bridge.store.base import (
    DEAD_LETTER_COLUMNS,
    DeadLetter,
    DeadLetterRecord,
    Delivered,
    DestinationState,
    Discard,
    DiscardRecord,
    EnqueueResult,
    ErasedLinks,
    Fence,
    IncomingEvent,
    Job,
    MergedLinks,
    QueueStats,
    RecordFilter,
    dead_letter_record,
)
from bridge.store.merge_links import LinkRow, link_steps, merges_of, plan_merges
from bridge.store.ordering import KEY_SEPARATOR, OrderedSelection
from bridge.store.sql_filters import record_where
from bridge.store.sqlite_dedupe import DedupeKeys, dedupe_keys_of
from bridge.store.sqlite_leases import Held, Leases, Settling, new_tuple
from bridge.store.sqlite_rows import insert_rows, insert_values
from bridge.store.sqlite_schema import DELIVERED, LEASED, QUEUED, WAITING

# Jobs not yet delivered, dead-lettered or discarded: the WHERE of the jobs_pending index,
# which a query must repeat for SQLite to use it.
PENDING = "settled_at IS NULL"

T = TypeVar("T")

# SQLite's largest rowid: "below any job".
MAX_JOB_ID = 2**63 - 1

# Far below SQLite's limit on bound parameters (32766 since 3.32), with room for extra ones.
CHUNK = 30000


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


JOBS_INSERT = (
    "INSERT INTO jobs (available_at, created_at, destination, source, message_id, ordering_key, payload, state)"
    " VALUES ",
    f"(?1, ?1, ?, ?, ?, ?, ?, {QUEUED})",
)
# The same insert for jobs of one destination and one source (the usual commit group's),
# bound once per statement as ?2 and ?3: each row binds its message id, ordering key and
# payload only. Two text binds fewer a job, each a copy into SQLite (about 1.6k of a batch
# event's 111k instructions, by callgrind).
JOBS_INSERT_SHARED = (JOBS_INSERT[0], f"(?1, ?1, ?2, ?3, ?, ?, ?, {QUEUED})")


def _marks(n: int) -> str:
    return ",".join("?" * n)


# -- ingest -------------------------------------------------------------------------
class EnqueueCall(NamedTuple):  # one per enqueue call: cheaper to build than a frozen dataclass
    source: str
    events: Sequence[IncomingEvent]
    now: float


# An EnqueueCall's and an IncomingEvent's fields, read in C by the per-commit loops below.
_source_of = attrgetter("source")
_events_of = attrgetter("events")
_now_of = attrgetter("now")
_message_id_of = itemgetter(0)  # IncomingEvent.message_id
_ordering_key_of = itemgetter(1)  # IncomingEvent.ordering_key
_payload_of = itemgetter(2)  # IncomingEvent.payload
_destinations_of = itemgetter(3)  # IncomingEvent.destinations
_links_of = itemgetter(4)  # IncomingEvent.links
_ONE_STORED = EnqueueResult(1, 0)  # immutable, so every single new event's call can share it


def enqueue_many(conn: sqlite3.Connection, calls: list[EnqueueCall], *, dedupe: DedupeKeys) -> list[EnqueueResult]:
    """Several callers' enqueues as one: one dedupe lookup, one insert per table.

    Callers are handled in order, so an id in two calls is stored for the first only, and
    job ids follow the order of the calls, as if each had run alone.
    """
    # A key covers its source too, so one set of keys serves every source of the group.
    keys = _keys_of(calls)
    taken = dedupe.stored(conn, keys)
    if dedupe.legacy:
        _add_legacy_duplicates(conn, dedupe, calls, keys, taken)
    results: list[EnqueueResult] = []
    fresh: list[bytes] = []
    jobs = _JobRows()
    links: dict[tuple[str, str], tuple[str, str, str]] = {}
    at = 0  # where the call's keys start in ``keys``
    for call in calls:
        source = call.source
        events = call.events
        count = len(events)
        call_keys = keys[at : at + count]
        at += count
        if taken.isdisjoint(call_keys) and len(distinct := set(call_keys)) == count:
            # The usual call, every event new: no per-event dedupe bookkeeping.
            taken |= distinct
            fresh += call_keys
            accepted: Sequence[IncomingEvent] = events
            duplicates: list[int] = []
        else:
            accepted, duplicates = _split_duplicates(events, call_keys, taken, fresh)
        jobs.add(source, accepted)
        # Only the events that teach links (identify calls, in the shipped mappings) enter
        # a Python loop; the others are passed over in C. A single call's one event (or
        # none, a duplicate) is looked at as it is: the C steps cost more than they save.
        taught = filter(None, map(_links_of, accepted)) if len(accepted) > 1 else accepted[0][4:] if accepted else ()
        for event_links in taught:
            for link in event_links:
                links[(link.namespace, link.from_id)] = (link.namespace, link.from_id, link.to_id)
        if not duplicates:  # a shared answer for the usual single call: no tuple built per call
            results.append(_ONE_STORED if count == 1 else EnqueueResult(count, 0))
        else:
            results.append(EnqueueResult(count - len(duplicates), len(duplicates), tuple(duplicates)))
    if fresh:
        now = max(map(_now_of, calls))
        dedupe.add(conn, fresh)
        jobs.insert(conn, now)
        if links:  # latest wins, as if the calls had run one after another
            _learn_links(conn, list(links.values()), now)
    return results


class _JobRows:
    """The job rows of one commit group, in the order of its calls and their events, kept
    as runs to insert in that order. A call whose events all go to one destination (every
    event of a request shares its source's destinations) joins a run of that destination
    and source, whose rows are only their message id, ordering key and payload, end to end
    in one list built in C (``JOBS_INSERT_SHARED``); any other call's rows carry their own
    destination and source (``JOBS_INSERT``), as every row used to. Either way payloads
    are bound as bytearrays (``sqlite_rows.as_blobs``)."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        # (destination, source) and the rows' values end to end, or None and 5-tuples.
        self.runs: list[tuple[tuple[str, str] | None, list[Any]]] = []

    def add(self, source: str, events: Sequence[IncomingEvent]) -> None:
        if not events:
            return
        runs = self.runs
        destinations = events[0][3]
        if len(destinations) != 1:
            pass  # rows of their own, below
        elif len(events) == 1:
            # A single call's event (a Tracking API /v1/track, say): its values as they
            # are, where the C steps below cost more than they save for one row.
            shared = (destinations[0], source)
            if runs and runs[-1][0] == shared:
                runs[-1][1].extend(events[0][:3])
            else:
                runs.append((shared, list(events[0][:3])))
            return
        elif all(map(is_, map(_destinations_of, events), repeat(destinations))):
            shared = (destinations[0], source)
            values: list[object] = [None] * (3 * len(events))
            values[0::3] = list(map(_message_id_of, events))
            values[1::3] = list(map(_ordering_key_of, events))
            values[2::3] = list(map(_payload_of, events))
            if runs and runs[-1][0] == shared:
                runs[-1][1].extend(values)
            else:
                runs.append((shared, values))
            return
        rows: list[tuple[str, str, str, str, bytes]] = [
            (destination, source, message_id, ordering_key, payload)
            for message_id, ordering_key, payload, event_destinations, _ in events
            for destination in event_destinations
        ]
        if runs and runs[-1][0] is None:
            runs[-1][1].extend(rows)
        else:
            runs.append((None, rows))

    def insert(self, conn: sqlite3.Connection, now: float) -> None:
        for shared, values in self.runs:
            if shared is None:
                insert_rows(conn, JOBS_INSERT, values, now, blob_column=4)
            else:
                insert_values(conn, JOBS_INSERT_SHARED, (now, *shared), values, 3, blob_column=2)


def _learn_links(conn: sqlite3.Connection, links: list[tuple[str, str, str]], now: float) -> None:
    """Store each (namespace, from_id, to_id) link, learnt at ``now``.

    A link taught again as it is (every identify of a user whose traits.id differs from
    their userId) only has its time moved, by the first statement: SQLite rewrites the
    entry of every index on a column an UPDATE sets, changed or not, and an upsert setting
    to_id cost about twice as much with identity_links_by_target as without it (a
    deletion's erasure reads that index). The second inserts new links and changes moved
    ones, and leaves those the first just touched alone."""
    conn.executemany(
        "UPDATE identity_links SET updated_at = ? WHERE namespace = ? AND from_id = ? AND to_id = ?",
        [(now, *link) for link in links],
    )
    conn.executemany(
        "INSERT INTO identity_links (namespace, from_id, to_id, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (namespace, from_id) DO UPDATE SET to_id = excluded.to_id, updated_at = excluded.updated_at"
        " WHERE identity_links.to_id IS NOT excluded.to_id",
        [(*link, now) for link in links],
    )


def _split_duplicates(
    events: Sequence[IncomingEvent], keys: Sequence[bytes], taken: set[bytes], fresh: list[bytes]
) -> tuple[list[IncomingEvent], list[int]]:
    """The events whose keys are not in ``taken``, the first of each key only, and the
    indexes of the others; the new keys go into ``taken`` and ``fresh``."""
    accepted: list[IncomingEvent] = []
    duplicates: list[int] = []
    for index, (key, event) in enumerate(zip(keys, events, strict=True)):
        if key in taken:
            duplicates.append(index)
            continue
        taken.add(key)
        fresh.append(key)
        accepted.append(event)
    return accepted, duplicates


def _keys_of(calls: list[EnqueueCall]) -> list[bytes]:
    """The dedupe keys of every event of ``calls``, in order. Calls from one source (the
    usual group) are hashed in one go: single-event calls hashed one call at a time cost
    about twice as much a key."""
    sources = set(map(_source_of, calls))
    if len(sources) == 1:
        # map() and chain() with C getters: no Python frame resumed per call or event.
        return dedupe_keys_of(sources.pop(), map(_message_id_of, chain.from_iterable(map(_events_of, calls))))
    keys: list[bytes] = []
    for call in calls:
        keys += dedupe_keys_of(call.source, [event.message_id for event in call.events])
    return keys


def _add_legacy_duplicates(
    conn: sqlite3.Connection, dedupe: DedupeKeys, calls: list[EnqueueCall], keys: list[bytes], taken: set[bytes]
) -> None:
    """Add to ``taken`` the keys of ids that only the string-keyed table of a file from
    schema version 1 still holds."""
    by_source: dict[str, dict[str, bytes]] = {}
    at = 0
    for call in calls:
        ids = by_source.setdefault(call.source, {})
        for index, event in enumerate(call.events):
            key = keys[at + index]
            if key not in taken:
                ids[event.message_id] = key
        at += len(call.events)
    for source, ids in by_source.items():
        taken.update(ids[m] for m in dedupe.stored_as_strings(conn, source, list(ids)))


# -- delivery -------------------------------------------------------------------------
# Leases live in the server's memory (sqlite_leases): a lease reads the table and writes
# nothing; each settle writes the job's row once, with the attempt count of its lease.
def _due_ids_unordered(
    conn: sqlite3.Connection, destination: str, limit: int, now: float, ahead: Collection[int], leases: Leases
) -> list[int]:
    # Held jobs are the oldest, so they come first: asking for as many more rows as there
    # are leases still finds ``limit`` others when there are that many.
    rows = conn.execute(
        f"SELECT id FROM jobs WHERE destination = ? AND {PENDING}"
        f" AND ((state = {QUEUED} AND available_at <= ?) OR (state = {LEASED} AND lease_until <= ?))"
        " ORDER BY id LIMIT ?",
        (destination, now, now, limit + len(leases) + len(ahead)),
    )
    ids: list[int] = []
    for (job_id,) in rows:
        # A job of ``ahead`` is due here only once its lease has lapsed; its holder still
        # settles it (fenced), so it must not be sent twice by the same loop meanwhile.
        if job_id in ahead or leases.held_now(job_id, now):
            continue
        ids.append(job_id)
        if len(ids) >= limit:
            break
    return ids


def _due_ids_ordered(
    conn: sqlite3.Connection, destination: str, limit: int, now: float, ahead: Collection[int], leases: Leases
) -> list[int]:
    selection = OrderedSelection(limit, now, ahead)
    while (query := selection.next_query()) is not None:
        after, excluded, window = query
        not_in = f" AND ordering_key NOT IN ({_marks(len(excluded))})" if excluded else ""
        cursor = conn.execute(
            "SELECT id, ordering_key, state, available_at, lease_until FROM jobs"
            f" WHERE destination = ? AND {PENDING} AND id > ?{not_in} ORDER BY id LIMIT ?",
            (destination, after, *excluded, window),
        )
        try:
            # Read lazily: the selection usually has its jobs long before the window ends.
            selection.take(leases.as_leased(cursor))
        finally:
            cursor.close()  # reset the statement before the SELECT that follows
    return selection.chosen


def _due_ids_in_order(
    conn: sqlite3.Connection, destination: str, limit: int, ahead: Collection[int], leases: Leases
) -> list[int] | None:
    """The first ``limit`` unsettled jobs outside ``ahead``, if they all come before any
    job that may not be due (jobs_waiting, or held by this server): then no ordering key
    is blocked, and the ordered walk would choose exactly these. None otherwise.

    Each chosen job is still checked to be QUEUED, due and not held (``_lease_ids``), which
    alone would choose right; the checks here spare the lease a wasted read of payloads
    when a job before them is held or waits for a retry."""
    if leases.holds_outside(ahead):
        # Another loop's batch (delivery.concurrency > 1): its users' later jobs wait for
        # it, and only the walk reads which jobs those are.
        return None
    first = conn.execute(f"SELECT MIN(id) FROM jobs WHERE destination = ? AND {WAITING}", (destination,)).fetchone()[0]
    # The index alone answers this (its rows hold the id): no table page is read.
    cursor = conn.execute(
        f"SELECT id FROM jobs WHERE destination = ? AND {PENDING} AND id < ? ORDER BY id LIMIT ?",
        (destination, MAX_JOB_ID if first is None else first, limit + len(ahead)),
    )
    # In C: a lease reads one id a job delivered.
    ids = list(filterfalse(ahead.__contains__, map(_ROW_ID, cursor)) if ahead else map(_ROW_ID, cursor))
    if len(ids) >= limit:
        return ids[:limit]
    return ids if first is None else None  # every unsettled job, or the walk's turn


def lease(
    conn: sqlite3.Connection,
    destination: str,
    limit: int,
    lease_seconds: float,
    ordered: bool,
    now: float | None,
    leases: Leases,
    ahead: Collection[int] = (),
) -> list[Job]:
    """``now``: the time of the lease (tests); None: the clock as the lease is taken."""
    if limit <= 0:
        return []
    if now is None:
        now = time.time()
    if ordered and (ids := _due_ids_in_order(conn, destination, limit, ahead, leases)) is not None:
        jobs = _lease_ids(conn, destination, ids, lease_seconds, now, leases, checked=False)
        if jobs is not None:
            return jobs
    due = _due_ids_ordered if ordered else _due_ids_unordered
    jobs = _lease_ids(conn, destination, due(conn, destination, limit, now, ahead, leases), lease_seconds, now, leases)
    assert jobs is not None
    return jobs


# A lease's row: Job's fields in order (the row's attempt count and first attempt as this
# lease makes them, for a job this server does not hold), then whether the job is due and
# the row's own count. See _lease_ids.
_LEASE_COLUMNS = (
    "id, ?, source, message_id, ordering_key, payload, attempts + 1, created_at,"
    f" COALESCE(first_attempt_at, ?), COALESCE(delivered_outputs, X''), state = {QUEUED} AND available_at <= ?,"
    " attempts"
)
_JOB_FIELDS = itemgetter(*range(len(Job._fields)))
_ROW_ID = itemgetter(0)
_ROW_ATTEMPTS = itemgetter(6)  # counting this lease
_ROW_FIRST = itemgetter(8)
_ROW_DUE = itemgetter(10)
_ROW_COUNTED = itemgetter(11)


def _lease_ids(
    conn: sqlite3.Connection,
    destination: str,
    ids: list[int],
    lease_seconds: float,
    now: float,
    leases: Leases,
    checked: bool = True,
) -> list[Job] | None:
    """Lease the jobs ``ids``; if not ``checked`` (due), None when one is not QUEUED and due."""
    if not ids:
        return []
    rows = conn.execute(
        f"SELECT {_LEASE_COLUMNS} FROM jobs WHERE id IN ({_marks(len(ids))})", (destination, now, now, *ids)
    ).fetchall()
    rows.sort(key=_ROW_ID)
    until = now + lease_seconds
    if leases.holds_none(map(_ROW_ID, rows)):
        # The usual lease: no job of it held here already, so each row says all its job
        # needs. The jobs and their leases are built in C, not by a Python step per job
        # (a lease makes one of each for every job delivered).
        if not (checked or all(map(_ROW_DUE, rows))):
            return None  # the ordered walk decides
        jobs = list(map(new_tuple, repeat(Job), map(_JOB_FIELDS, rows)))
        # strict=False: repeat() never ends; every other part is one item a row.
        held_tuples = zip(
            map(_ROW_ATTEMPTS, rows), repeat(until), map(_ROW_FIRST, rows), map(_ROW_COUNTED, rows), strict=False
        )
        leases.hold(list(zip(map(_ROW_ID, rows), map(new_tuple, repeat(Held), held_tuples), strict=True)))
        return jobs
    jobs = []
    leased: list[tuple[int, Held]] = []
    for row in rows:
        job_id, due = row[0], row[10]
        if not (checked or due):
            return None  # the ordered walk decides
        # A lapsed lease of this server's counts: the row does not know of it yet.
        before = leases.get(job_id)
        if before is None:
            held = new_tuple(Held, (row[6], until, row[8], row[11]))
        elif not checked:
            return None  # held (_due_ids_in_order bounds its choice below these)
        else:
            held = new_tuple(Held, (before.attempts + 1, until, before.first_attempt_at, before.counted))
        leased.append((job_id, held))
        jobs.append(
            Job(
                job_id,
                destination,
                row[2],
                row[3],
                row[4],
                row[5],
                held.attempts,
                row[7],
                held.first_attempt_at,
                row[9],
            )
        )
    leases.hold(leased)
    return jobs


# Every settle matches a job by id and, when fenced in SQL, by its row's attempt count:
# "(? IS NULL OR attempts = ?)" with the count twice, or None twice. A job this server
# holds was checked against its lease already (Leases.settling) and is matched by id.
_FENCED = "id = ? AND (? IS NULL OR attempts = ?)"
# A job a settle that gives it back (retry, release, defer) may still change: held by this
# server (its lease's count given: not NULL), or a row an earlier version left LEASED. Any
# other unsettled row is QUEUED and held by nobody: given back since, its row's count may be
# the late holder's again (a lapsed attempt counts), which the fence alone would match.
_STILL_LEASED = f"{PENDING} AND (? IS NOT NULL OR state = {LEASED})"


# A Settling's (fence, attempts), and its job id, read in C (see _by_fence).
_FENCE_AND_ATTEMPTS = itemgetter(1, 2)
_JOB_ID = itemgetter(0)


def _by_fence(settling: Sequence[Settling]) -> Iterator[tuple[int | None, int | None, Sequence[int]]]:
    """(SQL fence, attempts to record, job ids), in chunks: one statement per group settles
    what one step per job did. A lease's jobs nearly always share one group."""
    groups: dict[tuple[int | None, int | None], list[int]] = {}
    keys = set(map(_FENCE_AND_ATTEMPTS, settling))
    if len(keys) == 1:
        # The usual case, one group: made in C, not a Python step per job.
        groups[keys.pop()] = list(map(_JOB_ID, settling))
    else:
        for s in settling:
            groups.setdefault((s.fence, s.attempts), []).append(s.job_id)
    for (fence, attempts), ids in groups.items():
        for chunk in _chunks(ids):
            yield fence, attempts, chunk


def ack(
    conn: sqlite3.Connection,
    job_ids: Sequence[int],
    mapping_version: str,
    now: float,
    leases: Leases,
    fence: Fence | None = None,
    erase_links: ErasedLinks | None = None,
    merge_links: MergedLinks | None = None,
) -> None:
    # The payload of a delivered job is never read again; dropping it keeps the file small.
    for fenced, attempts, ids in _by_fence(leases.settling(job_ids, fence)):
        conn.execute(
            f"UPDATE jobs SET state = {DELIVERED}, settled_at = ?, mapping_version = ?, lease_until = NULL,"
            " attempts = COALESCE(?, attempts), payload = X''"
            f" WHERE id IN ({_marks(len(ids))}) AND state < {DELIVERED} AND (? IS NULL OR attempts = ?)",
            (now, mapping_version, attempts, *ids, fenced, fenced),
        )
    if merge_links or erase_links:
        for step in link_steps(merge_links, erase_links):  # in job order: see link_steps
            if step.merges:
                _merge_links(conn, step.merges)
            else:
                _erase_links(conn, step.erasures)


_LINK_COLUMNS = "namespace, from_id, to_id, updated_at"
_BY_TARGET = "INDEXED BY identity_links_by_target"


def _merge_links(conn: sqlite3.Connection, merge_links: MergedLinks) -> None:
    """Store.ack's ``merge_links``, in the ack's transaction, for the jobs now delivered."""
    stored = [
        row
        for chunk in _chunks(list(merge_links))
        for row in conn.execute(
            f"SELECT id, destination, created_at FROM jobs WHERE id IN ({_marks(len(chunk))}) AND state = {DELIVERED}",
            chunk,
        )
    ]
    merges = merges_of(stored, merge_links)
    if not merges:
        return
    held: list[LinkRow] = []
    for namespace in {m.namespace for m in merges}:
        ids = list({m.merged for m in merges if m.namespace == namespace})
        for chunk in _chunks(ids):
            marks = _marks(len(chunk))
            # One statement by each index, as _erase_links does, for the same reason.
            for by in (
                f"WHERE namespace = ? AND from_id IN ({marks})",
                f"{_BY_TARGET} WHERE namespace = ? AND to_id IN ({marks})",
            ):
                held.extend(
                    map(
                        LinkRow._make,
                        conn.execute(f"SELECT {_LINK_COLUMNS} FROM identity_links {by}", (namespace, *chunk)),
                    )
                )
    conn.executemany(
        "INSERT INTO identity_links (namespace, from_id, to_id, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (namespace, from_id) DO UPDATE SET to_id = excluded.to_id, updated_at = excluded.updated_at",
        plan_merges(merges, held, str),
    )


def _erase_links(conn: sqlite3.Connection, erase_links: ErasedLinks) -> None:
    """Store.ack's ``erase_links``, in the ack's transaction: only for a job now delivered
    (one whose fence failed is another holder's to ack, and to erase with)."""
    for job_id, ids in erase_links.items():
        row = conn.execute(f"SELECT destination, created_at FROM jobs WHERE id = ? AND state = {DELIVERED}", (job_id,))
        found = row.fetchone()
        if found is None or not ids:
            continue
        for chunk in _chunks(list(ids)):
            marks = _marks(len(chunk))
            params = (found[0], *chunk, found[1])
            # Two statements, one by each index: an OR of the two read every link of the
            # namespace, on the writer every ingest waits for. So did the second without
            # INDEXED BY: with no statistics, SQLite prefers the key's namespace prefix.
            conn.execute(
                f"DELETE FROM identity_links WHERE namespace = ? AND from_id IN ({marks}) AND updated_at <= ?", params
            )
            conn.execute(
                "DELETE FROM identity_links INDEXED BY identity_links_by_target"
                f" WHERE namespace = ? AND to_id IN ({marks}) AND updated_at <= ?",
                params,
            )
            # The user's dead letters stored before the deletion, and its discards: replayed
            # later, one would create the deleted user again (MoEngage makes a user of any
            # identifiers it is sent), and the store would keep who they were.
            conn.execute(
                f"DELETE FROM dead_letters WHERE destination = ? AND ordering_key IN ({marks}) AND created_at <= ?",
                params,
            )
            conn.execute(f"DELETE FROM discards WHERE destination = ? AND ordering_key IN ({marks})", params[:-1])


def _record_delivered(conn: sqlite3.Connection, settling: Sequence[Settling], delivered: Delivered | None) -> None:
    """Keep with each partly delivered job of ``settling`` the outputs it has delivered so
    far. Run before the settle's own statement, which may change the count a fence checks."""
    if not delivered:
        return
    conn.executemany(
        f"UPDATE jobs SET delivered_outputs = ? WHERE {_FENCED} AND {_STILL_LEASED}",
        [(digests, s.job_id, s.fence, s.fence, s.attempts) for s in settling if (digests := delivered.get(s.job_id))],
    )


def retry(
    conn: sqlite3.Connection,
    job_ids: Sequence[int],
    available_at: float,
    error: str,
    leases: Leases,
    fence: Fence | None = None,
    delivered: Delivered | None = None,
) -> None:
    settling = leases.settling(job_ids, fence)
    _record_delivered(conn, settling, delivered)
    # Only a leased job goes back to wait: this server's, or one an earlier version left
    # LEASED in the table.
    conn.executemany(
        f"UPDATE jobs SET state = {QUEUED}, available_at = ?, lease_until = NULL, last_error = ?,"
        " attempts = COALESCE(?, attempts), first_attempt_at = COALESCE(?, first_attempt_at)"
        f" WHERE state < {DELIVERED} AND (? IS NOT NULL OR state = {LEASED}) AND {_FENCED}",
        [
            (available_at, error, s.attempts, s.first_attempt_at, s.attempts, s.job_id, s.fence, s.fence)
            for s in settling
        ],
    )


def release(
    conn: sqlite3.Connection,
    job_ids: Sequence[int],
    leases: Leases,
    fence: Fence | None = None,
    delivered: Delivered | None = None,
) -> None:
    # A held job's row never counted its lease: dropping the lease gives it back as it was,
    # but for the attempts of leases of ours that lapsed before it.
    # A row an earlier version left LEASED is given back the way that version did: the
    # attempt uncounted, and a first attempt forgotten, so the retry budget (measured from
    # it) does not run while it was never tried.
    settling = leases.settling(job_ids, fence)
    _record_delivered(conn, settling, delivered)
    _release(conn, settling)


def defer(
    conn: sqlite3.Connection,
    job_ids: Sequence[int],
    available_at: float,
    reason: str,
    leases: Leases,
    fence: Fence | None = None,
    delivered: Delivered | None = None,
) -> None:
    """Release, due again at ``available_at``: the attempt is not counted."""
    settling = leases.settling(job_ids, fence)
    _record_delivered(conn, settling, delivered)
    # Before the release, while a row an earlier version left LEASED still has its fence.
    conn.executemany(
        f"UPDATE jobs SET available_at = ?, last_error = ? WHERE {_FENCED} AND {_STILL_LEASED}",
        [(available_at, reason, s.job_id, s.fence, s.fence, s.attempts) for s in settling],
    )
    _release(conn, settling)


def _release(conn: sqlite3.Connection, settling: Sequence[Settling]) -> None:
    # Attempts of lapsed leases of ours that came before: they happened, and count.
    lapsed = [
        (s.attempts - 1, s.first_attempt_at, s.job_id)
        for s in settling
        if s.attempts is not None and s.counted is not None and s.attempts - 1 > s.counted
    ]
    conn.executemany(
        f"UPDATE jobs SET attempts = ?, first_attempt_at = COALESCE(first_attempt_at, ?) WHERE id = ? AND {PENDING}",
        lapsed,
    )
    unheld = [s for s in settling if s.attempts is None]
    conn.executemany(
        f"UPDATE jobs SET state = {QUEUED}, lease_until = NULL, attempts = MAX(attempts - 1, 0),"
        " first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END"
        f" WHERE state = {LEASED} AND {_FENCED}",
        [(s.job_id, s.fence, s.fence) for s in unheld],
    )


def dead_letter(
    conn: sqlite3.Connection,
    entries: Sequence[DeadLetter],
    now: float,
    leases: Leases,
    fence: Fence | None = None,
) -> None:
    entries = _first_per_job(entries)
    settling = {s.job_id: s for s in leases.settling([e.job_id for e in entries], fence)}
    conn.executemany(
        "INSERT INTO dead_letters (destination, source, message_id, ordering_key, payload, reason, status,"
        " response_body, request_body, label, attempts, created_at, first_attempt_at, failed_at,"
        " mapping_version, delivered_outputs)"
        " SELECT destination, source, message_id, ordering_key, payload, ?, ?, ?, ?, ?, COALESCE(?, attempts),"
        " created_at, COALESCE(?, first_attempt_at), ?, ?, COALESCE(?, delivered_outputs)"
        f" FROM jobs WHERE {_FENCED} AND state < {DELIVERED}",
        [
            (
                e.reason,
                e.status,
                e.response_body,
                e.request_body,
                e.label,
                s.attempts,
                s.first_attempt_at,
                now,
                e.mapping_version,
                e.delivered_outputs or None,
                s.job_id,
                s.fence,
                s.fence,
            )
            for e in entries
            if (s := settling.get(e.job_id)) is not None
        ],
    )
    _delete_settled(conn, settling.values())


def discard(
    conn: sqlite3.Connection, entries: Sequence[Discard], now: float, leases: Leases, fence: Fence | None = None
) -> None:
    entries = _first_per_job(entries)
    settling = {s.job_id: s for s in leases.settling([e.job_id for e in entries], fence)}
    conn.executemany(
        "INSERT INTO discards (destination, source, message_id, payload, reason, label, detail,"
        " discarded_at, ordering_key, delivered_outputs) SELECT destination, source, message_id, payload,"
        f" ?, ?, ?, ?, ordering_key, delivered_outputs FROM jobs WHERE {_FENCED} AND state < {DELIVERED}",
        [
            (e.reason, e.label, e.detail, now, s.job_id, s.fence, s.fence)
            for e in entries
            if (s := settling.get(e.job_id)) is not None
        ],
    )
    _delete_settled(conn, settling.values())


_Entry = TypeVar("_Entry", DeadLetter, Discard)


def _first_per_job(entries: Sequence[_Entry]) -> list[_Entry]:
    """One entry per job, the first (as PostgreSQL's store): a job named twice would
    otherwise drop its lease with the first and, matched by the row's stale count with
    the second, be neither moved nor left held."""
    seen: dict[int, _Entry] = {}
    for entry in entries:
        seen.setdefault(entry.job_id, entry)
    return list(seen.values())


def _delete_settled(conn: sqlite3.Connection, settling: Iterable[Settling]) -> None:
    """Drop the jobs just copied out: the same match, in the same transaction."""
    conn.executemany(
        f"DELETE FROM jobs WHERE {_FENCED} AND state < {DELIVERED}", [(s.job_id, s.fence, s.fence) for s in settling]
    )


def resolve_links(conn: sqlite3.Connection, namespace: str, ids: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for chunk in _chunks(list(dict.fromkeys(ids))):
        rows = conn.execute(
            f"SELECT from_id, to_id FROM identity_links WHERE namespace = ? AND from_id IN ({_marks(len(chunk))})",
            (namespace, *chunk),
        )
        found.update((row[0], row[1]) for row in rows)
    return found


# -- operators -------------------------------------------------------------------------
def list_dead(conn: sqlite3.Connection, flt: RecordFilter, limit: int) -> list[DeadLetterRecord]:
    where, params = record_where(flt, "failed_at")
    rows = conn.execute(
        f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters{where} ORDER BY failed_at DESC, id DESC LIMIT ?",
        (*params, limit),
    )
    return [dead_letter_record(r) for r in rows]


# A replay or purge runs as slices (Store.replay_dead and RECORD_SLICE), each one of these
# in its own transaction: (records done, the id the next slice starts after, or None when
# this was the last).
Slice = tuple[int, int | None]


def last_record_id(conn: sqlite3.Connection, table: str) -> int:
    """The highest id in ``table`` (dead_letters or discards): where a replay or purge
    stops. A record added while it runs has a higher id, so it is left for the next one, as
    a single transaction would have left it: a replayed job dead-lettered again meanwhile
    (a destination still refusing) is not moved over and over by the same replay."""
    return int(conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0])


def _slice_ids(
    conn: sqlite3.Connection, table: str, time_column: str, flt: RecordFilter, after: int, upto: int, limit: int
) -> list[int]:
    """The first ``limit`` ids of matching records of ``table`` after ``after`` and up to
    ``upto``, in order. Every record a slice takes leaves the table or is passed by
    ``after``, so slices neither skip a record nor take one twice."""
    where, params = record_where(flt, time_column)
    where += " AND id > ? AND id <= ?" if where else " WHERE id > ? AND id <= ?"
    rows = conn.execute(f"SELECT id FROM {table}{where} ORDER BY id LIMIT ?", (*params, after, upto, limit))
    return [row[0] for row in rows]


def _sliced(ids: list[int], done: int, limit: int) -> Slice:
    return done, ids[-1] if len(ids) == limit else None


def replay_dead_slice(
    conn: sqlite3.Connection, flt: RecordFilter, now: float, after: int, upto: int, limit: int
) -> Slice:
    return _replay_slice(conn, "dead_letters", "failed_at", flt, now, after, upto, limit)


def replay_discards_slice(
    conn: sqlite3.Connection, flt: RecordFilter, now: float, after: int, upto: int, limit: int
) -> Slice:
    return _replay_slice(conn, "discards", "discarded_at", flt, now, after, upto, limit)


def _replay_slice(
    conn: sqlite3.Connection,
    table: str,
    time_column: str,
    flt: RecordFilter,
    now: float,
    after: int,
    upto: int,
    limit: int,
) -> Slice:
    """Move the next slice of matching records of ``table`` back into the queue as fresh
    jobs, in their order, with their payloads (re-mapped by the current mapping when
    leased) and the outputs they had delivered (not sent again)."""
    ids = _slice_ids(conn, table, time_column, flt, after, upto, limit)
    inserted = 0
    for chunk in _chunks(ids):
        marks = _marks(len(chunk))
        inserted += conn.execute(
            "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, attempts,"
            " available_at, created_at, delivered_outputs) SELECT destination, source, message_id, ordering_key,"
            f" payload, {QUEUED}, 0, ?, ?, delivered_outputs FROM {table} WHERE id IN ({marks}) ORDER BY id",
            (now, now, *chunk),
        ).rowcount
        conn.execute(f"DELETE FROM {table} WHERE id IN ({marks})", chunk)
    return _sliced(ids, inserted, limit)


def purge_dead_slice(conn: sqlite3.Connection, flt: RecordFilter, after: int, upto: int, limit: int) -> Slice:
    ids = _slice_ids(conn, "dead_letters", "failed_at", flt, after, upto, limit)
    deleted = 0
    for chunk in _chunks(ids):
        deleted += conn.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(len(chunk))})", chunk).rowcount
    return _sliced(ids, deleted, limit)


def list_discards(conn: sqlite3.Connection, flt: RecordFilter, limit: int) -> list[DiscardRecord]:
    where, params = record_where(flt, "discarded_at")
    rows = conn.execute(
        "SELECT id, destination, source, message_id, payload, reason, label, detail, discarded_at"
        f" FROM discards{where} ORDER BY discarded_at DESC, id DESC LIMIT ?",
        (*params, limit),
    )
    return [DiscardRecord(*row) for row in rows]


# The destinations with unsettled jobs, found by seeking the partial index once per
# destination (a "loose index scan") rather than reading every queued job.
_QUEUED_DESTINATIONS = f"""
WITH RECURSIVE d(name) AS (
    SELECT (SELECT MIN(destination) FROM jobs WHERE {PENDING})
    UNION ALL
    SELECT (SELECT MIN(destination) FROM jobs WHERE {PENDING} AND destination > d.name)
    FROM d WHERE d.name IS NOT NULL
)
SELECT name FROM d WHERE name IS NOT NULL"""


def queue_stats(conn: sqlite3.Connection) -> dict[str, QueueStats]:
    """Depth and head-of-queue time per destination, from the jobs_pending index alone.

    The gauges refresh every few seconds while the queue may hold millions of jobs. One
    GROUP BY with MIN(created_at) read every queued row, payload pages included (60 ms of
    CPU at 200k jobs, on the core that answers ingest). Counting index entries costs a
    tenth of that, and the oldest job is the first in id order: ids and created_at both
    follow commit order (a replay re-queues with the time of the replay)."""
    stats: dict[str, QueueStats] = {}
    for (destination,) in conn.execute(_QUEUED_DESTINATIONS).fetchall():
        (depth,) = conn.execute(
            f"SELECT COUNT(*) FROM jobs WHERE destination = ? AND {PENDING}", (destination,)
        ).fetchone()
        (oldest,) = conn.execute(
            f"SELECT created_at FROM jobs WHERE destination = ? AND {PENDING} ORDER BY id LIMIT 1",
            (destination,),
        ).fetchone()
        stats[destination] = QueueStats(depth=depth, oldest_created_at=oldest)
    for destination, dead in conn.execute("SELECT destination, COUNT(*) FROM dead_letters GROUP BY destination"):
        current = stats.get(destination, QueueStats(depth=0, oldest_created_at=None))
        stats[destination] = QueueStats(current.depth, current.oldest_created_at, dead)
    return stats


def users_waiting(
    conn: sqlite3.Connection, destination: str, before: int, users: Sequence[str], ignore: Collection[int]
) -> set[str]:
    waiting: set[str] = set()
    for user in dict.fromkeys(users):
        # A key holds one user, or several joined by KEY_SEPARATOR (an alias): matched whole.
        # One row more than ``ignore`` has: if any is not ignored, one of those is not.
        rows = conn.execute(
            f"SELECT id FROM jobs WHERE destination = ? AND {PENDING} AND id < ?"
            " AND instr(char(31) || ordering_key || char(31), ?) > 0 LIMIT ?",
            (destination, before, f"{KEY_SEPARATOR}{user}{KEY_SEPARATOR}", len(ignore) + 1),
        ).fetchall()
        if any(job_id not in ignore for (job_id,) in rows):
            waiting.add(user)
    return waiting


def delivered_version(conn: sqlite3.Connection, destination: str, message_id: str) -> str | None:
    row = conn.execute(
        "SELECT mapping_version FROM jobs WHERE destination = ? AND message_id = ?"
        f" AND state = {DELIVERED} ORDER BY id DESC LIMIT 1",
        (destination, message_id),
    ).fetchone()
    return None if row is None else str(row[0])


def get_destination_states(conn: sqlite3.Connection) -> dict[str, DestinationState]:
    states: dict[str, DestinationState] = {}
    for name, paused, reason, changed_at, extra in conn.execute(
        "SELECT name, paused, reason, changed_at, extra FROM destination_state"
    ):
        states[name] = DestinationState(name, bool(paused), reason, changed_at, orjson.loads(extra))
    return states


def set_destination_state(conn: sqlite3.Connection, state: DestinationState) -> None:
    conn.execute(
        "INSERT INTO destination_state (name, paused, reason, changed_at, extra) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, reason = excluded.reason,"
        " changed_at = excluded.changed_at, extra = excluded.extra",
        (state.name, int(state.paused), state.reason, state.changed_at, orjson.dumps(state.extra).decode()),
    )


def last_job_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0])


def make_due_step(
    conn: sqlite3.Connection, destination: str, after: int, upto: int, limit: int, now: float
) -> tuple[int, int | None]:
    """One step of ``Store.make_due``: the next ``limit`` unsettled jobs of ``destination``
    after id ``after`` and up to ``upto``, by the pending index. Returns (jobs made due,
    where the next step starts, or None when this was the last)."""
    ids = [
        row[0]
        for row in conn.execute(
            f"SELECT id FROM jobs WHERE destination = ? AND {PENDING} AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (destination, after, upto, limit),
        )
    ]
    if not ids:
        return 0, None
    changed = conn.execute(
        f"UPDATE jobs SET available_at = ? WHERE id IN ({_marks(len(ids))}) AND state = {QUEUED} AND available_at > ?",
        (now, *ids, now),
    ).rowcount
    return int(changed), ids[-1] if len(ids) == limit else None


def heartbeat(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(
        "INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
        (now,),
    )


def prune_delivered_step(conn: sqlite3.Connection, after: int, limit: int) -> tuple[int, int | None]:
    """One step of reclaiming a full store: delete the next ``limit`` delivered-job records
    after id ``after``, in id order (a walk of the table by rowid, which only an ack's
    record matches). Returns (rows removed, where the next step starts, or None at the end)."""
    ids = [
        row[0]
        for row in conn.execute(
            f"SELECT id FROM jobs WHERE id > ? AND state = {DELIVERED} ORDER BY id LIMIT ?", (after, limit)
        )
    ]
    if not ids:
        return 0, None
    removed = conn.execute(
        f"DELETE FROM jobs WHERE id >= ? AND id <= ? AND state = {DELIVERED}", (ids[0], ids[-1])
    ).rowcount
    return int(removed), ids[-1] if len(ids) == limit else None


def prune_settled_step(conn: sqlite3.Connection, after: int, before: float, limit: int) -> tuple[int, int | None]:
    """One step of the periodic prune: walk the next ``limit`` jobs after id ``after``, in
    id order, and delete the delivered ones settled before ``before``. Returns (rows
    removed, where the next step starts, or None once the walk is done).

    No index has settled_at (an ack would pay to keep one), so a single DELETE by it
    scanned the whole table, every delivered record of ``retention_hours``, in one writer
    operation that every acknowledgement waited behind. A job is settled after it was
    created, and ids are handed out in creation order, so the walk ends at the first job
    created at or after ``before``: it reads what is old enough to go (and the old jobs
    still waiting), not the rest of the table. (A clock set back may leave a few records
    a prune longer; the next one, with a later ``before``, takes them.)"""
    rows = conn.execute("SELECT id, created_at FROM jobs WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
    upto, next_after = after, (rows[-1][0] if len(rows) == limit else None)
    for job_id, created_at in rows:
        if created_at >= before:
            next_after = None
            break
        upto = job_id
    if upto == after:
        return 0, next_after
    removed = conn.execute(
        f"DELETE FROM jobs WHERE id > ? AND id <= ? AND state = {DELIVERED} AND settled_at < ?", (after, upto, before)
    ).rowcount
    return int(removed), next_after


def prune_discards_step(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` of the oldest discards from before ``before`` (their time's
    index gives them in order); fewer than ``limit`` means none is left."""
    return int(
        conn.execute(
            "DELETE FROM discards WHERE id IN (SELECT id FROM discards WHERE discarded_at < ? ORDER BY discarded_at"
            " LIMIT ?)",
            (before, limit),
        ).rowcount
    )
