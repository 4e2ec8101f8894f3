"""The embedded default store: one SQLite file in WAL mode, synchronous=FULL, group commit.

Every operation, reads included, runs on one writer thread (see ``sqlite_writer``), so
SQLite never blocks the event loop and concurrent enqueues share one fsync (and, when
consecutive, one set of statements). Another process (the CLI) may open the same file at
the same time; SQLite's busy timeout makes the two take turns. Only one process may
*ingest* into a file at a time: new dedupe keys are indexed in memory until merged
(see ``sqlite_dedupe``).

Options: ``max_bytes`` / ``min_free_disk_bytes`` make enqueue raise StoreFull (checked
at most every ``size_check_interval`` seconds); ``commit_interval`` > 0 waits that long
after the first pending operation to gather more (default 0: commit as soon as the queue
is drained); ``dedupe_merge_at`` is how many new dedupe keys wait before a merge;
``dedupe_filter_bits_log2`` sizes the dedupe lookup's Bloom filter (2^27 bits, 16 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from bridge.store import sqlite_ops as ops
from bridge.store.base import (
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
    IncomingEvent,
    Job,
    MergedLinks,
    QueueStats,
    RecordFilter,
    Store,
    StoreError,
    StoreFull,
)
from bridge.store.key_filter import DEFAULT_BITS_LOG2, check_bits
from bridge.store.server_lock import ServerLock
from bridge.store.sqlite_dedupe import MERGE_AT, DedupeKeys, register_functions
from bridge.store.sqlite_leases import Leases, new_tuple
from bridge.store.sqlite_schema import configure, create_schema, stored_version
from bridge.store.sqlite_writer import BatchOperation, GroupCommitWriter

MiB = 1024 * 1024
log = structlog.get_logger("bridge.store")

# Delivered-job records deleted per step when a full store makes room (see ``_reclaim``).
RECLAIM_STEP = 5000
# Rows a step of the periodic prune deletes (or jobs it walks): one writer operation each.
PRUNE_STEP = 5000
# The least time between two such reclaims while the store stays full: each walks the
# whole jobs table, and only jobs acked since the last one can free anything more.
RECLAIM_INTERVAL = 60.0


class SqliteStore(Store):
    def __init__(
        self,
        path: str,
        *,
        max_bytes: int | None = None,
        min_free_disk_bytes: int = 256 * MiB,
        commit_interval: float = 0.0,
        size_check_interval: float = 1.0,
        dedupe_merge_at: int = MERGE_AT,
        dedupe_filter_bits_log2: int = DEFAULT_BITS_LOG2,
        upgrade: bool = True,
        create: bool = True,
    ) -> None:
        """``upgrade=False`` (the CLI) refuses a file of an older schema version instead of
        upgrading it under a server of that version that may still be running on it. With
        ``upgrade`` (the server) the store also holds the file's server lock while open:
        a second server on the same file fails to open it (see server_lock).

        ``create=False`` (the CLI) opens only an existing store: a missing file (or
        directory), or a file without the bridge's tables, is a StoreError naming the
        absolute path, and nothing is created. Either way a relative ``path`` is taken
        from the working directory when the store is built."""
        if not path or path == ":memory:":
            raise ValueError("SqliteStore needs a file path (an in-memory database is not durable)")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if commit_interval < 0:
            raise ValueError(f"commit_interval must be >= 0, got {commit_interval}")
        check_bits(dedupe_filter_bits_log2)
        self.path = os.path.abspath(path)
        # Said when the file is missing: a relative path is the usual reason.
        self._relative_to = None if os.path.isabs(path) else os.getcwd()
        self._given_path = path
        self._create = create
        self.max_bytes = max_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self._commit_interval = commit_interval
        self._size_check_interval = size_check_interval
        self._dedupe_merge_at = dedupe_merge_at
        self._dedupe_filter_bits_log2 = dedupe_filter_bits_log2
        self._upgrade = upgrade
        # The real path: SQLite follows a symlink to the file, so the lock must too.
        self._server_lock = ServerLock(os.path.realpath(self.path)) if upgrade else None
        self._writer: GroupCommitWriter | None = None
        # Reads that scan many rows (queue stats for /metrics) use their own connection:
        # in WAL mode they run beside the writer instead of stalling ingest commits.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._dedupe: DedupeKeys | None = None
        self._leases: Leases | None = None  # this server's leases (sqlite_leases)
        self._merge_task: asyncio.Task[None] | None = None
        # Built once the store ingests, not at open: the CLI opens the file without
        # ingesting, and has no use for 16 MiB of filter nor for walking every key.
        self._filter_task: asyncio.Task[None] | None = None
        self._enqueue_many: BatchOperation | None = None
        # Free pages inside the file are reused before it grows, so they do not count as used.
        self._free_bytes = 0
        self._free_checked_at = 0.0
        self._capacity_checked_at = float("-inf")
        self._full_reason: str | None = None
        # The file the writer opened, as (device, inode): SQLite keeps writing to it through
        # its descriptor when the path is deleted or replaced (see ``_moved``).
        self._opened_file: tuple[int, int] | None = None
        self._moved_reason: str | None = None
        # Making room in a full store (``_reclaim``): the task, when the last one began, and
        # the jobs acked since, whose records it would delete.
        self._reclaim_task: asyncio.Task[None] | None = None
        self._reclaimed_at = float("-inf")
        # 1, not 0: records delivered before this process started (before a restart, or an
        # upgrade to a version that reclaims) are worth one reclaim too.
        self._acked_since_reclaim = 1

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def commits(self) -> int:
        """Write transactions committed since open (group commit makes this << calls)."""
        return 0 if self._writer is None else self._writer.commits

    def _connect(self) -> sqlite3.Connection:
        if self._create:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        else:
            # mode=rw: SQLite never creates the file, even if it went away since open() looked.
            conn = sqlite3.connect(
                f"{Path(self.path).as_uri()}?mode=rw",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
            )
        try:
            if not self._create and stored_version(conn) is None:
                # Before configure(), which would switch another program's database to WAL.
                raise StoreError(f"{self.path} holds no bridge store (no schema_version table); check store.url")
            configure(conn)
            register_functions(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _after_commit(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if now - self._free_checked_at < min(self._size_check_interval, 0.5):
            return
        self._measure_free(conn)

    async def open(self) -> None:
        if self._writer is not None:
            return
        if not self._create:
            if not os.path.exists(self.path):
                raise StoreError(self._missing())
        else:
            directory = os.path.dirname(self.path)
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory for {self.path}: {exc}") from exc
        if self._server_lock is not None:
            self._server_lock.acquire()  # before anything touches the file
        try:
            await self._open_writer()
        except BaseException as exc:
            if self._server_lock is not None:
                self._server_lock.release()
            if isinstance(exc, StoreError) and self.path not in str(exc):
                # SQLite's reasons ("file is not a database", "attempt to write a readonly
                # database", a newer schema) do not say which file: name the one store.url
                # led to, as `bridge serve` prints only this line before it exits.
                raise StoreError(f"{self.path}: {exc}") from exc
            raise

    def _missing(self) -> str:
        if self._relative_to is None:
            return f"no store at {self.path}: `bridge serve` creates it when it starts; check store.url"
        return (
            f"no store at {self.path} (store.url sqlite:///{self._given_path}, relative to the working "
            f"directory {self._relative_to}): run from the directory `bridge serve` runs in, or use an "
            "absolute path (sqlite:////abs/path.db)"
        )

    async def _open_writer(self) -> None:
        writer = GroupCommitWriter(
            self._connect, commit_interval=self._commit_interval, after_commit=self._after_commit
        )
        dedupe = DedupeKeys(writer, self._dedupe_merge_at, filter_bits_log2=self._dedupe_filter_bits_log2)

        def prepare(conn: sqlite3.Connection) -> None:
            create_schema(conn, upgrade=self._upgrade)
            dedupe.load(conn)
            # The connection has the file open by now. (No OSError to expect: it just opened it.)
            self._opened_file = self._identity()

        writer.start()
        try:
            await writer.submit(prepare)
        except BaseException:
            await writer.stop()
            raise
        self._writer, self._dedupe = writer, dedupe
        self._leases = Leases(writer.on_rollback)
        self._enqueue_many = partial(ops.enqueue_many, dedupe=dedupe)

    async def close(self) -> None:
        if self._reclaim_task is not None:  # what it deleted so far is committed; the rest can wait
            self._reclaim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reclaim_task
            self._reclaim_task = None
        if self._filter_task is not None:  # a filter lives in this process only: no use finishing it
            self._filter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filter_task
            self._filter_task = None  # a task cancelled before it started never ran its finally
        if self._merge_task is not None:
            await self._merge_task  # a few small slices; what is left is merged at next open
        writer, self._writer, self._dedupe, self._leases = self._writer, None, None, None
        if writer is not None:
            await writer.stop()
        with self._reader_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        if self._server_lock is not None:
            self._server_lock.release()

    async def _read(self, op: Any) -> Any:
        """Run a read-only ``op(conn)`` on the reader connection, in a worker thread, in
        one read transaction: its statements see one snapshot. Each in its own, queue_stats
        listed a destination and then, the writer having settled its last job meanwhile,
        found no oldest job for it and failed."""
        if self._writer is None:
            raise StoreError(f"the SQLite store {self.path} is not open")

        def run() -> Any:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = sqlite3.connect(
                        f"{Path(self.path).resolve().as_uri()}?mode=ro",
                        uri=True,
                        isolation_level=None,
                        check_same_thread=False,
                        timeout=10.0,
                    )
                reader = self._reader
                reader.execute("BEGIN")
                try:
                    return op(reader)
                finally:
                    if reader.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # never hide the op's own error
                            reader.execute("ROLLBACK")  # read only: this just ends the snapshot

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    async def _run(
        self, op: Any, *, writes: bool = True, outside_transaction: bool = False, durable: bool = True
    ) -> Any:
        if self._writer is None:
            raise StoreError(f"the SQLite store {self.path} is not open")
        return await self._writer.submit(op, writes=writes, outside_transaction=outside_transaction, durable=durable)

    async def _bookkeep(self, op: Any) -> Any:
        """Delivery bookkeeping (leases and settles): committed without its own fsync.
        A power cut may undo it, and then a job is leased and sent again, which is what
        at-least-once delivery allows; an acknowledged event is never lost by it."""
        return await self._run(op, durable=False)

    def _held(self) -> Leases:
        if self._leases is None:
            raise StoreError(f"the SQLite store {self.path} is not open")
        if self._server_lock is None:
            # Leases are held in the server's memory: one held here, in another process
            # (the CLI), would be invisible to the server, and its jobs sent twice.
            raise StoreError("only the server leases and settles jobs of a SQLite store (open it with upgrade)")
        return self._leases

    def _open_dedupe(self) -> DedupeKeys:
        if self._dedupe is None:
            raise StoreError(f"the SQLite store {self.path} is not open")
        return self._dedupe

    # -- backpressure ------------------------------------------------------------------
    def _file_size(self, path: str) -> int:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def _check_capacity(self) -> None:
        now = time.monotonic()
        if now - self._capacity_checked_at >= self._size_check_interval:
            self._capacity_checked_at = now
            self._moved_reason = self._moved()
            self._full_reason = self._moved_reason or self._measure()
            if self._full_reason is not None and self._moved_reason is None:
                self._reclaim_soon(now)
        if self._moved_reason is not None:
            raise StoreError(self._moved_reason)
        if self._full_reason is not None:
            raise StoreFull(self._full_reason)

    def _identity(self) -> tuple[int, int] | None:
        """The file the path names now, as (device, inode); None if there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _moved(self) -> str | None:
        """Why events must not be taken: the store's file was deleted or replaced under the
        running server. SQLite goes on committing to the file it opened, which no path
        names any more: every event acknowledged into it would be lost at the next restart,
        which opens (or creates) whatever the path names then. Delivery goes on from the
        open file meanwhile, so what was acknowledged before is still sent."""
        if self._opened_file is None or self._server_lock is None:
            return None  # not open yet, or the CLI, whose open is short
        try:
            now = self._identity()
        except OSError:
            return None  # cannot tell (a directory we may not search): the commits will say
        if now == self._opened_file:
            return None
        what = "deleted" if now is None else "replaced by another file"
        return (
            f"the store file {self.path} was {what} while the server runs: events are refused, as they would"
            " be lost at the next restart; put the file back, or let the queue drain and restart"
        )

    def _reclaim_soon(self, now: float) -> None:
        """The store is full: make room from the records of delivered jobs, if any were
        acked since the last time, in the background (the caller gets its StoreFull now)."""
        if self._reclaim_task is not None or not self._acked_since_reclaim or self._writer is None:
            return
        if now - self._reclaimed_at < RECLAIM_INTERVAL:
            return
        self._reclaimed_at, self._acked_since_reclaim = now, 0
        self._reclaim_task = asyncio.create_task(self._reclaim(), name="bridge-store-reclaim")

    async def _reclaim(self) -> None:
        """Delete every delivered-job record, before ``store.retention_hours`` is up.

        An ack empties the job's payload, but its row keeps the page it was written to:
        SQLite merges pages only when rows are deleted. A queue that filled the store
        while a destination was down therefore kept it full once delivered, and ingest
        answered 503 until those records aged out of retention, three days later. They
        are only an audit trail (``delivered_version``); accepting events comes first.
        Dead letters and discards hold events still to be replayed: they are kept."""
        removed, after = 0, 0
        try:
            while after is not None:
                step = partial(ops.prune_delivered_step, after=after, limit=RECLAIM_STEP)
                deleted, after = await self._bookkeep(step)
                removed += deleted
            if not removed:
                # Nothing delivered (a store full of its queue; this process's first reclaim
                # looks in case an earlier one delivered it): nothing freed to checkpoint, and
                # the next reclaim, which only an ack asks for, need not wait RECLAIM_INTERVAL.
                self._reclaimed_at = float("-inf")
                return
            # The pages freed are reused before the file grows; a burst's WAL shrinks too.
            await self._run(self._checkpoint_and_measure, outside_transaction=True)
        except StoreError as exc:
            # Tried again after RECLAIM_INTERVAL, whether or not anything is acked meanwhile:
            # once the queue is delivered, no ack may ever come to ask for it.
            self._acked_since_reclaim = max(self._acked_since_reclaim, 1)
            log.warning("store_reclaim_failed", path=self.path, error=str(exc))
        else:
            log.warning(
                "store_full_delivered_records_pruned",
                path=self.path,
                rows=removed,
                reason=self._full_reason,
                hint="the store was full (store.max_bytes or store.min_free_disk_bytes): delivered-job"
                " records were pruned before store.retention_hours to make room",
            )
        finally:
            self._reclaim_task = None
            self._capacity_checked_at = float("-inf")  # measured again by the next call

    def _measure(self) -> str | None:
        if self.max_bytes is not None:
            used = self._file_size(self.path) + self._file_size(self.path + "-wal") - self._free_bytes
            if used > self.max_bytes:
                return f"the store holds {used} bytes, over its limit of {self.max_bytes} bytes"
        try:
            disk = os.statvfs(os.path.dirname(self.path))
        except OSError as exc:
            return f"cannot check free disk space for {self.path}: {exc}"
        # Pages free inside the file (a reclaim's, a prune's) take new rows before the disk does.
        free = disk.f_bavail * disk.f_frsize + self._free_bytes
        if free < self.min_free_disk_bytes:
            return f"only {free} bytes free on the store's disk, below the minimum of {self.min_free_disk_bytes}"
        return None

    # -- ingest ------------------------------------------------------------------------
    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        if not events:
            return EnqueueResult(0, 0)
        # _open_dedupe() and _check_capacity() written out for their usual outcome: two
        # calls less for every single Tracking API call.
        dedupe = self._dedupe
        if dedupe is None:
            raise StoreError(f"the SQLite store {self.path} is not open")
        if self._full_reason is not None or time.monotonic() - self._capacity_checked_at >= self._size_check_interval:
            self._check_capacity()  # due for a measure, or refusing: it decides and raises
        writer, enqueue_many = self._writer, self._enqueue_many
        if writer is None or enqueue_many is None:
            raise StoreError(f"the SQLite store {self.path} is not open")
        # One callable for every call, so the writer can run concurrent enqueues as one.
        # ops.EnqueueCall(source, events, now), built without its generated __new__'s frame.
        call = new_tuple(ops.EnqueueCall, (source, events, time.time()))
        result: EnqueueResult = await writer.submit_batchable(enqueue_many, call)
        if dedupe.may_want_work:  # rarely set: the two properties are not asked per call
            if dedupe.wants_merge and self._merge_task is None:
                self._merge_task = asyncio.create_task(self._merge_dedupe(dedupe), name="bridge-dedupe-merge")
            if dedupe.wants_filter and self._filter_task is None:
                self._filter_task = asyncio.create_task(self._build_filter(dedupe), name="bridge-dedupe-filter")
        return result

    async def _build_filter(self, dedupe: DedupeKeys) -> None:
        build = None
        try:
            build = await self._run(dedupe.begin_filter, writes=False)
            while not await self._run(partial(dedupe.fill_filter, build=build), writes=False):
                pass
        except Exception:  # not CancelledError: at close, the writer may still run a step
            # Only speed is lost: lookups keep to the filter in use, or SQLite. The step
            # that failed has finished, so the build is no longer the writer's to touch.
            log.warning("dedupe_filter_build_failed", path=self.path, exc_info=True)
            if build is not None:
                dedupe.drop_build(build)
        finally:
            self._filter_task = None

    async def _merge_dedupe(self, dedupe: DedupeKeys) -> None:
        dedupe.merging = True
        try:
            # Bookkeeping commits, without their own fsync: every key stays in dedupe_recent
            # until finish_merge commits, and a power cut loses a suffix of commits, never a
            # step before the finish that follows it.
            dedupe.step_size()  # the pace counts from here
            _, last = await self._run(dedupe.plan, durable=False)
            while not await self._run(partial(dedupe.file_next, limit=dedupe.step_size()), writes=False):
                pass
            while not await self._run(partial(dedupe.merge_next, limit=dedupe.step_size()), durable=False):
                pass
            await self._run(partial(dedupe.finish_merge, last=last), durable=False)
        except StoreError:
            # The keys stay in dedupe_recent and go back to memory's keys still to merge;
            # the next enqueue tries again.
            dedupe.abandon_merge()
        finally:
            dedupe.merging = False
            self._merge_task = None

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
        # Reads only: the lease is held in memory (sqlite_leases).
        jobs: list[Job] = await self._run(
            partial(
                ops.lease,
                destination=destination,
                limit=limit,
                lease_seconds=lease_seconds,
                ordered=ordered,
                # None: the lease's clock starts on the writer thread, when it is taken, not
                # before a wait behind other writes (a prune, a dedupe merge) that would
                # leave the worker less than the lease it counts on.
                now=None,
                leases=self._held(),
                ahead=frozenset(ahead),  # read on the writer thread: a copy the caller cannot change
            ),
            writes=False,
        )
        return jobs

    async def ack(
        self,
        job_ids: Sequence[int],
        mapping_version: str = "",
        *,
        fence: Fence | None = None,
        erase_links: ErasedLinks | None = None,
        merge_links: MergedLinks | None = None,
    ) -> None:
        if job_ids:
            self._acked_since_reclaim += len(job_ids)
            op = partial(
                ops.ack,
                job_ids=job_ids,
                mapping_version=mapping_version,
                now=time.time(),
                leases=self._held(),
                fence=fence,
                erase_links=erase_links,
                merge_links=merge_links,
            )
            # A deletion's erasure, or a merge's links, made durable (fsync) as ingest is:
            # undone by a power cut, a deleted user's links would stay, and a merged user's
            # later events would make them again, the deletion or merge never sent again.
            await (self._run(op) if erase_links or merge_links else self._bookkeep(op))

    async def retry(
        self,
        job_ids: Sequence[int],
        available_at: float,
        error: str,
        *,
        fence: Fence | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        if job_ids:
            await self._bookkeep(
                partial(
                    ops.retry,
                    job_ids=job_ids,
                    available_at=available_at,
                    error=error,
                    leases=self._held(),
                    fence=fence,
                    delivered=delivered,
                )
            )

    async def release(
        self, job_ids: Sequence[int], *, fence: Fence | None = None, delivered: Delivered | None = None
    ) -> None:
        if job_ids:
            await self._bookkeep(
                partial(ops.release, job_ids=job_ids, leases=self._held(), fence=fence, delivered=delivered)
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
        if job_ids:
            await self._bookkeep(
                partial(
                    ops.defer,
                    job_ids=job_ids,
                    available_at=available_at,
                    reason=reason,
                    leases=self._held(),
                    fence=fence,
                    delivered=delivered,
                )
            )

    async def dead_letter(self, entries: Sequence[DeadLetter], *, fence: Fence | None = None) -> None:
        if entries:
            await self._bookkeep(
                partial(ops.dead_letter, entries=entries, now=time.time(), leases=self._held(), fence=fence)
            )

    async def discard(self, entries: Sequence[Discard], *, fence: Fence | None = None) -> None:
        if entries:
            await self._bookkeep(
                partial(ops.discard, entries=entries, now=time.time(), leases=self._held(), fence=fence)
            )

    async def resolve_links(self, namespace: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        links: dict[str, str] = await self._run(partial(ops.resolve_links, namespace=namespace, ids=ids), writes=False)
        return links

    # -- operators ---------------------------------------------------------------------
    async def list_dead(self, flt: RecordFilter, limit: int = 100) -> list[DeadLetterRecord]:
        records: list[DeadLetterRecord] = await self._run(partial(ops.list_dead, flt=flt, limit=limit), writes=False)
        return records

    async def replay_dead(self, flt: RecordFilter) -> int:
        return await self._in_slices("dead_letters", lambda: partial(ops.replay_dead_slice, flt=flt, now=time.time()))

    async def replay_discards(self, flt: RecordFilter) -> int:
        return await self._in_slices("discards", lambda: partial(ops.replay_discards_slice, flt=flt, now=time.time()))

    async def purge_dead(self, flt: RecordFilter) -> int:
        return await self._in_slices("dead_letters", lambda: partial(ops.purge_dead_slice, flt=flt))

    async def _in_slices(self, table: str, step: Callable[[], Callable[..., ops.Slice]]) -> int:
        """Run ``step()`` (an op taking ``after``, ``upto`` and ``limit``) over the records
        of ``table`` there are now, RECORD_SLICE at a time in id order, each slice in its
        own transaction (see RECORD_SLICE): ingest commits between them. ``step()`` is
        made anew per slice, so a slice's jobs are dated when it is submitted, as ingest
        dates its events: created_at keeps following id order, as ops.queue_stats assumes."""
        upto: int = await self._run(partial(ops.last_record_id, table=table), writes=False)
        total, after = 0, 0
        while after is not None:
            done, after = await self._run(partial(step(), after=after, upto=upto, limit=RECORD_SLICE))
            total += done
        return total

    async def list_discards(self, flt: RecordFilter, limit: int = 100) -> list[DiscardRecord]:
        records: list[DiscardRecord] = await self._run(partial(ops.list_discards, flt=flt, limit=limit), writes=False)
        return records

    async def queue_stats(self) -> dict[str, QueueStats]:
        stats: dict[str, QueueStats] = await self._read(ops.queue_stats)
        return stats

    async def users_waiting(
        self, destination: str, before: int, users: Sequence[str], ignore: Collection[int] = ()
    ) -> set[str]:
        # On the reader: it walks the destination's pending jobs before ``before``, which on
        # a deep queue would hold the writer, and every ingest commit behind it.
        waiting: set[str] = await self._read(
            partial(ops.users_waiting, destination=destination, before=before, users=users, ignore=frozenset(ignore))
        )
        return waiting

    async def delivered_version(self, destination: str, message_id: str) -> str | None:
        version: str | None = await self._run(
            partial(ops.delivered_version, destination=destination, message_id=message_id), writes=False
        )
        return version

    async def get_destination_states(self) -> dict[str, DestinationState]:
        states: dict[str, DestinationState] = await self._run(ops.get_destination_states, writes=False)
        return states

    async def set_destination_state(self, state: DestinationState) -> None:
        await self._run(partial(ops.set_destination_state, state=state))

    async def make_due(self, destination: str) -> int:
        now, after, made = time.time(), 0, 0
        # Only the jobs there were at the resume: later ones are due anyway, and a retry
        # set after it (a new Retry-After) stands.
        upto = await self._run(ops.last_job_id, writes=False)
        while after is not None:
            step = partial(
                ops.make_due_step, destination=destination, after=after, upto=upto, limit=MAKE_DUE_STEP, now=now
            )
            changed, after = await self._bookkeep(step)
            made += changed
        return made

    async def check_writable(self) -> None:
        await self._run(partial(ops.heartbeat, now=time.time()))
        self._check_capacity()  # ready means ready to accept events: not while ingest says full

    async def prune(self, dedupe_before: float, settled_before: float) -> int:
        dedupe = self._open_dedupe()
        merging = self._merge_task
        if merging is None:  # merge in slices first, so the prune's own merge is small
            merging = self._merge_task = asyncio.create_task(self._merge_dedupe(dedupe))
        await merging
        # The keys still waiting (few, after the sliced merge) go into the B-tree, with the
        # merge's time: keys that only ever waited would otherwise never age out.
        await self._run(dedupe.merge)
        # Then the rest in steps, each its own writer operation (committed without a sync
        # of its own: a power cut may only bring back rows the next prune deletes), so that
        # acknowledgements are written between them: one operation held the writer for
        # the whole prune, seconds on a store of some days' records (docs/operations.md).
        removed: int = 0
        done = False
        while not done:
            keys, done = await self._bookkeep(partial(dedupe.prune, before=dedupe_before))
            removed += keys
        after: int | None = 0
        while after is not None:
            step = partial(ops.prune_settled_step, after=after, before=settled_before, limit=PRUNE_STEP)
            jobs, after = await self._bookkeep(step)
            removed += jobs
        while True:
            discards = await self._bookkeep(partial(ops.prune_discards_step, before=settled_before, limit=PRUNE_STEP))
            removed += discards
            if discards < PRUNE_STEP:
                break
        if removed:
            # Pruning frees pages that new rows will reuse, and the WAL may have grown in a
            # burst: shrink it and measure now, so backpressure lifts.
            await self._run(self._checkpoint_and_measure, outside_transaction=True)
        self._capacity_checked_at = float("-inf")
        return removed

    def _checkpoint_and_measure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._measure_free(conn)

    def _measure_free(self, conn: sqlite3.Connection) -> None:
        self._free_checked_at = time.monotonic()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        self._free_bytes = int(free) * int(page)
