"""The dedupe keys waiting in memory: each held once, through merges and failed merges."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from functools import partial
from pathlib import Path

from bridge.store.base import StoreError
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import DedupeKeys
from tests.store.helpers import event, stored_dedupe_keys


async def _opened(path: Path, **opts: object) -> SqliteStore:
    store = SqliteStore(str(path), min_free_disk_bytes=0, **opts)  # type: ignore[arg-type]
    await store.open()
    return store


def _held(dedupe: DedupeKeys) -> list[bytes]:
    """Every key memory holds, once per set that holds it."""
    return [*dedupe._recent, *dedupe._merging]


async def _merged(store: SqliteStore) -> None:
    while store._merge_task is not None:
        await asyncio.sleep(0.005)


async def test_a_merge_takes_the_waiting_keys_as_they_are_and_holds_each_key_once(tmp_path: Path) -> None:
    """Planning a merge copied the waiting keys into a snapshot, so each key was held twice
    until the merge finished, and a merge of 100k keys took 4 MB more at every merge."""
    store = await _opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event(f"old-{i}") for i in range(300)])
    waiting = dedupe._recent
    _, last = await store._run(dedupe.plan)
    assert dedupe._merging is waiting and dedupe._recent == set()
    await store.enqueue("web", [event(f"new-{i}") for i in range(200)])
    held = _held(dedupe)
    assert len(held) == len(set(held)) == 500

    # Mid-merge, keys of both sets are known, and so is a key the merge has inserted.
    assert await store._run(partial(dedupe.file_next, limit=1000))
    assert not await store._run(partial(dedupe.merge_next, limit=100))
    both = [event("old-7"), event("new-7"), event("old-299"), event("fresh")]
    assert (await store.enqueue("web", both)).duplicate_indexes == (0, 1, 2)

    while not await store._run(partial(dedupe.merge_next, limit=100)):
        pass
    await store._run(partial(dedupe.finish_merge, last=last))
    assert dedupe._merging == set() and len(dedupe._recent) == 201  # the new keys, and "fresh"
    assert (await store.enqueue("web", [event("old-0"), event("new-0"), event("fresh")])).stored == 0
    await store.close()


async def test_the_waiting_keys_set_stays_the_size_of_one_merge_through_many(tmp_path: Path) -> None:
    """Taking merged keys out of one set one by one left it holding a merge and a half of
    keys, and its table grew past that: the bridge's RSS moved by 2-8 MB a merge."""
    merge_at = 3000
    store = await _opened(tmp_path / "b.db", dedupe_merge_at=merge_at)
    dedupe = store._open_dedupe()
    # A set grown 200 keys at a time, as the store grows it, to a merge and a half of keys.
    bound: set[int] = set()
    for start in range(0, merge_at * 3 // 2, 200):
        bound.update(range(start, start + 200))
    largest = 0
    for b in range(150):  # ten merges
        await store.enqueue("web", [event(f"b{b}-{k}") for k in range(200)])
        largest = max(largest, sys.getsizeof(dedupe._recent), sys.getsizeof(dedupe._merging))
        await asyncio.sleep(0)  # the merge task takes a step
    await _merged(store)
    assert dedupe._whole_merges == 0
    assert largest <= sys.getsizeof(bound)
    await store.close()


async def test_keys_of_a_merge_whose_step_failed_stay_known_and_go_to_disk_with_the_next(tmp_path: Path) -> None:
    """A merge step fails (an I/O error): its keys are still in dedupe_recent, so memory
    keeps them for the next merge. Dropped with the failed snapshot, they would be on disk
    in no table a lookup reads, and a retried event taken for new."""
    path = tmp_path / "b.db"
    store = await _opened(path, dedupe_merge_at=500)
    dedupe = store._open_dedupe()
    merge_next = dedupe.merge_next
    failures: list[int] = []

    def failing_once(conn: object, limit: int) -> bool:
        if not failures:
            failures.append(limit)
            raise StoreError("disk I/O error")
        return merge_next(conn, limit)  # type: ignore[arg-type]

    dedupe.merge_next = failing_once  # type: ignore[method-assign]
    first = [f"a{i}" for i in range(500)]
    await store.enqueue("web", [event(m) for m in first])  # starts a merge, which fails
    await _merged(store)
    assert failures and dedupe._merging == set() and len(dedupe._recent) == 500
    assert (await store.enqueue("web", [event(m) for m in first])).stored == 0
    assert _on_disk(path) == 0  # nothing went to a generation

    second = [f"b{i}" for i in range(500)]
    await store.enqueue("web", [event(m) for m in second])  # the next merge moves both
    await _merged(store)
    assert _on_disk(path) == 1000 and _held(dedupe) == []
    await store.close()
    reopened = await _opened(path)
    assert (await reopened.enqueue("web", [event(m) for m in first + second])).stored == 0
    await reopened.close()


def _on_disk(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return len(stored_dedupe_keys(conn))
    finally:
        conn.close()
