"""One thread that owns the SQLite connection and commits everything in groups.

Every store operation is a function of the connection. Callers on the event loop put
it on a queue; the thread takes everything that is waiting, runs it in ONE transaction
(each operation inside its own SAVEPOINT, so a failing operation fails only its own
caller), commits once, and only then resolves the callers' futures. Concurrent enqueue
calls therefore share one fsync, and the event loop never blocks on SQLite.

Not every commit needs its own fsync. An operation submitted with ``durable=False``
(delivery bookkeeping: leases and settles) may be lost by a power cut, never by a crash
of the process, and losing it only means a job is sent again: at-least-once already
allows that. A group made only of such operations commits with ``synchronous=NORMAL``,
which in WAL mode skips the fsync; the next durable commit syncs the WAL, and with it
every frame written before it, so what is lost is always a suffix, never a hole.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from itertools import groupby, repeat
from operator import attrgetter
from typing import Any, NamedTuple

import structlog

from bridge.store.base import StoreError

log = structlog.get_logger("bridge.store")

Operation = Callable[[sqlite3.Connection], Any]
# Runs many calls' items at once and returns one result per item, in order.
BatchOperation = Callable[[sqlite3.Connection, list[Any]], list[Any]]

# A cap on operations per transaction keeps one commit's latency bounded under a flood.
MAX_OPS_PER_COMMIT = 2000


class _Pending(NamedTuple):
    """One submitted operation. A named tuple rather than a slotted dataclass: a single
    Tracking API call makes one, and ``submit_batchable`` builds it with ``tuple.__new__``
    in C, where a dataclass runs its generated ``__init__`` (a Python frame) every time."""

    op: Operation | None  # None for a batchable call: batch_op runs its item
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    writes: bool
    outside_transaction: bool = False
    batch_op: BatchOperation | None = None
    item: Any = None
    durable: bool = True

    def run(self, conn: sqlite3.Connection) -> Any:
        """Run this operation alone (a batchable call too: its item as a batch of one)."""
        if self.op is not None:
            return self.op(conn)
        assert self.batch_op is not None
        return self.batch_op(conn, [self.item])[0]


class _Outcome(NamedTuple):
    """What one operation came to; a named tuple for the same reason as ``_Pending`` (a
    group's successes are built in C, see ``_run_together``)."""

    pending: _Pending
    result: Any = None
    error: BaseException | None = None


_new_tuple = tuple.__new__

# The writer's per-commit scans read one field of every operation: map() with these runs
# in C, where a generator expression resumes a Python frame per item (a commit holds 2-3
# single Tracking API calls at 5k req/s, so these scans cost as much as per-call work).
_writes = attrgetter("writes")
_durable = attrgetter("durable")
_loop_of = attrgetter("pending.loop")
_error_of = attrgetter("error")
_item_of = attrgetter("item")
_outside_transaction = attrgetter("outside_transaction")
_batch_op_of = attrgetter("batch_op")


def _settle(outcomes: list[_Outcome]) -> None:
    for pending, result, error in outcomes:
        future = pending.future
        if future.done():  # the caller was cancelled; the work is committed all the same
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _zip_all(batch: list[_Pending], outcomes: list[_Outcome]) -> list[tuple[_Pending, _Outcome]]:
    """Pair every operation with its outcome; those that never ran get an empty one."""
    padded = outcomes + [_Outcome(p) for p in batch[len(outcomes) :]]
    return list(zip(batch, padded, strict=True))


def _as_store_error(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"sqlite: {exc}")
    return exc


class GroupCommitWriter:
    """Runs operations on a private connection in a dedicated thread, committing in groups."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        commit_interval: float = 0.0,
        after_commit: Callable[[sqlite3.Connection], None] | None = None,
        name: str = "bridge-sqlite-writer",
    ) -> None:
        self._connect = connect
        self._commit_interval = commit_interval
        self._after_commit = after_commit
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self._broken: StoreError | None = None
        # Effects outside SQLite (in-memory indexes) that must follow the transaction's fate.
        self._op_undo: list[Callable[[], None]] = []
        self._op_commit: list[Callable[[], None]] = []
        self._txn_undo: list[Callable[[], None]] = []
        self._txn_commit: list[Callable[[], None]] = []
        self._synced: bool | None = None  # the connection's synchronous mode: FULL (True) or NORMAL
        self.commits = 0  # write transactions committed (observable for tests and metrics)
        self.operations = 0  # write operations committed

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """From inside an operation: call ``undo`` if the operation or its transaction fails."""
        self._op_undo.append(undo)

    def on_commit(self, effect: Callable[[], None]) -> None:
        """From inside an operation: call ``effect`` once its transaction has committed."""
        self._op_commit.append(effect)

    def start(self) -> None:
        self._thread.start()

    async def submit(
        self, op: Operation, *, writes: bool = True, outside_transaction: bool = False, durable: bool = True
    ) -> Any:
        """Run ``op`` on the writer's connection; ``outside_transaction`` is for maintenance
        (e.g. a WAL checkpoint) that SQLite refuses inside a transaction; ``durable=False``
        lets its commit skip the fsync (see the module docstring)."""
        if self._broken is not None:
            raise self._broken
        if self._stopped:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Pending(op, future, loop, writes, outside_transaction, durable=durable))
        return await future

    def submit_batchable(self, batch_op: BatchOperation, item: Any) -> asyncio.Future[Any]:
        """Like ``submit``, but consecutive calls with the same ``batch_op`` that land in one
        transaction run as ONE ``batch_op(conn, items)`` call (set-based SQL instead of a few
        statements per call); if that fails, each item runs alone so only its caller fails.

        Returns the future to await rather than being a coroutine itself: one coroutine
        less for every single-event Tracking API call."""
        if self._broken is not None:
            raise self._broken
        if self._stopped:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # _Pending(None, future, loop, True, False, batch_op, item, True), without a frame.
        self._queue.put(_new_tuple(_Pending, (None, future, loop, True, False, batch_op, item, True)))
        return future

    async def stop(self) -> None:
        """Finish what is queued, then close the connection and end the thread."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # every caller must hear why, not hang
            self._fail_forever(StoreError(f"cannot open the SQLite database: {exc}"))
            return
        batch: list[_Pending] = []
        try:
            self._serve(conn, batch)
        except BaseException as exc:
            # A fault where none is caught (an undo that raises while a failed group is
            # rolled back): were the thread to end here, every later call would wait
            # forever on a queue nobody reads, ingest and delivery hung with the server up.
            # The connection's state and the in-memory indexes may disagree now, so
            # nothing more is written: every caller, waiting or to come, gets a StoreError.
            log.error("sqlite_writer_failed", error=repr(exc), exc_info=True)
            error = StoreError(f"the SQLite writer stopped after an internal error ({exc!r}): restart the bridge")
            self._finish([_Outcome(p, error=error) for p in batch])
            self._fail_forever(error)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        """Commit groups until stopped; ``batch`` holds the group in hand, for ``_run``."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch[:] = [first]
            if self._commit_interval > 0:
                threading.Event().wait(self._commit_interval)
            stop = self._drain(batch)
            try:
                if True not in map(_outside_transaction, batch):  # the usual group: no maintenance
                    self._run_batch(conn, batch)
                else:
                    grouped = [p for p in batch if not p.outside_transaction]
                    if grouped:
                        self._run_batch(conn, grouped)
                    for pending in batch:
                        if pending.outside_transaction:
                            self._run_alone(conn, pending)
            except BaseException as exc:  # a bug here must fail callers, not strand them
                self._rollback(conn)
                self._end_transaction(committed=False)
                error = StoreError(f"sqlite writer failed: {exc!r}")
                self._finish([_Outcome(p, error=error) for p in batch])
            batch.clear()
            if stop:
                return

    def _drain(self, batch: list[_Pending]) -> bool:
        while len(batch) < MAX_OPS_PER_COMMIT:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _sync_for(self, conn: sqlite3.Connection, durable: bool) -> None:
        if self._synced is not durable:
            conn.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
            self._synced = durable

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        writes_each = list(map(_writes, batch))
        writes = True in writes_each
        outcomes: list[_Outcome] = []
        try:
            if writes:
                self._sync_for(conn, any(map(_durable, filter(_writes, batch))))
            conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        except sqlite3.Error as exc:
            self._finish([_Outcome(p, error=StoreError(f"sqlite: cannot begin: {exc}")) for p in batch])
            return
        # Consecutive calls of one batch operation run as one; groupby finds those runs in C.
        for batch_op, group in groupby(batch, _batch_op_of):
            run = list(group)
            if batch_op is not None and len(run) > 1:
                outcomes.extend(self._run_together(conn, run))
                if not conn.in_transaction:
                    self._aborted(batch, outcomes)
                    return
                continue
            for pending in run:
                outcomes.append(self._run_one(conn, pending))
                if not conn.in_transaction:
                    self._aborted(batch, outcomes)
                    return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            self._end_transaction(committed=False)
            error = StoreError(f"sqlite: commit failed: {exc}")
            self._finish([_Outcome(o.pending, error=error) for o in outcomes])
            return
        self._end_transaction(committed=True)
        if writes:
            self.commits += 1
            errors = len(outcomes) - list(map(_error_of, outcomes)).count(None)
            if errors == 0 and False not in writes_each:  # the usual group: every write committed
                self.operations += len(outcomes)
            else:
                self.operations += sum(1 for o in outcomes if o.pending.writes and o.error is None)
            if self._after_commit is not None:
                try:
                    self._after_commit(conn)
                except sqlite3.Error:
                    pass  # housekeeping only; the commit itself succeeded
        self._finish(outcomes)

    def _aborted(self, batch: list[_Pending], outcomes: list[_Outcome]) -> None:
        # SQLite rolled the whole transaction back (I/O error, disk full): nothing in this
        # group is durable, so nobody may be told it is.
        error = StoreError("sqlite: the transaction was aborted by an I/O error")
        self._end_transaction(committed=False)
        self._finish([_Outcome(p, error=o.error or error) for p, o in _zip_all(batch, outcomes)])

    def _run_together(self, conn: sqlite3.Connection, run: list[_Pending]) -> list[_Outcome]:
        batch_op = run[0].batch_op
        assert batch_op is not None
        try:
            conn.execute("SAVEPOINT together")
        except sqlite3.Error as exc:
            return [_Outcome(p, error=_as_store_error(exc)) for p in run]
        self._op_undo, self._op_commit = [], []
        try:
            results = batch_op(conn, list(map(_item_of, run)))
            conn.execute("RELEASE together")
        except BaseException:
            try:
                conn.execute("ROLLBACK TO together")
                conn.execute("RELEASE together")
            except sqlite3.Error:
                pass
            self._undo(self._op_undo)
            if not conn.in_transaction:
                return []  # the caller sees the aborted transaction and fails them all
            return [self._run_one(conn, p) for p in run]  # find the culprit: only it fails
        self._txn_undo.extend(self._op_undo)
        self._txn_commit.extend(self._op_commit)
        if len(results) != len(run):
            raise ValueError(f"a batch operation returned {len(results)} results for {len(run)} items")
        # _Outcome(p, r, None) for each, built in C (see _Outcome).
        return list(map(_new_tuple, repeat(_Outcome), zip(run, results, repeat(None))))

    def _run_alone(self, conn: sqlite3.Connection, pending: _Pending) -> None:
        self._op_undo, self._op_commit = [], []
        try:
            self._sync_for(conn, True)
            outcome = _Outcome(pending, result=pending.run(conn))
        except BaseException as exc:
            outcome = _Outcome(pending, error=_as_store_error(exc))
        self._txn_undo.extend(self._op_undo)
        self._txn_commit.extend(self._op_commit)
        self._end_transaction(outcome.error is None)
        self._finish([outcome])

    def _run_one(self, conn: sqlite3.Connection, pending: _Pending) -> _Outcome:
        try:
            conn.execute("SAVEPOINT op")
        except sqlite3.Error as exc:
            return _Outcome(pending, error=_as_store_error(exc))
        self._op_undo, self._op_commit = [], []
        try:
            result = pending.run(conn)
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            except sqlite3.Error:
                pass
            self._undo(self._op_undo)
            return _Outcome(pending, error=_as_store_error(exc))
        try:
            conn.execute("RELEASE op")
        except sqlite3.Error as exc:
            self._undo(self._op_undo)
            return _Outcome(pending, error=_as_store_error(exc))
        self._txn_undo.extend(self._op_undo)
        self._txn_commit.extend(self._op_commit)
        return _Outcome(pending, result=result)

    @staticmethod
    def _undo(undo: list[Callable[[], None]]) -> None:
        for fn in reversed(undo):
            fn()
        undo.clear()

    def _end_transaction(self, committed: bool) -> None:
        if committed:
            for fn in self._txn_commit:
                fn()
            self._txn_undo.clear()
        else:
            self._undo(self._txn_undo)
        self._txn_commit.clear()

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _finish(self, outcomes: list[_Outcome]) -> None:
        if not outcomes:
            return
        loop = outcomes[0].pending.loop
        if len(set(map(_loop_of, outcomes))) == 1:  # the usual case: one event loop
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.pending.loop, []).append(outcome)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, group)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more

    def _fail_forever(self, error: StoreError) -> None:
        self._broken = error
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._finish([_Outcome(item, error=error)])
