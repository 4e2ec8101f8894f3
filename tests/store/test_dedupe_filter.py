"""The Bloom filter in front of the SQLite store's dedupe lookup (bridge/store/key_filter.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from bridge.store import sqlite_dedupe
from bridge.store.base import StoreError
from bridge.store.key_filter import KeyFilter
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import dedupe_keys_of
from tests.store.helpers import event


async def opened(path: Path, **opts: object) -> SqliteStore:
    store = SqliteStore(str(path), min_free_disk_bytes=0, dedupe_filter_bits_log2=16, **opts)  # type: ignore[arg-type]
    await store.open()
    return store


async def filter_built(store: SqliteStore) -> KeyFilter:
    task = store._filter_task
    if task is not None:
        await task
    built = store._open_dedupe().filter
    assert built is not None
    return built


def test_a_filter_keeps_every_key_it_was_given_and_few_others() -> None:
    key_filter = KeyFilter(bits_log2=20)
    given = [os.urandom(16) for _ in range(1000)]
    # Two keys of one call whose probes share a byte but not a bit: both bits must stay.
    same_byte = [bytes([0, 0, 0, 0]) + bytes(12), bytes([1, 0, 0, 0]) + bytes(12)]
    key_filter.add(given[:1] + same_byte + given[1:600])
    key_filter.add(given[600:] + given[:10])  # repeats are harmless
    assert key_filter.might_hold(same_byte) == same_byte
    assert key_filter.might_hold(given) == given  # all of them, in order
    assert key_filter.count == 1012
    fresh = [os.urandom(16) for _ in range(20_000)]
    # 1000 keys in 2^20 bits: about 0.1% of fresh keys pass; 1% would mean a broken probe.
    assert len(key_filter.might_hold(fresh)) < 200
    assert key_filter.might_hold([]) == []
    with pytest.raises(ValueError, match="16 bytes"):
        key_filter.might_hold([b"short"])
    with pytest.raises(ValueError, match="2\\^4 to 2\\^32"):
        KeyFilter(bits_log2=3)


async def test_lookups_ask_sqlite_only_about_keys_the_filter_cannot_rule_out(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db")
    old = [f"old-{i}" for i in range(300)]
    await store.enqueue("web", [event(m) for m in old])
    await store.prune(0, 0)  # merges them into dedupe_keys, out of memory
    await filter_built(store)
    probed: list[str] = []
    await store._run(lambda conn: conn.set_trace_callback(probed.append), writes=False)

    result = await store.enqueue("web", [event(f"new-{i}") for i in range(500)] + [event(m) for m in old[:50]])
    await store._run(lambda conn: conn.set_trace_callback(None), writes=False)
    await store.close()

    assert result.stored == 500 and result.duplicate_indexes == tuple(range(500, 550))
    lookups = [sql for sql in probed if "FROM dedupe_keys WHERE k IN" in sql]
    asked = sum(sql.count("x'") for sql in lookups)  # the trace shows each bound key as a blob literal
    # The 50 stored keys, and of 500 fresh ones the few a filter of 2^16 bits holding
    # 800 keys lets through (about 1%); without the filter all 550 would be asked.
    assert 50 <= asked < 80


async def test_a_filter_built_on_reopening_walks_every_stored_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    old = [f"old-{i}" for i in range(500)]
    await store.enqueue("web", [event(m) for m in old])
    await store.prune(0, 0)
    await store.close()

    monkeypatch.setattr(sqlite_dedupe, "FILTER_STEP", 64)  # a walk of several steps
    reopened = await opened(path)
    assert reopened._open_dedupe().filter is None  # not at open: only once it ingests
    assert (await reopened.enqueue("web", [event("first")])).stored == 1
    built = await filter_built(reopened)
    assert built.count == 501
    assert built.might_hold(dedupe_keys_of("web", old)) == dedupe_keys_of("web", old)
    assert (await reopened.enqueue("web", [event(m) for m in old])).stored == 0
    await reopened.close()


async def test_a_key_merged_while_a_filter_is_built_is_in_it(tmp_path: Path) -> None:
    """A key in memory when a build begins can be merged into dedupe_keys after the walk
    has passed its place: the build copies memory's keys, or the filter would miss it."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event("seed")])
    first = await filter_built(store)
    waiting = [f"waiting-{i}" for i in range(40)]
    await store.enqueue("web", [event(m) for m in waiting])

    await store._run(dedupe.begin_filter, writes=False)
    while not await store._run(dedupe.fill_filter, writes=False):
        pass
    assert dedupe.filter is not first
    await store._run(dedupe.merge)  # moves the waiting keys to dedupe_keys, out of memory
    assert dedupe._recent == set()
    assert (await store.enqueue("web", [event(m) for m in waiting])).stored == 0
    await store.close()


async def test_a_filter_is_built_again_once_half_its_keys_are_pruned(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db")
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event(f"old-{i}") for i in range(200)])
    first = await filter_built(store)
    assert not dedupe.wants_filter
    await store.prune(dedupe_before=2**40, settled_before=0)  # every key has aged out
    assert dedupe.pruned_since_filter == 200 and dedupe.wants_filter

    assert (await store.enqueue("web", [event("after")])).stored == 1
    rebuilt = await filter_built(store)
    assert rebuilt is not first and rebuilt.count == 1
    assert dedupe.pruned_since_filter == 0 and not dedupe.wants_filter
    assert (await store.enqueue("web", [event("after"), event("old-3")])).duplicate_indexes == (0,)
    await store.close()


async def test_a_store_that_only_reads_builds_no_filter(tmp_path: Path) -> None:
    """The CLI opens the file to list, replay and prune: no 16 MiB filter, no walk."""
    path = tmp_path / "b.db"
    server = await opened(path)
    await server.enqueue("web", [event("m1")])
    await server.close()
    cli = await opened(path)
    await cli.prune(0, 0)
    assert cli._open_dedupe().filter is None and cli._filter_task is None
    await cli.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM dedupe_keys").fetchone()[0] == 1
    conn.close()


async def test_keys_that_arrive_after_the_filter_is_built_stay_known_once_merged(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("seed")])
    await filter_built(store)
    late = [f"late-{i}" for i in range(100)]
    await store.enqueue("web", [event(m) for m in late])
    await store.prune(0, 0)  # out of memory, into dedupe_keys: only the filter says "ask SQLite"
    assert store._open_dedupe()._recent == set()
    assert (await store.enqueue("web", [event(m) for m in late])).stored == 0
    await store.close()


async def test_a_failed_build_leaves_lookups_to_sqlite_and_the_next_enqueue_builds_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opened(tmp_path / "b.db")
    dedupe = store._open_dedupe()
    real_fill = dedupe.fill_filter

    def failing_fill(conn: sqlite3.Connection) -> bool:
        raise StoreError("sqlite: disk I/O error")

    monkeypatch.setattr(dedupe, "fill_filter", failing_fill)
    await store.enqueue("web", [event("m1")])
    if store._filter_task is not None:
        await store._filter_task  # fails quietly: nothing is lost, only speed
    assert dedupe.filter is None and dedupe.wants_filter
    assert (await store.enqueue("web", [event("m1"), event("m2")])).duplicate_indexes == (0,)

    monkeypatch.setattr(dedupe, "fill_filter", real_fill)
    await store.enqueue("web", [event("m3")])
    built = await filter_built(store)
    assert built.might_hold(dedupe_keys_of("web", ["m1", "m2", "m3"])) == dedupe_keys_of("web", ["m1", "m2", "m3"])
    await store.close()
