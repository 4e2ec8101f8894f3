"""Dedupe keys kept in one table per generation of merges (SQLite schema version 5): a
prune drops whole tables instead of deleting keys scattered over one B-tree."""

from __future__ import annotations

import sqlite3
import time
from functools import partial
from pathlib import Path

import pytest

from bridge.store import sqlite_dedupe
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import dedupe_keys_of
from bridge.store.sqlite_schema import SCHEMA_VERSION
from tests.store.helpers import event, mid_merge, stored_dedupe_keys

DAY = 86400.0


async def opened(path: Path, **opts: object) -> SqliteStore:
    store = SqliteStore(str(path), min_free_disk_bytes=0, dedupe_filter_bits_log2=16, **opts)  # type: ignore[arg-type]
    await store.open()
    return store


def _catalog(path: Path) -> list[tuple[int, str, float, int]]:
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT id, name, newest, keys FROM dedupe_generations ORDER BY id").fetchall()
    conn.close()
    return rows


def _backdate(path: Path, name: str, newest: float) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE dedupe_generations SET newest = ? WHERE name = ?", (newest, name))
    conn.close()


@pytest.fixture
def generation_per_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_dedupe, "GENERATION_SECONDS", 0.0)


@pytest.mark.usefixtures("generation_per_merge")
async def test_a_prune_drops_the_generations_it_outlived_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    await store.enqueue("web", [event(f"old-{i}") for i in range(30)])
    await store.prune(0, 0)  # merged: the first generation
    await store.enqueue("web", [event(f"new-{i}") for i in range(20)])
    await store.prune(0, 0)  # the second
    [(_, old_table, _, old_keys), (_, new_table, _, new_keys)] = _catalog(path)
    assert (old_keys, new_keys) == (30, 20)
    now = time.time()
    _backdate(path, old_table, now - 3 * DAY)
    statements: list[str] = []
    await store._run(lambda conn: conn.set_trace_callback(statements.append))
    assert await store.prune(now - 2 * DAY, 0) == 30
    await store._run(lambda conn: conn.set_trace_callback(None))
    # The table went whole: no key was deleted one by one.
    assert any(sql.startswith(f"DROP TABLE IF EXISTS {old_table}") for sql in statements)
    assert not [sql for sql in statements if sql.startswith("DELETE FROM dedupe_keys")]
    assert [name for _, name, _, _ in _catalog(path)] == [new_table]
    result = await store.enqueue("web", [event("old-3"), event("new-3")])
    assert result.duplicate_indexes == (1,)  # the pruned key is new again, the kept one is not
    await store.close()


@pytest.mark.usefixtures("generation_per_merge")
async def test_lookups_and_a_filter_built_on_reopening_read_every_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    batches = [[f"g{g}-{i}" for i in range(40)] for g in range(3)]
    for ids in batches:
        await store.enqueue("web", [event(m) for m in ids])
        await store.prune(0, 0)
    await store.close()
    assert len(_catalog(path)) == 3
    monkeypatch.setattr(sqlite_dedupe, "FILTER_STEP", 25)  # steps that end inside and across tables
    reopened = await opened(path)
    dedupe = reopened._open_dedupe()
    # Before the filter is built, lookups go to every table.
    assert (await reopened.enqueue("web", [event(b[7]) for b in batches])).stored == 0
    while dedupe.filter is None:
        task = reopened._filter_task
        assert task is not None
        await task
    everything = dedupe_keys_of("web", [m for b in batches for m in b])
    assert dedupe.filter.might_hold(everything) == everything
    assert (await reopened.enqueue("web", [event(b[-1]) for b in batches] + [event("fresh")])).stored == 1
    await reopened.close()


async def test_a_merge_whose_generation_another_process_dropped_goes_into_a_new_one(tmp_path: Path) -> None:
    """A CLI's prune with a cutoff ahead of the server's merge drops the generation the
    merge is filling (the server's own prune waits for its merge): the rest of the merge
    goes into a generation that exists, and every key stays known."""
    path = tmp_path / "b.db"
    server, dedupe, last = await mid_merge(path, [f"m{i}" for i in range(50)])
    cli = await opened(path, upgrade=False)
    await cli.prune(time.time() + DAY, 0)  # merges the waiting keys, then drops every generation
    await cli.close()
    assert _catalog(path) == []
    while not await server._run(partial(dedupe.merge_next, limit=1000)):
        pass
    await server._run(partial(dedupe.finish_merge, last=last))
    conn = sqlite3.connect(path)
    assert sorted(stored_dedupe_keys(conn)) == sorted(dedupe_keys_of("web", [f"m{i}" for i in range(50)]))
    conn.close()
    await server.close()


async def test_a_version_4_file_keeps_its_keys_as_its_oldest_generation_until_they_age_out(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    await (await opened(path)).close()
    now = time.time()
    old = [f"v4-{i}" for i in range(25)]
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        DROP TABLE dedupe_generations;
        CREATE TABLE dedupe_keys (k BLOB PRIMARY KEY, seen_at REAL NOT NULL) WITHOUT ROWID;
        CREATE INDEX dedupe_keys_by_time ON dedupe_keys (seen_at);
        UPDATE schema_version SET version = 4;
        """
    )
    conn.executemany(
        "INSERT INTO dedupe_keys (k, seen_at) VALUES (?, ?)",
        [(k, now - 3 * DAY + i) for i, k in enumerate(dedupe_keys_of("web", old))],
    )
    conn.commit()
    conn.close()

    store = await opened(path)
    assert [(name, keys) for _, name, _, keys in _catalog(path)] == [("dedupe_keys", 25)]
    assert (await store.enqueue("web", [event(old[0]), event(old[-1]), event("new")])).stored == 1
    await store.prune(now - 4 * DAY, 0)  # merges "new" into a generation of its own
    catalog = _catalog(path)
    assert catalog[0][1] == "dedupe_keys" and len(catalog) == 2
    assert catalog[0][2] == pytest.approx(now - 3 * DAY + 24)  # its newest key's time
    assert await store.prune(now - 2 * DAY, 0) == 25  # its newest key aged out: dropped whole
    conn = sqlite3.connect(path)
    gone = conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'dedupe_keys%' ORDER BY name").fetchall()
    version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
    conn.close()
    assert ("dedupe_keys",) not in gone and ("dedupe_keys_by_time",) not in gone
    assert version == SCHEMA_VERSION
    assert (await store.enqueue("web", [event(old[0]), event("new")])).duplicate_indexes == (1,)
    await store.close()


@pytest.mark.usefixtures("generation_per_merge")
async def test_a_lookup_seeks_each_generation_by_its_key(tmp_path: Path) -> None:
    """Every lookup the filter lets through asks every generation: each must be a seek
    by the primary key, never a scan of a table that may hold hours of keys."""
    path = tmp_path / "b.db"
    store = await opened(path)
    await store.enqueue("web", [event(f"m{i}") for i in range(10)])
    await store.prune(0, 0)
    statements: list[str] = []
    await store._run(lambda conn: conn.set_trace_callback(statements.append))
    assert (await store.enqueue("web", [event("m1"), event("fresh")])).duplicate_indexes == (0,)
    await store._run(lambda conn: conn.set_trace_callback(None))
    await store.close()
    lookups = [sql for sql in statements if "WHERE k IN (SELECT substr(" in sql]
    assert lookups  # the filter is not built yet: the lookup went to SQLite
    conn = sqlite3.connect(path)
    conn.execute("CREATE TEMP TABLE key_slots (n INTEGER PRIMARY KEY)")
    for sql in lookups:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        assert any(step.startswith("SEARCH dedupe_keys_") and "PRIMARY KEY (k=?)" in step for step in plan), plan
        assert not [step for step in plan if step.startswith("SCAN dedupe_keys")], plan
    conn.close()
