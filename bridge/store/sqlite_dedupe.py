"""Dedupe keys for the SQLite store, written so that ingest stays sequential on disk.

Message ids are random (UUIDs), so inserting each one into a key B-tree as it arrives
dirties one B-tree page per event, and every commit rewrites those pages: that alone cut
enqueue throughput by more than half. Instead the new keys of each commit group are
appended to ``dedupe_recent`` as one row (no index: sequential, cheap) and kept in
memory; once enough have gathered they are merged into the B-tree in key order, so each
page is rewritten once per merge rather than once per commit. The merge runs in
key-range slices between other operations, so ingest never waits for one long rewrite.

A row holds many keys, end to end (schema version 4): a row per key cost about 1.3 us a
key in SQLite alone, most of a batch event's dedupe (docs/benchmarks.md, session 12).

Generations (schema version 5): the merges of GENERATION_SECONDS go into one table
(``dedupe_generations`` lists them, oldest first), and a prune drops a whole table once
its newest merge is older than ``dedupe_hours``. In one table for all, keys expired in
merge order but sat in key order, a few of each merge to a leaf across the whole tree,
so deleting them rewrote most of its leaves at every prune (docs/benchmarks.md, session
31). A key counts from its merge's time, not its arrival: it is kept at least
``dedupe_hours`` after it arrived, and at most the wait for its merge (a merge starts
every MERGE_AT keys and before every prune) plus GENERATION_SECONDS longer. A lookup
asks every generation's table; a version-4 file's ``dedupe_keys`` is its oldest.

The B-tree holds a 16-byte digest per key (``dedupe_key``), not the strings. A merge
of random ids touches about one leaf per key once the table is bigger than a merge, and
a lookup of a fresh id reads a leaf nobody read lately: the size of a row decides how
many leaves there are to touch and to miss. Files from before keep their string-keyed
``dedupe`` table, read as well until pruning empties it.

The in-memory sets cover exactly the keys of ``dedupe_recent``'s rows, so only one process
may ingest into a file at a time (the CLI only reads, replays and prunes). A store that
opens the file loads whatever an earlier process left in ``dedupe_recent``.

A lookup asks SQLite only about the keys a Bloom filter (``key_filter``) cannot rule out.
The filter holds every key of the generations: it is built once the store ingests, by
walking their B-trees in writer steps (lookups go to SQLite until it is complete), and
every new key goes into it as it arrives. Pruning cannot take keys out of it, so once half
of its keys have been pruned it is built again, the old one serving meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from bridge.store.base import StoreError
from bridge.store.key_filter import DEFAULT_BITS_LOG2, KeyFilter
from bridge.store.sqlite_writer import GroupCommitWriter

KEY_BYTES = 16
# Keys per dedupe_recent row: a commit group's keys in one row, up to 16 KB of them.
KEYS_PER_ROW = 1024
# The keys of dedupe_recent's rows, one per result row, split in SQL: a merge copies them
# without calling back into Python for each (splitting 100k keys there took 30 ms of GIL).
# temp.key_slots holds 0..KEYS_PER_ROW-1 (``_slots``).
ROW_KEYS = (
    "SELECT substr(r.k, 1 + 16 * s.n, 16) AS k FROM dedupe_recent AS r"
    " JOIN temp.key_slots AS s ON s.n < length(r.k) / 16"
)

# Keys held in memory before a merge starts: about 80 bytes each. Bigger merges touch
# fewer B-tree leaves per key: with random ids, 100k against 25k kept enqueue at 13 us per
# event instead of 20 once 3M keys were stored (docs/benchmarks.md).
MERGE_AT = 100_000
# A merge files at least this many keys of its snapshot, and inserts at least this many
# keys into the B-tree, per writer operation (a few ms each): ingest interleaves with it.
MERGE_STEP = 2000
# ...and MERGE_PACE times as many keys as arrived since its previous step. Each step waits
# for a commit, and under full load a commit brings more new keys than a fixed step
# merges: the merge fell behind until memory ran over and ``add`` merged everything at
# once (100k keys, a 300-500 ms stall). A merge of K keys takes 2K/step steps, so at a
# pace P the keys arriving meanwhile are 2K/P: below K for any P > 2.
MERGE_PACE = 4
# A whole merge holds the writer (and every acknowledgement) while it runs, about 3 us a
# key: it only happens when the sliced merge has fallen this far behind.
FALLBACK_FACTOR = 2
# Far below SQLite's limit on bound parameters (32766 since 3.32).
CHUNK = 30000
# Keys a filter build reads (or copies from memory) per writer operation: a few ms.
FILTER_STEP = 20000


SQL_KEY_FUNCTION = "bridge_dedupe_key"
# Up to KEYS_PER_ROW of a merge step's keys, sorted and end to end in one blob (?1), split
# in SQL in their order: one parameter to bind instead of one per key. Against 500-row
# VALUES statements, 1.04-1.19 us a key instead of 1.34-1.45 into a B-tree of 300k keys
# (docs/benchmarks.md, session 19). ``{table}`` is a generation's table (``generations``).
MERGED_KEYS_INSERT = (
    "INSERT OR IGNORE INTO {table} (k)"
    " SELECT substr(?1, 1 + 16 * n, 16) FROM temp.key_slots WHERE n < length(?1) / 16 ORDER BY n"
)
# The merges of this many seconds go into one generation's table (see the module
# docstring): a key is kept at most this much longer than dedupe_hours, and a window of
# 48 h is read from 13 tables.
GENERATION_SECONDS = 4 * 3600.0
# Generation tables are named by their catalog id; an upgraded file's version-4 key table
# keeps its own name (and its seen_at column, which nothing reads any more).
GENERATION_PREFIX = "dedupe_keys_"
V4_KEYS = "dedupe_keys"


def dedupe_keys_of(source: str, message_ids: Iterable[str]) -> list[bytes]:
    """The keys (source, message_id) pairs are stored under: 16 bytes of BLAKE2b each.

    128 bits: two different ids share a key with odds of about n^2 / 2^129 for n stored
    keys (1e-19 at 10 billion), the same odds a random UUID4 relies on for being unique.
    A shared key would take a new event for a duplicate, so fewer bits would not do.
    The source goes in behind its length: no separator, which a source name or an id
    could contain, so no two different pairs hash the same bytes."""
    prefix = _hashed_source(source)
    keys: list[bytes] = []
    for message_id in message_ids:
        h = prefix.copy()
        h.update(message_id.encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys


@functools.lru_cache(maxsize=256)
def _hashed_source(source: str) -> hashlib.blake2b:
    """The hash state after the source's part: copying it is about half the cost of
    hashing the whole input again for every id (and a single call's id gets it cached)."""
    head = source.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(len(head).to_bytes(4, "big") + head, digest_size=16)


def dedupe_key(source: str, message_id: str) -> bytes:
    return dedupe_keys_of(source, (message_id,))[0]


def register_functions(conn: sqlite3.Connection) -> None:
    """``bridge_dedupe_key(source, message_id)`` in SQL: opening a file of schema version 1 or
    2 turns its waiting (source, message_id) rows into keys with it."""
    conn.create_function(SQL_KEY_FUNCTION, 2, dedupe_key, deterministic=True)


class DedupeKeys:
    def __init__(
        self,
        writer: GroupCommitWriter,
        merge_at: int = MERGE_AT,
        min_step: int = MERGE_STEP,
        filter_bits_log2: int = DEFAULT_BITS_LOG2,
    ) -> None:
        self._writer = writer
        self._merge_at = merge_at
        self.min_step = min_step
        self.added = 0  # keys ever added (the merge's pace follows it)
        self._paced_at = 0
        # The keys (dedupe_key digests, about 80 bytes each in a set against 200 for the
        # strings) of dedupe_recent's rows, in two sets: those of the merge under way
        # (``_merging``, until its finish commits) and those since (``_recent``). A merge
        # takes the one set whole and starts the other empty. It used to copy it (1 ms and
        # 4 MB at 100k keys) and, once finished, take the merged keys out of it one by one:
        # 7-12 ms holding the GIL, and a set of a merge and a half of keys whose table
        # moved between 2, 4 and 8 MB (docs/benchmarks.md, session 32).
        self._recent: set[bytes] = set()
        self.merging = False  # set and cleared by the store's merge task
        self._merging: set[bytes] = set()
        # Counts whole merges (``merge``). One can run while a sliced merge is under way
        # (``add`` falls back to it when memory runs over): it empties dedupe_recent and
        # takes those keys out of memory itself, which the sliced merge must then not redo.
        self._whole_merges = 0
        self._planned_at = 0
        self._merge_time = 0.0  # the time of the merge under way: its keys count from it
        self._target: tuple[int, str] = (0, "")  # the generation (id, table) it goes into
        # The last dedupe_recent row whose keys are in memory: loaded at open or added since.
        # A CLI opened while the server ingests knows only the rows there were then.
        self._known_to = 0
        self._unfiled: Iterator[bytes] = iter(())  # the merge's keys not yet filed by first byte
        self._buckets: list[list[bytes]] = []  # the merge's keys by first byte
        self._bucket_at = 0  # the next bucket to merge
        # The string-keyed table of a file from before schema version 2 still has keys.
        self.legacy = False
        self._filter_bits = filter_bits_log2
        # Holds every key of the generations (and more): lookups trust it once it is set.
        self.filter: KeyFilter | None = None
        self._building: FilterBuild | None = None  # a filter under construction
        self.pruned_since_filter = 0  # keys pruned since the filter in use went into use
        # ``wants_merge or wants_filter`` as ``add`` last saw them (True until then): the
        # store reads this one attribute after every enqueue instead of two properties,
        # and asks them only when it is set. ``add`` runs in the enqueue it answers, so it
        # has seen every prune, merge and filter change that came before that enqueue.
        self.may_want_work = True

    @property
    def wants_merge(self) -> bool:
        return not self.merging and len(self._recent) >= self._merge_at

    @property
    def wants_filter(self) -> bool:
        """No filter yet, or half the keys in the one in use have been pruned since."""
        if self._building is not None:
            return False
        return self.filter is None or 0 < self.filter.count <= 2 * self.pruned_since_filter

    def stored(self, conn: sqlite3.Connection, keys: Sequence[bytes]) -> set[bytes]:
        """Which of ``keys`` (``dedupe_keys_of``) were stored before: in memory or on disk.
        With ``legacy`` set, the caller also asks ``stored_as_strings``.

        The keys go into the filter in use as they are looked up (``check_and_add``): the
        caller records the new ones with ``add`` in the same operation, and a key that is
        not recorded after all (a duplicate, a rollback) only leaves a bit set, which the
        filter allows: it may say "maybe" for a key it does not hold."""
        recent, merging = self._recent, self._merging
        if recent.isdisjoint(keys) and merging.isdisjoint(keys):  # the usual case, in C
            unknown = list(keys)
            found: set[bytes] = set()
        else:
            unknown = [k for k in keys if k not in recent and k not in merging]
            found = set(keys).difference(unknown)
        if self.filter is not None:
            unknown = self.filter.check_and_add(unknown)
        if not unknown:
            return found
        # Each generation's table, asked in one statement for up to KEYS_PER_ROW keys given
        # end to end in one blob: one statement text a table, whatever the count.
        tables = [name for _, name in generations(conn)]
        _slots(conn)
        for start in range(0, len(unknown), KEYS_PER_ROW):
            blob = b"".join(unknown[start : start + KEYS_PER_ROW])
            for table in tables:
                found.update(row[0] for row in conn.execute(KEYS_LOOKUP.format(table=table), (blob,)))
        return found

    def stored_as_strings(self, conn: sqlite3.Connection, source: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` the string-keyed table of schema version 1 holds."""
        found: set[str] = set()
        for start in range(0, len(message_ids), CHUNK):
            ids = message_ids[start : start + CHUNK]
            rows = conn.execute(
                f"SELECT message_id FROM dedupe WHERE source = ? AND message_id IN ({','.join('?' * len(ids))})",
                (source, *ids),
            )
            found.update(row[0] for row in rows)
        return found

    def add(self, conn: sqlite3.Connection, keys: list[bytes]) -> None:
        """Record new ``keys``: the caller has checked with ``stored``, in this operation,
        that none was stored (which put them in the filter in use), and that none repeats."""
        known_to = self._known_to
        for start in range(0, len(keys), KEYS_PER_ROW):
            row = conn.execute(
                "INSERT INTO dedupe_recent (k) VALUES (?)", (b"".join(keys[start : start + KEYS_PER_ROW]),)
            )
            self._known_to = row.lastrowid or self._known_to
        if self._known_to != known_to:
            self._writer.on_rollback(lambda: setattr(self, "_known_to", known_to))
        self._recent.update(keys)
        self.added += len(keys)
        # Into the filters now rather than at the merge that moves them to a generation: a
        # key is in the filter before it is on disk (the one in use since ``stored``).
        if self.filter is not None:
            self.filter.count_added(len(keys))
        if self._building is not None:
            self._building.filter.add(keys)
        # Out of both sets: a merge planned in the same transaction took them into its own.
        self._writer.on_rollback(lambda: self._forget(keys))
        if len(self._recent) + len(self._merging) >= FALLBACK_FACTOR * self._merge_at:
            self.merge(conn)  # the sliced merge fell behind: bound the memory now
        # Once per commit group, not per call; a rollback only leaves it stale, and a
        # stale True costs just the two properties' look.
        self.may_want_work = self.wants_merge or self.wants_filter

    def _forget(self, keys: Iterable[bytes]) -> None:
        self._recent.difference_update(keys)
        self._merging.difference_update(keys)

    def step_size(self) -> int:
        """How many ids or keys the merge's next step takes (see MERGE_PACE)."""
        arrived, self._paced_at = self.added - self._paced_at, self.added
        return max(self.min_step, MERGE_PACE * arrived)

    def load(self, conn: sqlite3.Connection) -> None:
        """Read the keys an earlier process left unmerged; reading only, so a CLI opening
        the file while the server runs does not disturb the server's keys."""
        recent: set[bytes] = set()
        known_to = 0
        for row_id, row in conn.execute("SELECT id, k FROM dedupe_recent"):
            recent.update(split_row(row))
            known_to = max(known_to, row_id)
        self._recent, self._known_to = recent, known_to
        self.legacy = _legacy_has_keys(conn)

    def prune(self, conn: sqlite3.Connection, before: float) -> tuple[int, bool]:
        """Forget the oldest generation whose newest merge was before ``before`` (see the
        module docstring: a key's time is its merge's), dropping its table; the caller
        merges dedupe_recent first. Returns (keys removed, whether none is left to remove).

        A table at a time, each its own writer operation. Keys expire in merge order but
        were kept in key order, one table for all: the keys of one merge sat a few to a
        leaf across the whole B-tree, and deleting them rewrote most of its leaves
        (docs/benchmarks.md, session 31). A generation goes with its table, whole."""
        row = conn.execute(
            "SELECT id, name, keys FROM dedupe_generations WHERE newest < ? ORDER BY id LIMIT 1", (before,)
        ).fetchone()
        if row is not None:
            generation, table, keys = row
            conn.execute(f"DROP TABLE IF EXISTS {table}")  # a version-4 table's index goes with it
            conn.execute("DELETE FROM dedupe_generations WHERE id = ?", (generation,))
            self.pruned_since_filter += int(keys)  # a rollback overcounts: a rebuild comes early
            return int(keys), False
        removed = 0
        if _legacy_exists(conn):
            # The table of files from before schema version 2, whole: its newest key is
            # older than any generation's, so by now it has few, if any, left.
            removed += int(conn.execute("DELETE FROM dedupe WHERE seen_at < ?", (before,)).rowcount)
            # Once its last key has aged out, no lookup needs it. The (empty) table stays:
            # another process may still be looking in it. Lookups stop reading it only once
            # that is committed: a rollback brings the rows back.
            if not _legacy_has_keys(conn):
                self._writer.on_commit(self._legacy_gone)
        return removed, True

    # A merge, step by step, each step its own short writer operation:
    #   plan        -> (first, last): the ids of the rows to merge; memory's keys are
    #               exactly theirs, the snapshot; the merge's time, every key's seen_at
    #   file_next   files the snapshot's next keys by their first byte; -> True when all are
    #   merge_next  inserts the next buckets' keys, sorted, into a generation, so the merge
    #               goes through the B-tree in key order; -> True when all are in
    #   finish_merge deletes the snapshot's rows and takes its keys out of memory
    # The snapshot is ordered a bucket at a time rather than sorted in one go: one sort of
    # 100k keys held the writer (and every acknowledgement waiting on it) for 30-180 ms in
    # SQL. Its keys come from memory, not from the rows: copying the rows' keys into a
    # key-ordered temporary table first cost about 1 us a key, half of what a merge cost
    # (docs/benchmarks.md, session 18). Were another process (a CLI prune) to merge some of
    # those rows meanwhile, their keys are inserted again, which INSERT OR IGNORE allows.

    def plan(self, conn: sqlite3.Connection) -> tuple[int, int]:
        first = conn.execute("SELECT COALESCE(MIN(id), 1) FROM dedupe_recent").fetchone()[0]
        last = self._known_to
        self._merge_time = time.time()
        self._target = (0, "")  # chosen by the first step with keys to insert
        # Memory holds the keys of every dedupe_recent row up to ``last`` (and maybe keys
        # another process has merged since): these leave memory, and their rows the table,
        # when finish_merge commits. Rows past ``last`` (the server's, when a CLI merges)
        # wait for a merge that reads them.
        self._merging, self._recent = self._recent, set()
        self._planned_at = self._whole_merges
        # A list of the keys (800 KB at 100k), not the set itself: a whole merge's commit
        # takes keys out of the set meanwhile, and iterating a set that changes fails.
        self._unfiled = iter(list(self._merging))
        self._buckets = [[] for _ in range(256)]
        self._bucket_at = 0
        return int(first), int(last)

    def file_next(self, conn: sqlite3.Connection, limit: int) -> bool:
        """File the snapshot's next ``limit`` keys by their first byte (keys are uniform
        digests: about 1/256 of them each); True once a step finds fewer than ``limit``
        left, so every key is filed."""
        buckets = self._buckets
        filed = 0
        for key in islice(self._unfiled, limit):
            buckets[key[0]].append(key)
            filed += 1
        return filed < limit

    def merge_next(self, conn: sqlite3.Connection, limit: int) -> bool:
        """Insert the next buckets, at least ``limit`` keys unless fewer are left, in key
        order into the merge's generation; True once every bucket is in."""
        if self._whole_merges != self._planned_at:
            return True  # a whole merge has moved every key of this snapshot already
        keys: list[bytes] = []
        while self._bucket_at < len(self._buckets) and len(keys) < limit:
            bucket = self._buckets[self._bucket_at]
            self._buckets[self._bucket_at] = []
            self._bucket_at += 1
            bucket.sort()
            keys += bucket
        # One statement text whatever the step's size: a statement per length filled the
        # connection's statement cache with large ones, and RSS grew with every merge.
        if not keys:
            return self._bucket_at >= len(self._buckets)
        _slots(conn)
        if not _generation_exists(conn, self._target[0]):
            # Not chosen yet, or dropped by another process's prune with a cutoff ahead of
            # this merge's time (the server's own prune waits for its merge).
            self._target = target_generation(conn, self._merge_time)
        generation, table = self._target
        insert = MERGED_KEYS_INSERT.format(table=table)
        inserted = 0
        for start in range(0, len(keys), KEYS_PER_ROW):
            inserted += conn.execute(insert, (b"".join(keys[start : start + KEYS_PER_ROW]),)).rowcount
        _count_keys(conn, generation, inserted)
        return self._bucket_at >= len(self._buckets)

    def _undo_whole_merge(self) -> None:
        self._whole_merges -= 1

    def finish_merge(self, conn: sqlite3.Connection, last: int) -> None:
        # Merged keys stayed in dedupe_recent until now; were we to crash before this,
        # the next merge moves them again, harmlessly (INSERT OR IGNORE).
        merged = self._merging
        self._unfiled, self._buckets = iter(()), []
        if self._whole_merges == self._planned_at:
            conn.execute("DELETE FROM dedupe_recent WHERE id <= ?", (last,))
        # Else a whole merge already moved every row of this snapshot, and its commit takes
        # their keys out of memory. (Rows added since have ids above ``last``: ids are
        # never reused.) Should this transaction fail, the merge task gives the keys back.
        self._writer.on_commit(lambda: self._merged(merged))

    def _merged(self, merged: set[bytes]) -> None:
        if self._merging is merged:
            self._merging = set()

    def abandon_merge(self) -> None:
        """A step of the merge under way failed: its keys are still in dedupe_recent, and
        stay in memory for the next merge, which moves them again."""
        self._recent.update(self._merging)  # first, so that a lookup meanwhile finds them
        self._merging = set()
        self._unfiled, self._buckets = iter(()), []

    def _legacy_gone(self) -> None:
        self.legacy = False

    # Building the filter, step by step, each step its own short writer operation:
    #   begin_filter  -> a FilterBuild: a new, empty filter, and the keys in memory to copy in
    #   fill_filter   copies the build's next FILTER_STEP keys, from memory and then from
    #                 each generation in key order; -> True once it has read them all
    # Every key of the generations is in the new filter when it goes into use: it was there
    # when the walk passed its place; or it was in memory when the build began; or it
    # arrived later and ``add`` put it in. Keys merged meanwhile came from memory. The new
    # filter goes into use when the last step's transaction commits: were it rolled back
    # (an I/O error), a prune grouped with it would be undone, and its keys, which the
    # walk no longer saw, would be back on disk.

    def begin_filter(self, conn: sqlite3.Connection) -> FilterBuild:
        # The generations there are now: one made later holds only keys merged later, from
        # memory, which were in ``unfiltered`` or went into the new filter as they arrived.
        self._building = FilterBuild(KeyFilter(self._filter_bits), [*self._recent, *self._merging], generations(conn))
        return self._building

    def fill_filter(self, conn: sqlite3.Connection, build: FilterBuild) -> bool:
        if self._building is not build:
            return True  # dropped (a failed step): nothing more to do for it
        if build.unfiltered:
            build.filter.add(build.unfiltered[-FILTER_STEP:])
            del build.unfiltered[-FILTER_STEP:]
            return False
        budget = FILTER_STEP  # keys read by this step, from as many tables as it takes
        while build.tables:
            generation, table = build.tables[0]
            keys: list[bytes] = []
            if _generation_exists(conn, generation):  # else pruned since: nothing to read
                keys = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT k FROM {table} WHERE k > ? ORDER BY k LIMIT ?", (build.walked_to, budget)
                    )
                ]
            build.filter.add(keys)
            if len(keys) == budget:
                build.walked_to = keys[-1]
                return False
            budget -= len(keys)
            del build.tables[0]
            build.walked_to = b""
        self._writer.on_commit(functools.partial(self._use, build))
        self._writer.on_rollback(functools.partial(self.drop_build, build))
        return True

    def _use(self, build: FilterBuild) -> None:
        if self._building is build:
            self.filter, self._building = build.filter, None
            self.pruned_since_filter = 0

    def drop_build(self, build: FilterBuild) -> None:
        """Give up ``build`` (a step failed): the filter in use, if any, stays in use, and
        the next enqueue begins another."""
        if self._building is build:
            self._building = None

    def merge(self, conn: sqlite3.Connection) -> None:
        """Move all of ``dedupe_recent`` into the current generation's B-tree at once."""
        self._whole_merges += 1
        self._writer.on_rollback(self._undo_whole_merge)
        if conn.execute("SELECT 1 FROM dedupe_recent LIMIT 1").fetchone() is not None:  # no empty generation
            _slots(conn)
            generation, table = target_generation(conn, time.time())
            inserted = conn.execute(f"INSERT OR IGNORE INTO {table} (k) SELECT k FROM ({ROW_KEYS}) ORDER BY k").rowcount
            _count_keys(conn, generation, inserted)
        # Memory holds the keys of exactly these rows (this writer is the only one adding
        # any), so they leave memory without hashing every row a second time.
        merged = self._recent | self._merging
        conn.execute("DELETE FROM dedupe_recent")
        self._writer.on_commit(lambda: self._forget(merged))


@dataclass(eq=False)
class FilterBuild:
    """A filter under construction: ``unfiltered`` are the keys that were in memory when it
    began, still to copy in; then each of ``tables`` (the generations then, oldest first)
    is walked in key order, the first from ``walked_to`` on."""

    filter: KeyFilter
    unfiltered: list[bytes] = field(default_factory=list)
    tables: list[tuple[int, str]] = field(default_factory=list)
    walked_to: bytes = b""  # below every 16-byte key


# Up to KEYS_PER_ROW keys end to end in one blob (?1), looked up in a generation's table.
KEYS_LOOKUP = (
    "SELECT k FROM {table} WHERE k IN (SELECT substr(?1, 1 + 16 * n, 16) FROM temp.key_slots WHERE n < length(?1) / 16)"
)


def generations(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """The generations' (id, table), oldest first."""
    return [(int(i), str(name)) for i, name in conn.execute("SELECT id, name FROM dedupe_generations ORDER BY id")]


def target_generation(conn: sqlite3.Connection, now: float) -> tuple[int, str]:
    """The generation a merge at ``now`` goes into: the newest, unless it opened
    GENERATION_SECONDS or more before (or is an upgraded file's version-4 table); else a
    new one, with its table. Its newest merge time becomes ``now`` before any key goes in,
    so a prune never drops a generation a merge is still filling."""
    row = conn.execute("SELECT id, name, opened_at FROM dedupe_generations ORDER BY id DESC LIMIT 1").fetchone()
    if row is not None and row[1] != V4_KEYS and now - row[2] < GENERATION_SECONDS:
        conn.execute("UPDATE dedupe_generations SET newest = MAX(newest, ?) WHERE id = ?", (now, row[0]))
        return int(row[0]), str(row[1])
    generation = conn.execute(
        "INSERT INTO dedupe_generations (name, opened_at, newest, keys) VALUES ('', ?, ?, 0)", (now, now)
    ).lastrowid
    assert generation is not None
    table = f"{GENERATION_PREFIX}{generation}"
    conn.execute(f"CREATE TABLE {table} (k BLOB PRIMARY KEY) WITHOUT ROWID")
    conn.execute("UPDATE dedupe_generations SET name = ? WHERE id = ?", (table, generation))
    return generation, table


def _generation_exists(conn: sqlite3.Connection, generation: int) -> bool:
    return conn.execute("SELECT 1 FROM dedupe_generations WHERE id = ?", (generation,)).fetchone() is not None


def _count_keys(conn: sqlite3.Connection, generation: int, inserted: int) -> None:
    """A generation counts its keys, so that dropping it tells the filter how many went."""
    if inserted > 0:
        conn.execute("UPDATE dedupe_generations SET keys = keys + ? WHERE id = ?", (inserted, generation))


def split_row(row: bytes) -> list[bytes]:
    """The keys of one ``dedupe_recent`` row: 16-byte digests, end to end."""
    if len(row) % KEY_BYTES:
        raise StoreError(f"a dedupe_recent row of {len(row)} bytes is not a whole number of {KEY_BYTES}-byte keys")
    return [row[i : i + KEY_BYTES] for i in range(0, len(row), KEY_BYTES)]


def _slots(conn: sqlite3.Connection) -> None:
    """``temp.key_slots``: the offsets 0..KEYS_PER_ROW-1 that ROW_KEYS splits rows by
    (temporary, so per connection: a CLI's and the server's each have their own)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS key_slots (n INTEGER PRIMARY KEY)")
    if conn.execute("SELECT COUNT(*) FROM temp.key_slots").fetchone()[0] != KEYS_PER_ROW:
        conn.execute("DELETE FROM temp.key_slots")
        conn.executemany("INSERT INTO temp.key_slots (n) VALUES (?)", ((n,) for n in range(KEYS_PER_ROW)))


def _legacy_exists(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedupe'").fetchone() is not None


def _legacy_has_keys(conn: sqlite3.Connection) -> bool:
    return _legacy_exists(conn) and conn.execute("SELECT 1 FROM dedupe LIMIT 1").fetchone() is not None
