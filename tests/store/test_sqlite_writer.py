"""The SQLite writer thread under faults: its callers always get an answer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bridge.store.base import StoreError, StoreFull
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_writer import GroupCommitWriter
from tests.store.helpers import event

# Long enough never to be reached by a writer that answers; a hung writer fails the test.
HANG = 30.0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return conn


async def test_a_fault_while_rolling_back_fails_every_caller_instead_of_hanging_them(tmp_path: Path) -> None:
    writer = GroupCommitWriter(lambda: _connect(tmp_path / "w.db"), commit_interval=0.05)
    writer.start()

    def broken_undo() -> None:
        raise RuntimeError("an undo that fails")

    def first(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        writer.on_rollback(broken_undo)

    def aborts(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # as SQLite does on an I/O error: the whole group is undone

    results = await asyncio.wait_for(
        asyncio.gather(writer.submit(first), writer.submit(aborts), return_exceptions=True), HANG
    )
    assert all(isinstance(r, StoreError) for r in results), results
    # The thread gave up; later calls are refused at once rather than queued for nobody.
    with pytest.raises(StoreError, match="restart the bridge"):
        await asyncio.wait_for(writer.submit(lambda conn: None), HANG)
    await asyncio.wait_for(writer.stop(), HANG)


async def test_a_full_database_refuses_events_and_takes_them_again_once_it_has_room(tmp_path: Path) -> None:
    """SQLITE_FULL, as a full disk gives it (here from max_page_count, which needs no root):
    nothing refused is acknowledged or remembered as a duplicate, nothing acknowledged is
    lost, and the store takes events again without a restart."""
    store = SqliteStore(str(tmp_path / "b.db"), min_free_disk_bytes=0)
    await store.open()
    pages = await store._run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 8}").fetchall())
    acked: list[str] = []
    refused: list[str] = []
    for n in range(200):
        ids = [f"m{n}-{i}" for i in range(20)]
        try:
            await store.enqueue("web", [event(m, size=2000) for m in ids])
        except StoreError as exc:
            assert not isinstance(exc, StoreFull)  # ingest answers store_unavailable, 429
            assert "full" in str(exc)
            refused += ids
        else:
            acked += ids
    assert acked and refused
    await store._run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823").fetchall())
    result = await store.enqueue("web", [event(m) for m in refused])
    assert (result.stored, result.duplicates) == (len(refused), 0)
    queued = {j.message_id for j in await store.lease("moe", 100_000, 30)}
    assert queued == set(acked) | set(refused)
    await store.close()
