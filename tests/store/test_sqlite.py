"""What only the SQLite store does: file settings, disk checks, sharing the file, URLs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.store import open_store, sqlite_rows
from bridge.store import sqlite_ops as ops
from bridge.store.base import DeadLetter, Discard, IncomingEvent, QueueStats, RecordFilter, StoreError, StoreFull
from bridge.store.sql_filters import record_where
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import KEYS_PER_ROW, dedupe_key, dedupe_keys_of, target_generation
from bridge.store.sqlite_schema import SCHEMA_VERSION
from bridge.store.sqlite_writer import GroupCommitWriter
from tests.store.helpers import check_outputs_survive, event, mid_merge, newest_generation, stored_dedupe_keys


async def opened(path: Path, **opts: object) -> SqliteStore:
    opts.setdefault("min_free_disk_bytes", 0)
    store = SqliteStore(str(path), **opts)  # type: ignore[arg-type]
    await store.open()
    return store


async def assert_known_after_reopening(path: Path, message_ids: list[str]) -> None:
    """A store opened anew on ``path`` takes every one of ``message_ids`` for a duplicate."""
    reopened = await opened(path)
    assert (await reopened.enqueue("web", [event(m) for m in message_ids])).stored == 0
    await reopened.close()


async def test_the_file_is_in_wal_mode_with_its_tables(tmp_path: Path) -> None:
    store = await opened(tmp_path / "sub" / "dir" / "b.db")  # missing directories are created
    await store.enqueue("web", [event("m1")])
    await store.close()
    conn = sqlite3.connect(tmp_path / "sub" / "dir" / "b.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "dedupe_generations", "dedupe_recent", "identity_links", "dead_letters", "discards"} <= tables
    assert "dedupe" not in tables  # the string-keyed table of schema version 1
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_opening_drops_the_old_index_of_delivered_jobs_by_message_id(tmp_path: Path) -> None:
    """Earlier versions kept an index that every ack paid for (a random message id into a
    B-tree per job); a store opened on such a file drops it, and the audit lookup still
    answers."""
    store = await opened(tmp_path / "b.db")
    await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("CREATE INDEX jobs_delivered ON jobs (destination, message_id) WHERE state = 2")
    conn.close()
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("m1")])
    [job] = await store.lease("moe", 10, 30)
    await store.ack([job.id], "v7")
    assert await store.delivered_version("moe", "m1") == "v7"
    await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(jobs)")}
    conn.close()
    assert "jobs_delivered" not in indexes and "jobs_pending" in indexes


async def test_opening_replaces_the_index_of_unsettled_jobs_keyed_on_state(tmp_path: Path) -> None:
    """Earlier versions indexed unsettled jobs ``WHERE state < 2``, which every lease,
    retry and release rewrote. A store opened on such a file indexes them by settled_at
    instead, and a delivered job that somehow lacks its settled_at is not queued again."""
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("m1", "u1"), event("m2", "u2"), event("m3", "u3")])
    await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("DROP INDEX jobs_pending")
    conn.execute("CREATE INDEX jobs_unsettled ON jobs (destination, id) WHERE state < 2")
    conn.execute("UPDATE jobs SET state = 2 WHERE message_id = 'm1'")  # delivered, settled_at never written
    conn.commit()
    conn.close()
    store = await opened(tmp_path / "b.db")
    assert (await store.queue_stats())["moe"].depth == 2
    assert [j.message_id for j in await store.lease("moe", 10, 30)] == ["m2", "m3"]
    await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(jobs)")}
    conn.close()
    assert "jobs_unsettled" not in indexes and "jobs_pending" in indexes


def test_queue_reads_use_the_index_of_pending_jobs(tmp_path: Path) -> None:
    """Leases and gauges must find queued jobs through the partial index: a query whose
    WHERE stops implying the index's own reads every job ever delivered instead."""
    from bridge.store import sqlite_ops
    from bridge.store.sqlite_leases import Leases
    from bridge.store.sqlite_schema import WAITING, configure, create_schema

    conn = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    configure(conn)
    create_schema(conn)
    conn.execute(
        "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, available_at, created_at)"
        " VALUES ('moe', 'web', 'm1', 'u1', X'7B7D', 0, 0, 0)"
    )
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    for ordered in (True, False):
        sqlite_ops.lease(conn, "moe", 10, 30.0, ordered, time.time(), Leases(lambda undo: None))
    sqlite_ops.queue_stats(conn)
    conn.set_trace_callback(None)
    reads = [sql for sql in statements if "FROM jobs" in sql and "destination" in sql]
    assert len(reads) >= 4  # both leases' walks, the destinations, depth and head per destination
    assert any(WAITING in sql for sql in reads)  # the ordered lease's first look
    for sql in reads:
        plan = " | ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
        index = "jobs_waiting" if WAITING in sql else "jobs_pending"
        assert index in plan, f"{sql}\n  {plan}"
    conn.close()


def test_a_deletion_finds_its_users_links_and_records_by_index(tmp_path: Path) -> None:
    """A delivered deletion's statements run on the writer every ingest waits for: each must
    find its rows through an index, not read every link, dead letter or discard."""
    from bridge.store import sqlite_ops
    from bridge.store.sqlite_schema import DELIVERED, configure, create_schema

    conn = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    configure(conn)
    create_schema(conn)
    conn.execute(
        "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, available_at, created_at)"
        f" VALUES ('moe', 'web', 'del', 'u1', X'7B7D', {DELIVERED}, 0, 0)"
    )
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    sqlite_ops._erase_links(conn, {1: frozenset({"u1", "crm-1"})})
    conn.set_trace_callback(None)
    deletes = {sql.split()[2]: sql for sql in statements if sql.startswith("DELETE FROM")}
    assert set(deletes) == {"identity_links", "dead_letters", "discards"}
    wanted = {"dead_letters": "dead_letters_by_user", "discards": "discards_by_user"}
    for table, index in wanted.items():
        plan = " | ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + deletes[table]))
        assert index in plan, f"{deletes[table]}\n  {plan}"
    conn.close()


async def test_open_is_idempotent_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        await opened(tmp_path / "b.db")


async def fill(store: SqliteStore, prefix: str, limit: int = 100_000) -> int:
    """Enqueue 1 KB events, 50 a call, until the store refuses them: how many it took."""
    taken = 0
    with pytest.raises(StoreFull):
        while taken < limit:
            await store.enqueue("web", [event(f"{prefix}{taken + k}", user=f"u{k}", size=1000) for k in range(50)])
            taken += 50
    return taken


async def accepts_again(store: SqliteStore, message_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await store.enqueue("web", [event(message_id)])
            return
        except StoreFull:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Disk:
    """A stand-in for the store's disk: ``size`` bytes, all but what the store's files use
    free (os.statvfs of any other directory is the real one's)."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory, self.size, self.statvfs = directory, size, os.statvfs

    def __call__(self, where: str) -> Any:
        if where != str(self.directory):
            return self.statvfs(where)
        used = sum(p.stat().st_size for p in self.directory.glob("b.db*"))
        return SimpleNamespace(f_bavail=max(self.size - used, 0), f_frsize=1)


@pytest.mark.parametrize("limit", ["max_bytes", "min_free_disk_bytes"])
async def test_a_store_filled_by_a_queue_takes_as_much_again_once_it_is_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A destination down long enough fills the store; once it is back and the queue is
    delivered, the store makes room by itself. An ack empties a job's payload, but its row
    keeps its page: until the delivered records aged out of retention (72 h), ingest kept
    answering 503 store_full. The file never shrinks, so on a full disk the pages freed
    must count as free too: they take new rows before the disk does. No prune runs here
    (the bridge's runs every ten minutes, and keeps what is younger than retention)."""
    if limit == "max_bytes":
        store = await opened(tmp_path / "b.db", max_bytes=60_000_000, size_check_interval=0.0)
    else:
        monkeypatch.setattr(os, "statvfs", Disk(tmp_path, 70_000_000))
        store = await opened(tmp_path / "b.db", min_free_disk_bytes=10_000_000, size_check_interval=0.0)
    taken = await fill(store, "outage-")
    while jobs := await store.lease("moe", 1000, 30, ordered=False):
        await store.ack([j.id for j in jobs])
    await accepts_again(store, "after-delivery")
    # Not only a few events: much of the room the delivered queue took, again.
    again = 0
    while again < taken // 2:
        await store.enqueue("web", [event(f"again-{again + k}", user=f"u{k}", size=1000) for k in range(50)])
        again += 50
    assert (await store.queue_stats())["moe"].depth == 1 + again
    await store.close()


async def test_a_store_left_full_of_delivered_records_makes_room_after_a_restart(tmp_path: Path) -> None:
    """The queue was delivered, then the bridge restarted (an upgrade to a version that
    makes room, or an operator restarting a bridge that answers 429 store_full): the new process has
    acked nothing, and only jobs acked since it started made a reclaim worth running, so
    the store stayed full, every event refused, until the records left retention (72 h)."""
    store = await opened(tmp_path / "b.db", max_bytes=60_000_000, size_check_interval=0.0)
    await fill(store, "outage-")
    while jobs := await store.lease("moe", 1000, 30, ordered=False):
        await store.ack([j.id for j in jobs])
    await store.close()
    # Closing checkpoints the WAL into the file: full now is the file itself.
    full = (tmp_path / "b.db").stat().st_size - 1_000_000
    store = await opened(tmp_path / "b.db", max_bytes=full, size_check_interval=0.0)
    with pytest.raises(StoreFull):  # still full: the delivered records hold their pages
        await store.enqueue("web", [event("at-restart")])
    await accepts_again(store, "after-restart")
    assert (await store.queue_stats())["moe"].depth == 1
    await store.close()


class _ReclaimFailsOnce(SqliteStore):
    """A store whose next reclaim step fails once armed, as a disk error would fail it."""

    failed = True  # armed by setting it False

    async def _bookkeep(self, op: Any) -> Any:
        if getattr(op, "func", None) is ops.prune_delivered_step and not self.failed:
            self.failed = True
            raise StoreError("disk I/O error")
        return await super()._bookkeep(op)


async def test_a_failed_reclaim_is_tried_again_with_no_ack_to_ask_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue is delivered, so no ack will ever come; the reclaim that would make room
    fails once. It was never tried again: the acks that ask for one had been counted off
    before it ran, and the store answered 503 until the records left retention."""
    monkeypatch.setattr("bridge.store.sqlite.RECLAIM_INTERVAL", 0.5)
    store = _ReclaimFailsOnce(
        str(tmp_path / "b.db"), max_bytes=60_000_000, size_check_interval=0.0, min_free_disk_bytes=0
    )
    await store.open()
    await fill(store, "outage-")
    while jobs := await store.lease("moe", 1000, 30, ordered=False):
        await store.ack([j.id for j in jobs])
    store.failed = False  # the reclaim the next refusal starts fails
    await accepts_again(store, "after-a-failed-reclaim")
    assert store.failed
    await store.close()


async def test_store_full_when_the_disk_is_nearly_full(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db", min_free_disk_bytes=1 << 62)
    with pytest.raises(StoreFull, match="free"):
        await store.enqueue("web", [event("m1")])
    await store.close()


async def test_backpressure_lifts_once_pruning_frees_space(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db", max_bytes=600_000, size_check_interval=0.0)
    with pytest.raises(StoreFull):
        for i in range(1000):
            await store.enqueue("web", [event(f"m{i}-{k}", size=2000) for k in range(20)])
    while jobs := await store.lease("moe", 1000, 30, ordered=False):
        await store.ack([j.id for j in jobs])
    now = time.time()
    assert await store.prune(now + 1, now + 1) > 0
    await store.enqueue("web", [event("after-prune", size=2000)])
    await store.close()


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Files made immutable with chattr: the one way to refuse writes to root."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    probe = tmp_path / "probe"
    probe.write_text("x")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip(f"this filesystem ({tmp_path}) does not support chattr +i")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    files: list[Path] = []
    yield files
    for path in files:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


async def test_check_writable_fails_when_the_files_become_read_only(tmp_path: Path, immutable: list[Path]) -> None:
    db = tmp_path / "b.db"
    store = await opened(db)
    await store.enqueue("web", [event("m1")])
    await store.check_writable()
    # The -shm file stays writable: it is shared memory, and SQLite only maps it.
    for path in (db, Path(str(db) + "-wal")):
        subprocess.run(["chattr", "+i", str(path)], check=True)
        immutable.append(path)
    with pytest.raises(StoreError, match="sqlite"):
        await store.check_writable()
    with pytest.raises(StoreError):
        await store.enqueue("web", [event("m2")])
    for path in immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    await store.check_writable()  # recovers once the disk takes writes again
    assert (await store.enqueue("web", [event("m2")])).stored == 1
    await store.close()


async def test_a_store_file_moved_away_refuses_events_until_it_is_back(tmp_path: Path) -> None:
    """SQLite keeps committing to the file it opened, which the path no longer names: the
    events it would acknowledge would be gone at the next restart."""
    db, aside = tmp_path / "b.db", tmp_path / "aside.db"
    store = await opened(db, size_check_interval=0.0)
    await store.enqueue("web", [event("m1")])
    os.rename(db, aside)
    with pytest.raises(StoreError, match="was deleted while the server runs") as refused:
        await store.enqueue("web", [event("m2")])
    assert not isinstance(refused.value, StoreFull)  # ingest answers store_unavailable
    with pytest.raises(StoreError, match="deleted"):
        await store.check_writable()
    # What was acknowledged before is still delivered, from the file the store has open.
    assert [j.message_id for j in await store.lease("moe", 10, 30)] == ["m1"]
    os.rename(aside, db)
    await store.check_writable()
    assert (await store.enqueue("web", [event("m2")])).stored == 1
    await store.close()
    await assert_known_after_reopening(db, ["m1", "m2"])


async def test_a_store_file_replaced_under_the_server_refuses_events(tmp_path: Path) -> None:
    db, copy = tmp_path / "b.db", tmp_path / "copy.db"
    store = await opened(db, size_check_interval=0.0)
    await store.enqueue("web", [event("m1")])
    shutil.copy(db, copy)
    os.replace(copy, db)  # a restore from a backup, say
    with pytest.raises(StoreError, match="replaced by another file"):
        await store.enqueue("web", [event("m2")])
    await store.close()


async def test_two_stores_share_one_file(tmp_path: Path) -> None:
    """The CLI (``bridge dlq replay``) opens the file while the server is writing to it."""
    server = await opened(tmp_path / "b.db")
    cli = await opened(tmp_path / "b.db", upgrade=False)
    await server.enqueue("web", [event(f"d{i}") for i in range(10)])
    jobs = await server.lease("moe", 10, 30)
    await server.dead_letter([DeadLetter(j.id, "http_400") for j in jobs])

    async def ingest() -> int:
        stored = 0
        for i in range(50):
            stored += (await server.enqueue("web", [event(f"live{i}-{k}") for k in range(20)])).stored
        return stored

    stored, replayed = await asyncio.gather(ingest(), cli.replay_dead(RecordFilter()))
    assert (stored, replayed) == (1000, 10)
    assert (await server.queue_stats())["moe"].depth == 1010
    await cli.close()
    await server.close()


async def _ten_dead_letters(store: SqliteStore) -> None:
    await store.enqueue("web", [event(f"d{i}", f"u{i}") for i in range(10)])
    jobs = await store.lease("moe", 10, 30)
    await store.dead_letter([DeadLetter(j.id, "http_400") for j in jobs])


async def test_a_replay_commits_slice_by_slice_and_ingest_commits_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay of a whole DLQ was one transaction on the one writer thread: a million dead
    letters held every ingest acknowledgement until the last was moved. An event ingested
    while the first slice runs is now queued after that slice and before the next. A job
    dead-lettered meanwhile is left for the next replay, as the one transaction left it:
    a replay never moves a record again that it re-queued (a destination still refusing)."""
    monkeypatch.setattr("bridge.store.sqlite.RECORD_SLICE", 3)
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("late", "u98", destinations=("seg",))])
    (late,) = await store.lease("seg", 1, 30)
    await _ten_dead_letters(store)
    in_replay, go_on = threading.Event(), threading.Event()
    where = record_where  # the function sqlite_ops calls, wrapped below

    def first_waits(*args: Any, **kwargs: Any) -> Any:
        # Called on the writer thread as the replay selects its records.
        if not in_replay.is_set():
            in_replay.set()
            go_on.wait(30)
        return where(*args, **kwargs)

    monkeypatch.setattr(ops, "record_where", first_waits)
    try:
        replay = asyncio.create_task(store.replay_dead(RecordFilter(reason="http_400")))
        assert await asyncio.to_thread(in_replay.wait, 30)
        ingest = asyncio.create_task(store.enqueue("web", [event("live", "u99")]))
        failed = asyncio.create_task(store.dead_letter([DeadLetter(late.id, "http_400")]))
        await asyncio.sleep(0)  # both are on the writer's queue now
    finally:
        go_on.set()
    assert await replay == 10
    assert (await ingest).stored == 1
    await failed
    assert [r.message_id for r in await store.list_dead(RecordFilter())] == ["late"]
    queued = [j.message_id for j in await store.lease("moe", 20, 30)]
    assert queued == ["d0", "d1", "d2", "live", "d3", "d4", "d5", "d6", "d7", "d8", "d9"]
    await store.close()


async def test_replays_and_purges_commit_once_per_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 3 over 10 records: four transactions each (3, 3, 3 and 1), not one."""
    monkeypatch.setattr("bridge.store.sqlite.RECORD_SLICE", 3)
    store = await opened(tmp_path / "b.db")
    await _ten_dead_letters(store)
    before = store.commits
    assert await store.purge_dead(RecordFilter(destination="moe")) == 10
    assert store.commits - before == 4
    await store.enqueue("web", [event(f"x{i}", f"v{i}") for i in range(10)])
    await store.discard([Discard(j.id, "anonymous_user") for j in await store.lease("moe", 10, 30)])
    before = store.commits
    assert await store.replay_discards(RecordFilter(reason="anonymous_user")) == 10
    assert store.commits - before == 4
    assert len(await store.lease("moe", 20, 30)) == 10
    await store.close()


async def test_a_second_server_on_one_file_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    """Two servers would both lease and deliver the file's jobs, and each merge the other's
    waiting dedupe keys away: the second is refused at open, with the reason."""
    path = tmp_path / "b.db"
    first = await opened(path)
    await first.enqueue("web", [event("m1")])
    second = SqliteStore(str(path), min_free_disk_bytes=0)
    with pytest.raises(StoreError, match=r"another bridge server is using .*b\.db.*PostgreSQL"):
        await second.open()
    cli = await opened(path, upgrade=False)  # the CLI works beside the server
    assert (await cli.queue_stats())["moe"].depth == 1
    await cli.close()
    assert (await first.enqueue("web", [event("m2")])).stored == 1  # the refusal disturbed nothing
    await first.close()
    await second.open()  # the lock went with the first
    assert (await second.queue_stats())["moe"].depth == 2
    await second.close()


async def test_a_symlink_to_the_file_is_the_same_file_to_the_lock(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    first = await opened(tmp_path / "real" / "b.db")
    (tmp_path / "alias.db").symlink_to(tmp_path / "real" / "b.db")
    with pytest.raises(StoreError, match="another bridge server"):
        await opened(tmp_path / "alias.db")  # SQLite would open real/b.db through it
    await first.close()


def test_a_crashed_server_leaves_no_lock_behind(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys, time\n"
            "from bridge.store.sqlite import SqliteStore\n"
            f"s = SqliteStore({str(path)!r}, min_free_disk_bytes=0)\n"
            "asyncio.run(s.open())\n"
            "print('open', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        with pytest.raises(StoreError, match="another bridge server"):
            asyncio.run(opened(path))
        holder.kill()  # no close, no cleanup: as a crash
        holder.wait(10)
        store = asyncio.run(opened(path))
        asyncio.run(store.close())
    finally:
        if holder.poll() is None:
            holder.kill()


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///var/bridge.db")
    assert isinstance(relative, SqliteStore) and relative.path == str(tmp_path / "var" / "bridge.db")
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db", max_bytes=10)
    assert isinstance(absolute, SqliteStore) and absolute.path == f"{tmp_path}/abs.db"
    assert absolute.max_bytes == 10
    from bridge.store.postgres import PostgresStore

    for url in ("postgresql://postgres@127.0.0.1:5432/test", "postgres://postgres@127.0.0.1/test"):
        pg = open_store(url, max_bytes=10, min_free_disk_bytes=5)  # the runtime passes both options
        assert isinstance(pg, PostgresStore) and pg.dsn == url and pg.schema == "bridge"
    named = open_store("postgresql://postgres@127.0.0.1/test?schema=node_a&sslmode=disable")
    assert isinstance(named, PostgresStore) and named.schema == "node_a"
    assert named.dsn == "postgresql://postgres@127.0.0.1/test?sslmode=disable"
    with pytest.raises(ValueError, match="schema name"):
        open_store("postgresql://postgres@127.0.0.1/test?schema=Bad-Name")
    for bad, message in (
        ("mysql://x/y", "unknown store URL scheme 'mysql'"),
        ("", "empty"),
        ("sqlite://bridge.db", "three slashes"),
        ("sqlite:///", "names no file"),
        ("bridge.db", "unknown store URL scheme"),
    ):
        with pytest.raises(ValueError, match=message):
            open_store(bad)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://bridge:pa/Sup3rS3cretPw@db/bridge", "'mysql://…@db/bridge'"),  # a '/' in the password
        ("bridge:Sup3rS3cretPw@db/bridge", "'…@db/bridge'"),  # no scheme: "bridge" read as one
        ("sqlite://bridge:pa/Sup3rS3cretPw@/tmp/x.db", "'sqlite://…@/tmp/x.db'"),
        ("sqlite:///bridge:Sup3rS3cretPw@db/", "'sqlite://…@db/'"),
    ],
)
def test_a_malformed_store_url_is_named_without_what_may_be_its_password(url: str, shown: str) -> None:
    """Where urlsplit found no user:password (a '/' in the password, no "//" after the
    scheme) the error quoted the URL whole, and the CLI's redaction, which knows a URL's
    password only as scheme://user:password@ without a '/', printed it."""
    with pytest.raises(ValueError) as refused:
        open_store(url)
    assert shown in str(refused.value)
    assert "S3cret" not in str(refused.value)


async def test_without_create_a_missing_file_is_named_and_nothing_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///var/bridge.db`` is relative to the working directory: the CLI run from
    another one made var/bridge.db there, and paused or replayed on that empty file."""
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///var/lib/bridge.db", upgrade=False, create=False)
    with pytest.raises(StoreError) as refused:
        await store.open()
    message = str(refused.value)
    assert message.startswith(f"no store at {tmp_path}/var/lib/bridge.db (")
    assert f"relative to the working directory {tmp_path})" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor its directory
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db", upgrade=False, create=False)
    with pytest.raises(StoreError, match=f"^no store at {tmp_path}/abs.db: "):
        await absolute.open()
    assert list(tmp_path.iterdir()) == []


async def test_without_create_a_file_that_holds_no_store_is_refused_untouched(tmp_path: Path) -> None:
    """An empty file, or another program's database, is not made into a bridge store."""
    empty = tmp_path / "empty.db"
    empty.touch()
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    for path in (empty, other):
        store = SqliteStore(str(path), upgrade=False, create=False)
        with pytest.raises(StoreError, match=f"{path} holds no bridge store"):
            await store.open()
    assert empty.stat().st_size == 0
    assert other.read_bytes() == before  # not even switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "other.db"]


async def test_dedupe_keys_survive_merges_and_reopening(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db", dedupe_merge_at=40)
    for i in range(30):
        result = await store.enqueue("web", [event(f"m{i}-{k}") for k in range(10)] + [event(f"m{i - 1}-0")])
        # The last event repeats one from the previous call: a duplicate whether its key
        # is still waiting in memory, being merged, or already in the B-tree.
        assert (result.stored, result.duplicate_indexes) == ((10, (10,)) if i else (11, ()))
    while store._merge_task is not None:
        await asyncio.sleep(0.01)
    again = await store.enqueue("web", [event(f"m{i}-{k}") for i in range(30) for k in range(10)])
    assert again.stored == 0
    await store.enqueue("web", [event("unmerged")])
    await store.close()

    conn = sqlite3.connect(tmp_path / "b.db")
    assert len(stored_dedupe_keys(conn)) >= 40  # merges happened
    conn.close()
    reopened = await opened(tmp_path / "b.db", dedupe_merge_at=40)
    assert (await reopened.enqueue("web", [event("unmerged"), event("m29-9"), event("new")])).stored == 1
    await reopened.prune(0, 0)  # merges everything first
    await reopened.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    assert len(stored_dedupe_keys(conn)) == 303
    assert conn.execute("SELECT COUNT(*) FROM dedupe_recent").fetchone()[0] == 0
    conn.close()


def _as_schema_version_1(path: Path, keys: list[tuple[str, str, float]], waiting: list[tuple[str, str, float]]) -> None:
    """Rewrite a store's file as schema version 1 left it: string-keyed ``dedupe``."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        DROP TABLE IF EXISTS dedupe_keys;
        CREATE TABLE dedupe (source TEXT NOT NULL, message_id TEXT NOT NULL, seen_at REAL NOT NULL,
            PRIMARY KEY (source, message_id)) WITHOUT ROWID;
        CREATE INDEX dedupe_by_time ON dedupe (seen_at);
        DROP TABLE dedupe_recent;
        CREATE TABLE dedupe_recent (id INTEGER PRIMARY KEY, source TEXT NOT NULL, message_id TEXT NOT NULL,
            seen_at REAL NOT NULL);
        UPDATE schema_version SET version = 1;
        """
    )
    conn.executemany("INSERT INTO dedupe VALUES (?, ?, ?)", keys)
    conn.executemany("INSERT INTO dedupe_recent (source, message_id, seen_at) VALUES (?, ?, ?)", waiting)
    conn.commit()
    conn.close()


async def test_a_file_of_schema_version_1_keeps_its_string_keys_until_they_age_out(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    await store.close()
    now = time.time()
    _as_schema_version_1(
        path,
        [("web", "old-1", now - 3600), ("web", "old-2", now), ("app", "old-1", now)],
        [("web", "waiting-1", now)],
    )

    store = await opened(path, dedupe_merge_at=3)
    # Every key of the old file is still a duplicate, wherever it was: merged or waiting.
    result = await store.enqueue("web", [event("old-1"), event("old-2"), event("waiting-1"), event("new-1")])
    assert (result.stored, result.duplicate_indexes) == (1, (0, 1, 2))
    assert (await store.enqueue("app", [event("old-2"), event("old-1")])).duplicate_indexes == (1,)
    await store.prune(now - 60, 0)  # merges the waiting keys (into dedupe_keys), drops old-1
    assert (await store.enqueue("web", [event("old-1"), event("old-2"), event("waiting-1")])).stored == 1
    await store.prune(now + 60, 0)  # the last string key ages out: lookups stop reading the table
    assert not store._open_dedupe().legacy
    assert (await store.enqueue("web", [event("old-2")])).stored == 1
    await store.close()

    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM dedupe").fetchone()[0] == 0
    recent = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'dedupe_recent'").fetchone()[0]
    assert "AUTOINCREMENT" in recent  # rebuilt so that its ids are never reused
    assert "message_id" not in recent  # ...and to hold digests
    conn.close()


async def test_a_prune_that_rolls_back_keeps_reading_the_old_keys(tmp_path: Path) -> None:
    """Lookups stop reading the version-1 table only once its emptying has committed."""
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    now = time.time()
    _as_schema_version_1(path, [("web", "old-1", now - 3600)], [])
    store = await opened(path)
    dedupe = store._open_dedupe()

    def failing_prune(conn: sqlite3.Connection) -> None:
        dedupe.merge(conn)
        dedupe.prune(conn, now)  # empties the old table...
        raise sqlite3.OperationalError("database or disk is full")  # ...then the transaction fails

    with pytest.raises(StoreError, match="disk is full"):
        await store._run(failing_prune)
    assert dedupe.legacy
    assert (await store.enqueue("web", [event("old-1")])).stored == 0
    await store.close()


async def test_new_keys_survive_a_merge_by_another_process_during_a_sliced_merge(tmp_path: Path) -> None:
    """Another writer empties dedupe_recent while this one is mid-merge. New rows must not
    reuse ids up to the merge's last one, or its finish deletes them unmerged and a
    restart forgets them."""
    path = tmp_path / "b.db"
    server, dedupe, last = await mid_merge(path, [f"old-{i}" for i in range(10)])
    other = await opened(path, upgrade=False)  # the CLI
    await other.prune(0, 0)  # merges all of dedupe_recent and empties it
    await other.close()
    await server.enqueue("web", [event(f"new-{i}") for i in range(5)])
    while not await server._run(partial(dedupe.merge_next, limit=1000)):
        pass  # the snapshot's keys again: already merged by the other process, ignored
    await server._run(partial(dedupe.finish_merge, last=last))
    await server.close()

    await assert_known_after_reopening(path, [f"old-{i}" for i in range(10)] + [f"new-{i}" for i in range(5)])


async def test_a_file_of_schema_version_2_has_its_waiting_keys_turned_into_digests(tmp_path: Path) -> None:
    """Version 2 kept (source, message_id) in dedupe_recent. Opening the file rewrites
    them as digests under the same ids; they stay duplicates, before and after a merge."""
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    conn = sqlite3.connect(path)
    conn.executescript(V2_RECENT)
    waiting = [(7, "web", "w-1", 1.0), (8, "app", "w-1", 1.0), (12, "web", "w-2", 1.0)]
    conn.executemany("INSERT INTO dedupe_recent (id, source, message_id, seen_at) VALUES (?, ?, ?, ?)", waiting)
    conn.commit()
    conn.close()

    store = await opened(path)
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT id, k FROM dedupe_recent ORDER BY id").fetchall()
    assert rows == [(i, dedupe_key(source, m)) for i, source, m, _ in waiting]
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    result = await store.enqueue("web", [event("w-1"), event("w-2"), event("w-3")])
    assert (result.stored, result.duplicate_indexes) == (1, (0, 1))
    await store.prune(0, 0)  # merges them into dedupe_keys
    assert (await store.enqueue("app", [event("w-1"), event("w-2")])).duplicate_indexes == (0,)
    # The next id follows the highest one kept, never reusing one.
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'dedupe_recent'").fetchone()[0] > 12
    conn.close()


V2_RECENT = """
    DROP TABLE dedupe_recent;
    CREATE TABLE dedupe_recent (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,
        message_id TEXT NOT NULL, seen_at REAL NOT NULL);
    UPDATE schema_version SET version = 2;
"""


async def test_the_cli_refuses_an_older_file_and_leaves_it_to_the_server_running_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Upgrading rewrites dedupe_recent: done by a CLI beside a running version-2 server,
    every enqueue of that server would fail. Only ``bridge serve`` upgrades."""
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    server = sqlite3.connect(path, isolation_level=None)  # the version-2 bridge, still running
    server.executescript(V2_RECENT)
    config = tmp_path / "bridge.yaml"
    config.write_text(f"store:\n  url: sqlite:///{path}\n")

    from bridge.cli import main

    assert await asyncio.to_thread(main, ["dlq", "list", "--config", str(config)]) != 0
    assert "start `bridge serve` of this version on it first" in capsys.readouterr().err
    server.execute("INSERT INTO dedupe_recent (seen_at, source, message_id) VALUES (1.0, 'web', 'x')")
    assert server.execute("SELECT version FROM schema_version").fetchone()[0] == 2
    server.close()

    store = await opened(path)  # the new server upgrades
    assert (await store.enqueue("web", [event("x"), event("y")])).duplicate_indexes == (0,)
    await store.close()


async def test_an_upgrade_keeps_dedupe_recent_ids_from_being_reused(tmp_path: Path) -> None:
    """An empty version-2 dedupe_recent that gave out ids up to 500: the rebuilt table
    goes on from there, as a sliced merge's finish (delete ids up to its last) needs."""
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    conn = sqlite3.connect(path)
    conn.executescript(V2_RECENT)
    conn.execute("INSERT INTO dedupe_recent (id, source, message_id, seen_at) VALUES (500, 'web', 'gone', 1.0)")
    conn.execute("DELETE FROM dedupe_recent")
    conn.commit()
    conn.close()
    store = await opened(path)
    await store.enqueue("web", [event("new")])
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id FROM dedupe_recent").fetchall() == [(501,)]
    conn.close()


async def test_a_merge_gives_its_generation_its_time(tmp_path: Path) -> None:
    """Keys that arrived at different times are kept from their merge on: the generation
    they go into is kept until its newest merge is older than dedupe_hours, so no key is
    forgotten early, and it counts the keys a prune of it removes."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event(f"early-{i}") for i in range(20)])
    await asyncio.sleep(0.05)
    await store.enqueue("web", [event(f"late-{i}") for i in range(20)])
    before_merge = time.time()
    # The sliced merge, step by step...
    _, last = await store._run(dedupe.plan)
    while not await store._run(partial(dedupe.file_next, limit=15)):
        pass
    while not await store._run(partial(dedupe.merge_next, limit=15)):
        pass
    await store._run(partial(dedupe.finish_merge, last=last))
    # ...and a whole one.
    await store.enqueue("web", [event(f"later-{i}") for i in range(20)])
    await asyncio.sleep(0.05)
    before_whole = time.time()
    await store._run(dedupe.merge)
    await store.close()

    conn = sqlite3.connect(tmp_path / "b.db")
    rows = conn.execute("SELECT opened_at, newest, keys FROM dedupe_generations").fetchall()
    conn.close()
    assert len(rows) == 1  # within GENERATION_SECONDS: one generation
    opened_at, newest, keys = rows[0]
    assert keys == 60
    assert before_merge <= opened_at < before_whole <= newest


def test_dedupe_keys_are_16_bytes_per_source_and_id() -> None:
    # Stored files hold these digests: the function may never change.
    head, body = b"web", b"3f2b8c1e-0000-4000-8000-000000000001"
    expected = hashlib.blake2b(len(head).to_bytes(4, "big") + head + body, digest_size=16).digest()
    assert dedupe_key("web", body.decode()) == expected
    assert dedupe_keys_of("web", ["a", body.decode(), "a"]) == [
        dedupe_key("web", "a"),
        expected,
        dedupe_key("web", "a"),
    ]
    key = dedupe_key("web", "3f2b8c1e-0000-4000-8000-000000000001")
    assert len(key) == 16 and key == dedupe_key("web", "3f2b8c1e-0000-4000-8000-000000000001")
    # The source is part of the key (dedupe is per source), and the NUL between them means
    # no other split of the same text gives the same key.
    assert len({key, dedupe_key("app", "3f2b8c1e-0000-4000-8000-000000000001"), dedupe_key("we", "b")}) == 3
    assert dedupe_key("ab", "c") != dedupe_key("a", "bc")
    assert dedupe_key("a\x00b", "c") != dedupe_key("a", "b\x00c")  # no separator to forge
    assert dedupe_key("web", "\ud800") != dedupe_key("web", "")  # lone surrogates hash, never raise


async def test_keys_stay_on_disk_when_a_whole_merge_overtakes_a_sliced_one(tmp_path: Path) -> None:
    """Memory runs over while a sliced merge is under way, so ``add`` merges everything at
    once and empties dedupe_recent, then new rows arrive. The sliced merge's finish must
    not delete those new, unmerged rows: after a restart every key is still known."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10_000)
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event(f"old-{i}") for i in range(50)])
    _, last = await store._run(dedupe.plan)
    assert await store._run(partial(dedupe.file_next, limit=100))
    assert not await store._run(partial(dedupe.merge_next, limit=30))
    await store._run(dedupe.merge)  # what add() does when memory runs over
    assert await store._run(partial(dedupe.merge_next, limit=30))
    await store.enqueue("web", [event(f"new-{i}") for i in range(30)])
    await store._run(partial(dedupe.finish_merge, last=last))
    await store.close()

    await assert_known_after_reopening(
        tmp_path / "b.db", [f"old-{i}" for i in range(50)] + [f"new-{i}" for i in range(30)]
    )


async def test_a_merge_keeps_pace_with_sustained_ingest(tmp_path: Path) -> None:
    """Each merge step waits for a commit, and a commit under load brings more new keys
    than a fixed-size step merges. Steps grow with the keys that arrived since the last
    one, so the sliced merge keeps up, and memory never runs over into a whole merge that
    holds the writer for every key at once."""
    # A commit brings up to a tenth of merge_at, as 32 callers' batches do in production.
    store = await opened(tmp_path / "b.db", dedupe_merge_at=2000)
    dedupe = store._open_dedupe()
    dedupe.min_step = 50  # half of what one commit brings
    # The worst case the pacing is for, made deterministic: the merge gets exactly its
    # turn at the writer between two commits, never more (on a busy host, the callers
    # could otherwise take several turns in a row, or the merge several).
    stepped = asyncio.Event()
    step_size = dedupe.step_size

    def counted_step() -> int:
        stepped.set()
        return step_size()

    dedupe.step_size = counted_step  # type: ignore[method-assign]
    turn = asyncio.Lock()

    async def caller(c: int) -> None:
        for b in range(40):
            async with turn:
                stepped.clear()
                await store.enqueue("web", [event(f"c{c}-b{b}-{k}") for k in range(100)])
                # One merge step per commit: wait until the merge under way (if any) has
                # taken its next step, or has finished.
                while store._merge_task is not None and not stepped.is_set():
                    await asyncio.sleep(0.001)

    await asyncio.gather(*(caller(c) for c in range(2)))
    assert dedupe._whole_merges == 0
    assert dedupe.added == 2 * 40 * 100
    while store._merge_task is not None:
        await asyncio.sleep(0.01)
    await store.close()

    conn = sqlite3.connect(tmp_path / "b.db")
    merged = len(stored_dedupe_keys(conn))
    waiting = conn.execute("SELECT COALESCE(SUM(LENGTH(k)), 0) / 16 FROM dedupe_recent").fetchone()[0]
    conn.close()
    assert merged + waiting == 2 * 40 * 100 and merged >= 2000
    reopened = await opened(tmp_path / "b.db")
    assert (await reopened.enqueue("web", [event(f"c{c}-b{b}-7") for c in range(2) for b in range(40)])).stored == 0
    await reopened.close()


async def test_a_merge_by_another_process_is_noticed(tmp_path: Path) -> None:
    server = await opened(tmp_path / "b.db")
    await server.enqueue("web", [event(f"m{i}") for i in range(50)])
    cli = await opened(tmp_path / "b.db", upgrade=False)  # opening only reads the waiting keys
    assert len(server._open_dedupe()._recent) == 50
    await cli.prune(0, 0)  # merges the server's waiting keys into the B-tree
    await cli.close()
    await server.prune(0, 0)
    assert server._open_dedupe()._recent == set()
    assert (await server.enqueue("web", [event("m7"), event("m50")])).duplicate_indexes == (0,)
    await server.close()


async def test_a_commit_groups_new_keys_into_rows_of_up_to_1024(tmp_path: Path) -> None:
    """One dedupe_recent row per 1024 new keys of a commit group, not one per key; every
    key in them is still known after reopening, and after a merge empties the rows."""
    path = tmp_path / "b.db"
    store = await opened(path, dedupe_merge_at=10**9)
    ids = [f"m{i}" for i in range(2500)]
    assert (await store.enqueue("web", [event(m) for m in ids])).stored == 2500
    await store.close()
    conn = sqlite3.connect(path)
    sizes = [n for (n,) in conn.execute("SELECT LENGTH(k) / 16 FROM dedupe_recent ORDER BY id")]
    keys = b"".join(row for (row,) in conn.execute("SELECT k FROM dedupe_recent ORDER BY id"))
    conn.close()
    assert sizes == [1024, 1024, 452]
    assert keys == b"".join(dedupe_keys_of("web", ids))  # end to end, in arrival order

    reopened = await opened(path, dedupe_merge_at=10**9)
    assert (await reopened.enqueue("web", [event(ids[0]), event(ids[-1]), event("new")])).duplicate_indexes == (0, 1)
    await reopened.prune(0, 0)
    assert (await reopened.enqueue("web", [event(ids[1500]), event("newer")])).duplicate_indexes == (0,)
    await reopened.close()


async def test_a_sliced_merge_goes_in_steps_of_keys_and_in_key_order(tmp_path: Path) -> None:
    """Each step files or inserts about as many keys as it is asked for, so a step stays
    short however many keys wait; the inserts go through the B-tree in key order, and
    every key is merged."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    for b in range(5):
        await store.enqueue("web", [event(f"b{b}-{k}") for k in range(100)])
    _, last = await store._run(dedupe.plan)
    filing_steps = 1
    while not await store._run(partial(dedupe.file_next, limit=150)):
        filing_steps += 1
    assert filing_steps == 4  # 500 keys, 150 a step
    inserted: list[list[bytes]] = []
    merge_next = dedupe.merge_next

    def recording(conn: sqlite3.Connection, limit: int) -> bool:
        before = set(stored_dedupe_keys(conn))
        done = merge_next(conn, limit)
        inserted.append(sorted(set(stored_dedupe_keys(conn)) - before))
        return done

    while not await store._run(partial(recording, limit=150)):
        pass
    await store._run(partial(dedupe.finish_merge, last=last))
    await store.close()
    # Whole buckets (keys sharing a first byte) per step: at least the 150 asked for, and
    # at most that plus the few keys of the last bucket taken.
    assert all(150 <= len(step) < 200 for step in inserted[:-1]) and inserted[-1]
    assert [k for step in inserted for k in step] == sorted(k for step in inserted for k in step)
    conn = sqlite3.connect(tmp_path / "b.db")
    assert conn.execute("SELECT COUNT(*) FROM dedupe_recent").fetchone()[0] == 0
    merged = set(stored_dedupe_keys(conn))
    conn.close()
    assert merged == set(dedupe_keys_of("web", [f"b{b}-{k}" for b in range(5) for k in range(100)]))


async def test_a_merge_step_of_several_blobs_merges_every_key_once(tmp_path: Path) -> None:
    """A step's keys go to SQL as blobs of up to KEYS_PER_ROW keys, split there: a step
    of several blobs and a short last one loses no key, and a key merged twice (another
    process got there first) stays one row."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    ids = [f"k{i}" for i in range(2 * KEYS_PER_ROW + 77)]
    for start in range(0, len(ids), 500):
        await store.enqueue("web", [event(m) for m in ids[start : start + 500]])
    _, last = await store._run(dedupe.plan)
    while not await store._run(partial(dedupe.file_next, limit=10_000)):
        pass
    await store._run(partial(target_generation, now=time.time()))  # the generation the merge goes into
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute(f"INSERT INTO {newest_generation(conn)} (k) VALUES (?)", (dedupe_key("web", "k5"),))
    conn.commit()
    assert await store._run(partial(dedupe.merge_next, limit=10_000))  # all of it in one step
    await store._run(partial(dedupe.finish_merge, last=last))
    await store.close()
    rows = stored_dedupe_keys(conn)
    conn.close()
    assert len(rows) == len(ids) and set(rows) == set(dedupe_keys_of("web", ids))


async def test_a_cli_prune_merges_rows_the_server_added_after_the_cli_opened(tmp_path: Path) -> None:
    """The CLI's memory holds only the keys waiting when it opened; its merge must take
    every row it deletes from the rows themselves, or a server crash forgets the rest."""
    path = tmp_path / "b.db"
    server = await opened(path)
    await server.enqueue("web", [event(f"early-{i}") for i in range(50)])
    cli = await opened(path, upgrade=False)
    await server.enqueue("web", [event(f"late-{i}") for i in range(30)])
    await cli.prune(0, 0)
    await cli.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM dedupe_recent").fetchone()[0] == 0
    assert len(stored_dedupe_keys(conn)) == 80
    conn.close()
    # The server stops without merging (as if it crashed): a new one still knows them all.
    await server.close()
    await assert_known_after_reopening(path, [f"early-{i}" for i in range(50)] + [f"late-{i}" for i in range(30)])


async def test_a_damaged_dedupe_row_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    await store.enqueue("web", [event("m1")])
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE dedupe_recent SET k = CAST(k || x'00' AS BLOB)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="dedupe_recent row of 17 bytes is not a whole number of 16-byte keys"):
        await opened(path)


async def test_a_commit_interval_gathers_even_more_calls(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db", commit_interval=0.05)
    results = await asyncio.gather(*(store.enqueue("web", [event(f"m{i}")]) for i in range(100)))
    assert sum(r.stored for r in results) == 100
    assert store.commits <= 5
    await store.close()


FULL, NORMAL = 2, 1  # PRAGMA synchronous values


def _synchronous(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_ingest_commits_are_fsynced_and_delivery_bookkeeping_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def spy(name: str) -> None:
        real = getattr(ops, name)

        def op(conn: sqlite3.Connection, *args: object, **kwargs: object) -> object:
            seen.append((name, _synchronous(conn)))
            return real(conn, *args, **kwargs)

        monkeypatch.setattr(ops, name, op)

    # Not the lease: it writes nothing (sqlite_leases), so it commits nothing to sync.
    for name in ("enqueue_many", "ack", "retry", "release", "discard", "dead_letter"):
        spy(name)
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event(f"m{i}") for i in range(5)])
    jobs = await store.lease("moe", 5, 60)
    fence = {j.id: j.attempts for j in jobs}
    await store.ack([jobs[0].id], "v1", fence=fence)
    await store.retry([jobs[1].id], time.time(), "boom", fence=fence)
    await store.release([jobs[2].id], fence=fence)
    await store.dead_letter([DeadLetter(jobs[3].id, "bad")], fence=fence)
    await store.enqueue("web", [event("m-late")])
    assert seen == [
        ("enqueue_many", FULL),
        ("ack", NORMAL),
        ("retry", NORMAL),
        ("release", NORMAL),
        ("dead_letter", NORMAL),
        ("enqueue_many", FULL),  # and that fsync makes the bookkeeping before it durable too
    ]
    await store.close()


async def test_a_group_with_one_durable_operation_is_fsynced(tmp_path: Path) -> None:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / "w.db", isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    writer = GroupCommitWriter(connect, commit_interval=0.05)  # gathers both into one commit
    writer.start()
    both = await asyncio.gather(writer.submit(_synchronous, durable=False), writer.submit(_synchronous, durable=True))
    assert list(both) == [FULL, FULL]
    assert writer.commits == 1
    assert await writer.submit(_synchronous, durable=False) == NORMAL
    assert await writer.submit(_synchronous) == FULL
    await writer.stop()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SqliteStore(str(tmp_path / "b.db"), max_bytes=0)
    with pytest.raises(ValueError, match="in-memory"):
        SqliteStore(":memory:")


async def test_an_unopenable_path_gives_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "adir.db").mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        await opened(tmp_path / "adir.db")


def _not_sqlite(db: Path) -> None:
    db.write_bytes(b"not a database, someone else's file " * 200)


def _damaged(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 50)
    conn.commit()
    conn.close()
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * 4000 + data[4100:])  # header kept, schema page overwritten


def _newer(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")  # as a newer bridge leaves its file
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "make", [_not_sqlite, _damaged, _newer, Path.mkdir], ids=["not_sqlite", "damaged", "newer_schema", "a_directory"]
)
async def test_a_file_that_cannot_be_the_store_is_named_when_refused(tmp_path: Path, make: Any) -> None:
    db = tmp_path / "store" / "b.db"
    db.parent.mkdir()
    make(db)
    before = db.read_bytes() if db.is_file() else None
    with pytest.raises(StoreError) as refused:
        await opened(db)
    # `bridge serve` prints this one line and exits: it must say which file it means.
    assert str(db) in str(refused.value), refused.value
    if make in (_not_sqlite, _damaged):  # what is there may be someone's data: never written over
        assert db.read_bytes() == before


async def test_a_read_sees_one_snapshot_while_the_writer_commits(tmp_path: Path) -> None:
    """queue_stats lists the destinations with queued jobs, then counts each and finds its
    oldest job: with each statement in its own transaction, a commit in between left a
    listed destination with no oldest job, and the read failed (seen in the delivery
    bench). A read runs in one transaction."""
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("m1"), event("m2")])

    def read_around_a_commit(conn: sqlite3.Connection) -> tuple[int, int, dict[str, QueueStats]]:
        before = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("DELETE FROM jobs")  # as if every job had been settled and pruned
        other.close()
        after = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return before, after, ops.queue_stats(conn)

    before, after, stats = await store._read(read_around_a_commit)
    assert before == after == 2
    assert stats["moe"].depth == 2
    assert await store.queue_stats() == {}  # the next read sees the commit
    await store.close()


async def test_make_due_stops_at_the_last_job_there_was_when_it_began(tmp_path: Path) -> None:
    """A job that arrives, or is retried again, while a resume walks the queue keeps its
    own retry time: a step goes no further than the last id read at the start."""
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("m0", "u0"), event("m1", "u1")])
    first, second = await store.lease("moe", 2, 30)
    later = time.time() + 3600
    await store.retry([first.id, second.id], later, "http_429")
    upto = await store._run(ops.last_job_id, writes=False)
    assert upto == second.id
    step = partial(ops.make_due_step, destination="moe", after=0, upto=first.id, limit=100, now=time.time())
    assert await store._run(step) == (1, None)
    assert [j.message_id for j in await store.lease("moe", 10, 30)] == ["m0"]  # m1 still waits
    await store.close()


def job_rows(path: Path) -> dict[str, tuple[int, int, float | None]]:
    """{message_id: (state, attempts, first_attempt_at)} as the file has them."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT message_id, state, attempts, first_attempt_at FROM jobs").fetchall()
    return {m: (state, attempts, first) for m, state, attempts, first in rows}


async def test_a_lease_writes_nothing_and_each_settle_records_its_attempt(tmp_path: Path) -> None:
    """Leases are the server's (sqlite_leases): the row of a leased job is not rewritten
    until it is settled, and the settle writes the attempt count the lease had."""
    db = tmp_path / "b.db"
    store = await opened(db)
    await store.enqueue("web", [event(f"m{i}", f"u{i}") for i in range(4)])
    writes = store.commits
    m0, m1, m2, m3 = await store.lease("moe", 4, 30)
    assert job_rows(db) == {f"m{i}": (0, 0, None) for i in range(4)}
    await store.ack([m0.id], "v1")
    await store.retry([m1.id], time.time() + 3600, "http_500")
    await store.release([m2.id])
    await store.dead_letter([DeadLetter(m3.id, "http_400")])
    rows = job_rows(db)
    assert rows["m0"][:2] == (2, 1)  # delivered, at the first attempt
    assert rows["m1"] == (0, 1, m1.first_attempt_at)  # waits, one attempt counted
    assert rows["m2"] == (0, 0, None)  # given back as it was
    assert "m3" not in rows
    (dead,) = await store.list_dead(RecordFilter())
    assert (dead.attempts, dead.first_attempt_at) == (1, m3.first_attempt_at)
    assert store.commits - writes == 4  # the settles: the lease committed nothing
    await store.close()


async def test_a_restarted_server_sends_what_its_predecessor_had_leased_at_once(tmp_path: Path) -> None:
    """A server that stops (or dies) with jobs leased leaves nothing behind that makes
    the next one wait for those leases to run out."""
    db = tmp_path / "b.db"
    first = await opened(db)
    await first.enqueue("web", [event("m1", "u1"), event("m2", "u1")])
    assert len(await first.lease("moe", 10, 3600)) == 2
    await first.close()
    second = await opened(db)
    again = await second.lease("moe", 10, 30)
    assert [(j.message_id, j.attempts) for j in again] == [("m1", 1), ("m2", 1)]
    await second.close()


async def test_a_row_an_earlier_version_left_leased_waits_for_its_lease(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    store = await opened(db)
    await store.enqueue("web", [event("old", "u1"), event("lapsed", "u2"), event("next", "u1")])
    with sqlite3.connect(db) as conn:  # as a bridge that wrote leases to the table left them
        conn.execute(
            "UPDATE jobs SET state = 1, attempts = 1, first_attempt_at = 5, lease_until = ? WHERE message_id = 'old'",
            (time.time() + 3600,),
        )
        conn.execute(
            "UPDATE jobs SET state = 1, attempts = 2, first_attempt_at = 5, lease_until = 1 WHERE message_id = 'lapsed'"
        )
    (lapsed,) = await store.lease("moe", 10, 30)  # u1's "next" waits behind "old"
    assert (lapsed.message_id, lapsed.attempts, lapsed.first_attempt_at) == ("lapsed", 3, 5)
    await store.retry([lapsed.id], time.time() + 3600, "http_500")
    assert job_rows(db)["lapsed"] == (0, 3, 5)
    assert [j.message_id for j in await store.lease("moe", 10, 30, ordered=False)] == ["next"]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE jobs SET lease_until = 1 WHERE message_id = 'old'")
    (old,) = await store.lease("moe", 10, 30)
    assert (old.message_id, old.attempts) == ("old", 2)
    await store.release([old.id])  # the attempt does not count: the row stays as it was
    assert [(j.message_id, j.attempts) for j in await store.lease("moe", 10, 30)] == [("old", 2)]
    await store.close()


async def test_the_cli_cannot_lease(tmp_path: Path) -> None:
    """A lease lives in the memory of the process that took it: one taken by the CLI
    would be invisible to the server, which would send the same jobs again."""
    db = tmp_path / "b.db"
    server = await opened(db)
    await server.enqueue("web", [event("m1", "u1")])
    cli = await opened(db, upgrade=False)
    with pytest.raises(StoreError, match="only the server"):
        await cli.lease("moe", 10, 30)
    with pytest.raises(StoreError, match="only the server"):
        await cli.ack([1])
    assert [j.message_id for j in await server.lease("moe", 10, 30)] == ["m1"]
    await cli.close()
    await server.close()


async def test_a_file_whose_discards_keep_no_ordering_key_gains_the_column(tmp_path: Path) -> None:
    """Files made before discards kept their job's ordering key: opened (by the server or
    the CLI), they gain it, and their discards replay with none, as unordered jobs."""
    path = tmp_path / "old.db"
    store = SqliteStore(str(path), min_free_disk_bytes=0)
    await store.open()
    await store.enqueue("web", [event("d1", "alice")])
    [job] = await store.lease("moe", 10, 30)
    await store.discard([Discard(job.id, "anonymous_user")])
    await store.close()
    conn = sqlite3.connect(path)
    with conn:  # the table as it was: no ordering_key (nor the index on it)
        conn.execute("DROP INDEX discards_by_user")
        conn.execute("ALTER TABLE discards DROP COLUMN ordering_key")
    conn.close()
    for upgrade in (False, True):
        reopened = SqliteStore(str(path), min_free_disk_bytes=0, upgrade=upgrade)
        await reopened.open()
        await reopened.close()
    store = SqliteStore(str(path), min_free_disk_bytes=0)
    await store.open()
    try:
        assert await store.replay_discards(RecordFilter(reason="anonymous_user")) == 1
        [again] = await store.lease("moe", 10, 30)
        assert (again.message_id, again.ordering_key) == ("d1", "")
    finally:
        await store.close()


async def test_a_file_from_before_delivered_outputs_gains_the_columns_and_keeps_its_jobs(tmp_path: Path) -> None:
    """Files made before jobs remembered their delivered outputs: opened (by the CLI or the
    server), they gain the columns, their jobs lease as having delivered nothing, and a
    partly delivered job's record then goes through retry, dead letter and replay."""
    path = tmp_path / "old.db"
    store = SqliteStore(str(path), min_free_disk_bytes=0)
    await store.open()
    await store.enqueue("web", [event("o1", "alice"), event("o2", "bob")])
    await store.close()
    conn = sqlite3.connect(path)
    with conn:  # the tables as they were
        for table in ("jobs", "dead_letters", "discards"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN delivered_outputs")
    conn.close()
    for upgrade in (False, True):
        reopened = SqliteStore(str(path), min_free_disk_bytes=0, upgrade=upgrade)
        await reopened.open()
        await reopened.close()
    conn = sqlite3.connect(path)
    for table in ("jobs", "dead_letters", "discards"):
        assert "delivered_outputs" in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}, table
    conn.close()
    store = SqliteStore(str(path), min_free_disk_bytes=0)
    await store.open()
    try:
        await check_outputs_survive(store)
    finally:
        await store.close()


def _job_rows(path: Path) -> list[tuple[object, ...]]:
    """Every job row as enqueue wrote it, in id order: the payload's SQL type with it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT destination, source, message_id, ordering_key, payload, typeof(payload), state,"
            " available_at = created_at, attempts, last_error, mapping_version, settled_at FROM jobs ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def _calls() -> list[tuple[str, list[IncomingEvent]]]:
    """Enqueue calls for both ways of inserting jobs: a run of one destination and source
    (its rows bind those once a statement) and rows that carry their own."""
    return [
        ("web", [event(f"a{i}", f"u{i}", size=i * 300) for i in range(3)]),
        ("web", [event("b1", "u1", ("moe", "sf")), event("b2", "", ("moe", "sf"))]),
        # Equal destinations but not the same tuple: the general rows.
        ("web", [event("d1", "u1", ("moe",)), event("d2", "u3", tuple(["moe"]))]),
        ("web", [event("c1", "u1", ("sf",)), event("c2", "u2", ("sf",))]),
        ("web", [event("c3", "u1", ("sf",))]),  # a single call's event, joining the run before
        ("web", [event("c4", "u5", ("moe", "sf"))]),
        ("web", [event("c5", "u5")]),  # a single call's event, starting a run
        ("app", [event("a0", "u1"), event("e1", "ü-2")]),
        ("web", [event(f"f{i}", "u4") for i in range(700)]),  # past one statement's 500 rows
    ]


def _expected(calls: list[tuple[str, list[IncomingEvent]]]) -> list[tuple[object, ...]]:
    return [
        (d, source, e.message_id, e.ordering_key, e.payload, "blob", 0, 1, 0, "", "", None)
        for source, events in calls
        for e in events
        for d in e.destinations
    ]


async def test_jobs_are_the_same_rows_whether_inserted_in_runs_or_one_by_one(tmp_path: Path) -> None:
    """A commit group's jobs go in as runs of one destination and source where a call's
    events share their destinations, and as rows of their own otherwise: the rows stored,
    and their order, are those of each call run alone (the payload a BLOB of its bytes)."""
    calls = _calls()
    together = await opened(tmp_path / "together.db")
    results = await asyncio.gather(*(together.enqueue(source, events) for source, events in calls))
    assert [r.stored for r in results] == [len(events) for _, events in calls]
    await together.close()
    alone = await opened(tmp_path / "alone.db")
    for source, events in calls:
        await alone.enqueue(source, events)
    await alone.close()
    assert _job_rows(tmp_path / "together.db") == _job_rows(tmp_path / "alone.db") == _expected(calls)


async def test_a_run_binds_its_destination_and_source_once_a_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual call (every event to the same destinations, one of them) is inserted as a
    run: three values a row, its payloads bound as bytearrays, which sqlite3 binds without
    its adapter look-up. A call of two destinations keeps rows of their own."""
    runs: list[tuple[tuple[object, ...], int, int | None]] = []
    insert_values = sqlite_rows.insert_values

    def recorded(
        conn: sqlite3.Connection,
        statement: tuple[str, str],
        shared: Any,
        values: Any,
        width: int,
        *,
        blob_column: int | None = None,
    ) -> None:
        runs.append((tuple(shared)[1:], len(values) // width, blob_column))
        insert_values(conn, statement, shared, values, width, blob_column=blob_column)

    monkeypatch.setattr(ops, "insert_values", recorded)
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("m1", "u1"), event("m2", "u2")])
    await store.enqueue("web", [event("m3", "u1", ("moe", "sf"))])
    await store.close()
    assert runs == [(("moe", "web"), 2, 2)]
    assert [row[:3] for row in _job_rows(tmp_path / "b.db")] == [
        ("moe", "web", "m1"),
        ("moe", "web", "m2"),
        ("moe", "web", "m3"),
        ("sf", "web", "m3"),
    ]


def test_bytes_are_bound_as_bytearrays_and_anything_else_as_it_is() -> None:
    blobs = sqlite_rows.as_blobs([b"{}", b"\x00\xff"])
    assert blobs == [bytearray(b"{}"), bytearray(b"\x00\xff")] and {type(b) for b in blobs} == {bytearray}
    mixed: list[object] = [b"{}", "{}", 3]
    assert sqlite_rows.as_blobs(mixed) is mixed


async def test_a_payload_that_is_not_bytes_is_bound_as_it_is(tmp_path: Path) -> None:
    """Only bytes payloads are turned into bytearrays: any other value reaches SQLite as
    given (a str stays TEXT, an int an INTEGER), not converted into something else
    (bytearray("{}") raises, bytearray(3) is three zero bytes), in a run or not."""
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [IncomingEvent("m1", "u1", "{}", ("moe",))])  # type: ignore[arg-type]
    await store.enqueue("web", [IncomingEvent("m2", "u1", 3, ("moe", "sf"))])  # type: ignore[arg-type]
    await store.close()
    assert [row[4:6] for row in _job_rows(tmp_path / "b.db")] == [("{}", "text"), (3, "integer"), (3, "integer")]
