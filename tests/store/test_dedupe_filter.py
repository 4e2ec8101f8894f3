"""The Bloom filter in front of the SQLite store's dedupe lookup (bridge/store/key_filter.py)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest

from bridge.store import sqlite_dedupe
from bridge.store.base import StoreError
from bridge.store.key_filter import KeyFilter
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import FilterBuild, dedupe_keys_of
from tests.store.helpers import event, stored_dedupe_keys


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


def test_check_and_add_answers_as_before_the_call_and_then_holds_every_key() -> None:
    key_filter = KeyFilter(bits_log2=20)
    old = [os.urandom(16) for _ in range(500)]
    key_filter.add(old)
    new = [os.urandom(16) for _ in range(500)]
    # Keys of one call that share a byte (and, the last two, a bit): none was there before.
    same_byte = [bytes([8, 0, 0, 0]) + bytes(12), bytes([9, 0, 0, 0]) + bytes(12), bytes([9, 0, 0, 0]) + bytes(12)]
    asked = old[:100] + same_byte + new
    maybe = key_filter.check_and_add(asked)
    assert maybe[:100] == old[:100]  # every key added before is reported, in order
    assert not set(same_byte) & set(maybe)  # the call's own keys never count for each other
    assert len(maybe) < 110  # 500 keys in 2^20 bits: a few fresh keys at most
    assert key_filter.might_hold(asked) == asked  # and now it holds them all
    assert key_filter.count == 500  # the caller counts what it records
    assert key_filter.check_and_add([]) == []


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_a_new_filter_takes_its_memory_as_keys_arrive_not_all_at_once() -> None:
    # A bytearray of the default 16 MiB wrote every byte up front, holding the GIL, and
    # was resident at once; the filter's pages now come as keys first touch them.
    before = _resident_bytes()
    key_filter = KeyFilter()
    assert _resident_bytes() - before < 2 << 20
    keys = [os.urandom(16) for _ in range(1000)]
    assert key_filter.check_and_add(keys) == []
    assert key_filter.might_hold(keys) == keys
    assert _resident_bytes() - before < 8 << 20  # 1000 keys touch at most 1000 pages


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
    lookups = [sql for sql in probed if "WHERE k IN (SELECT substr(" in sql]
    # The trace shows the keys asked, end to end, as one blob literal a statement (twice:
    # the statement reads its parameter twice).
    asked = sum(len(re.findall(r"x'([0-9a-fA-F]*)'", sql)[0]) // 32 for sql in lookups)
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


async def build_by_hand(store: SqliteStore, between_steps: Callable[[int], Awaitable[None]] | None = None) -> None:
    """What the store's build task does, step by step, calling ``between_steps(n)`` after step n."""
    dedupe = store._open_dedupe()
    build = await store._run(dedupe.begin_filter, writes=False)
    step = 0
    while not await store._run(partial(dedupe.fill_filter, build=build), writes=False):
        step += 1
        if between_steps is not None:
            await between_steps(step)


async def test_keys_waiting_in_memory_when_a_build_begins_are_copied_into_it(tmp_path: Path) -> None:
    """A key in memory when a build begins is merged into dedupe_keys after the walk has
    passed its place (here: after the whole build): the build copies memory's keys, or
    the new filter would miss it."""
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event("seed")])
    first = await filter_built(store)
    waiting = [f"waiting-{i}" for i in range(40)]
    await store.enqueue("web", [event(m) for m in waiting])

    await build_by_hand(store)
    assert dedupe.filter is not first
    await store._run(dedupe.merge)  # moves the waiting keys to dedupe_keys, out of memory
    assert dedupe._recent == set()
    assert (await store.enqueue("web", [event(m) for m in waiting])).stored == 0
    await store.close()


async def test_keys_that_arrive_and_merge_between_build_steps_are_in_the_new_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a build walks dedupe_keys step by step, new keys arrive (``add`` puts them in
    the filter being built) and merges move keys behind the walk: all of them are in the
    new filter once it is in use."""
    monkeypatch.setattr(sqlite_dedupe, "FILTER_STEP", 32)
    store = await opened(tmp_path / "b.db", dedupe_merge_at=10**9)
    dedupe = store._open_dedupe()
    stored = [f"stored-{i}" for i in range(300)]
    await store.enqueue("web", [event(m) for m in stored])
    await store.prune(0, 0)
    await filter_built(store)
    waiting = [f"waiting-{i}" for i in range(40)]
    await store.enqueue("web", [event(m) for m in waiting])
    arrived: list[str] = []

    async def meanwhile(step: int) -> None:
        batch = [f"step{step}-{i}" for i in range(10)]
        await store.enqueue("web", [event(m) for m in batch])
        arrived.extend(batch)
        if step in (2, 6):
            await store._run(dedupe.merge)  # whatever is in memory now goes behind the walk

    await build_by_hand(store, meanwhile)
    assert len(arrived) >= 8 * 10  # a copy step, then a walk of 300 keys 32 at a time
    await store._run(dedupe.merge)
    everything = stored + waiting + arrived
    assert dedupe.filter is not None
    assert dedupe.filter.might_hold(dedupe_keys_of("web", everything)) == dedupe_keys_of("web", everything)
    assert (await store.enqueue("web", [event(m) for m in everything])).stored == 0
    await store.close()


async def test_a_filter_goes_into_use_only_when_its_last_step_commits(tmp_path: Path) -> None:
    """The last step shares a writer transaction with a prune, and the transaction is
    rolled back (as an I/O error would): the prune's keys are back on disk, and the walk,
    which ran after the prune, never saw them. The new filter must not go into use."""
    path = tmp_path / "b.db"
    setup = await opened(path)
    old = [f"old-{i}" for i in range(200)]
    await setup.enqueue("web", [event(m) for m in old])
    await setup.prune(0, 0)  # into a generation's table
    await setup.close()

    store = await opened(path, commit_interval=0.2)  # the three operations below share a commit
    dedupe = store._open_dedupe()
    build = await store._run(dedupe.begin_filter, writes=False)

    def abort(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does to the transaction on an I/O error

    outcomes = await asyncio.gather(
        store._run(partial(dedupe.prune, before=time.time() + 60)),
        store._run(partial(dedupe.fill_filter, build=build), writes=False),
        store._run(abort),
        return_exceptions=True,
    )
    assert all(isinstance(o, StoreError) for o in outcomes)
    assert dedupe.filter is None and dedupe.wants_filter
    conn = sqlite3.connect(path)
    assert len(stored_dedupe_keys(conn)) == 200
    conn.close()
    assert (await store.enqueue("web", [event(m) for m in old])).stored == 0
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


async def test_replayed_duplicates_do_not_put_off_the_rebuild(tmp_path: Path) -> None:
    """The filter counts the keys recorded, not every key looked up: clients that keep
    resending old messages must not keep a filter full of pruned keys in use."""
    store = await opened(tmp_path / "b.db")
    dedupe = store._open_dedupe()
    await store.enqueue("web", [event(f"old-{i}") for i in range(200)])
    built = await filter_built(store)
    for _ in range(5):
        assert (await store.enqueue("web", [event(f"old-{i}") for i in range(200)])).stored == 0
    assert built.count == 200
    await store.prune(dedupe_before=2**40, settled_before=0)
    assert dedupe.wants_filter
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
    assert len(stored_dedupe_keys(conn)) == 1
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

    def failing_fill(conn: sqlite3.Connection, build: FilterBuild) -> bool:
        raise StoreError("sqlite: disk I/O error")

    async def enqueue_and_settle(ids: list[str]) -> tuple[int, ...]:
        result = await store.enqueue("web", [event(m) for m in ids])
        if store._filter_task is not None:
            await store._filter_task  # a failure is logged, not raised: only speed is lost
        return result.duplicate_indexes

    monkeypatch.setattr(dedupe, "fill_filter", failing_fill)
    assert await enqueue_and_settle(["m1"]) == ()
    assert dedupe.filter is None and dedupe.wants_filter
    assert await enqueue_and_settle(["m1", "m2"]) == (0,)  # SQLite and memory still answer
    monkeypatch.setattr(dedupe, "fill_filter", real_fill)
    assert await enqueue_and_settle(["m3"]) == ()
    first = dedupe.filter
    assert first is not None

    # A rebuild (half the keys pruned) that fails keeps the filter in use, and is retried.
    await store.prune(dedupe_before=2**40, settled_before=0)
    assert dedupe.wants_filter
    monkeypatch.setattr(dedupe, "fill_filter", failing_fill)
    assert await enqueue_and_settle(["m4"]) == ()
    assert dedupe.filter is first and dedupe.wants_filter
    monkeypatch.setattr(dedupe, "fill_filter", real_fill)
    assert await enqueue_and_settle(["m4", "m5"]) == (0,)
    assert dedupe.filter is not first and not dedupe.wants_filter
    await store.close()


async def test_closing_right_after_the_first_enqueue_lets_a_reopened_store_build(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db")
    await store.enqueue("web", [event("a")])
    await store.close()  # the build task has not started yet: cancelled before it runs
    await store.open()
    await store.enqueue("web", [event("b")])
    built = await filter_built(store)
    assert built.might_hold(dedupe_keys_of("web", ["a", "b"])) == dedupe_keys_of("web", ["a", "b"])
    await store.close()


def test_a_bad_filter_size_is_refused_when_the_store_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2\\^4 to 2\\^32"):
        SqliteStore(str(tmp_path / "b.db"), dedupe_filter_bits_log2=40)


def test_probes_and_answers_match_the_filter_worked_out_a_key_at_a_time() -> None:
    """The filter's whole-call shortcuts (every key's bit in one translate, every answer in
    one AND of two integers) give what the probe word says key by key: its top bits the
    byte, its low 3 bits the bit. Both ways of answering are asked: calls where no key was
    there, and calls where some were."""
    bits_log2 = 12
    shift = 32 - (bits_log2 - 3)
    key_filter = KeyFilter(bits_log2=bits_log2)
    # Random keys, and four whose probes share a byte (two of them a bit).
    keys = [os.urandom(16) for _ in range(300)] + [bytes([b, 1, 2, 3]) + bytes(12) for b in (0, 7, 8, 255)]
    words = [int.from_bytes(k[:4], sys.byteorder) for k in keys]
    offsets, bits = key_filter._probes(keys)
    assert offsets == [w >> shift for w in words]
    assert list(bits) == [1 << (w & 7) for w in words]

    def bit_of(key: bytes) -> int:
        word = int.from_bytes(key[:4], sys.byteorder)
        return (word >> shift) << 3 | word & 7

    held: set[int] = set()
    answers = []
    for start in range(0, len(keys), 50):
        asked = keys[start : start + 50]
        answers.append(key_filter.check_and_add(asked))
        assert answers[-1] == [k for k in asked if bit_of(k) in held]
        held |= {bit_of(k) for k in asked}
    assert answers[0] == [] and any(answers)  # 300 keys in 2^12 bits: later calls meet earlier bits
    assert key_filter.might_hold(keys) == keys
    fresh = [os.urandom(16) for _ in range(200)]
    assert key_filter.might_hold(fresh) == [k for k in fresh if bit_of(k) in held]
