"""The SQLite writer thread under faults: its callers always get an answer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bridge.store.base import StoreError
from bridge.store.sqlite_writer import GroupCommitWriter

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
