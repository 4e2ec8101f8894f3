"""Small builders shared by the store tests."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import orjson

from bridge.store.base import DeadLetter, IdentityLink, IncomingEvent, RecordFilter, Store
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite_dedupe import DedupeKeys


def event(
    message_id: str,
    user: str = "",
    destinations: tuple[str, ...] = ("moe",),
    links: tuple[IdentityLink, ...] = (),
    size: int = 0,
) -> IncomingEvent:
    body: dict[str, object] = {"messageId": message_id, "userId": user}
    if size:
        body["pad"] = "x" * size
    return IncomingEvent(message_id, user, orjson.dumps(body), destinations, links)


async def check_outputs_survive(store: Store) -> None:
    """Jobs "o1" and "o2", queued for "moe" in a store just upgraded: the delivered outputs
    one is given survive its retry, its dead letter and the replay; the other has none."""
    o1, o2 = await store.lease("moe", 10, 30)
    assert (o1.delivered_outputs, o2.delivered_outputs) == (b"", b"")
    fence = {o1.id: o1.attempts, o2.id: o2.attempts}
    await store.retry([o1.id, o2.id], store.now() - 1, "http_500", fence=fence, delivered={o1.id: b"D" * 8})
    o1, o2 = await store.lease("moe", 10, 30)
    assert (o1.delivered_outputs, o2.delivered_outputs) == (b"D" * 8, b"")
    await store.dead_letter([DeadLetter(o1.id, "http_400")], fence={o1.id: o1.attempts})
    assert await store.replay_dead(RecordFilter(reason="http_400")) == 1
    await store.release([o2.id], fence={o2.id: o2.attempts})
    assert {j.message_id: j.delivered_outputs for j in await store.lease("moe", 10, 30)} == {"o1": b"D" * 8, "o2": b""}


def stored_dedupe_keys(conn: sqlite3.Connection) -> list[bytes]:
    """Every dedupe key of a SQLite store's generations (schema version 5), oldest first."""
    tables = [name for (name,) in conn.execute("SELECT name FROM dedupe_generations ORDER BY id")]
    return [k for table in tables for (k,) in conn.execute(f"SELECT k FROM {table}")]


def newest_generation(conn: sqlite3.Connection) -> str:
    """The table of a SQLite store's newest dedupe generation."""
    return str(conn.execute("SELECT name FROM dedupe_generations ORDER BY id DESC LIMIT 1").fetchone()[0])


async def mid_merge(path: Path, message_ids: list[str]) -> tuple[SqliteStore, DedupeKeys, int]:
    """A SQLite server store that stored ``message_ids`` and is mid-way through merging
    their keys (planned and filed, none inserted yet): (the store, its keys, the merge's
    last dedupe_recent row)."""
    server = SqliteStore(str(path), min_free_disk_bytes=0, dedupe_merge_at=10**9)
    await server.open()
    dedupe = server._open_dedupe()
    await server.enqueue("web", [event(m) for m in message_ids])
    _, last = await server._run(dedupe.plan)
    await server._run(partial(dedupe.file_next, limit=1000))
    return server, dedupe, last
