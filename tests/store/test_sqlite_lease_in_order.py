"""The SQLite store's ordered lease takes the first jobs in id order without walking their
ordering keys when no job before them may be waiting (sqlite_ops._due_ids_in_order). It
must choose exactly what the walk (ordering.OrderedSelection) would, in every state the
queue can be in: retried jobs, lapsed leases, jobs in flight, aliases' two-user keys, a
clock that went back."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.store import sqlite_ops
from bridge.store.ordering import KEY_SEPARATOR
from bridge.store.sqlite_leases import Leases
from bridge.store.sqlite_schema import configure, create_schema

DEST = "moe"
USERS = ("u1", "u2", "u3", "u4", "")


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    configure(c)
    create_schema(c)
    yield c
    c.close()


def _enqueue(conn: sqlite3.Connection, key: str, at: float, destination: str = DEST) -> None:
    conn.execute(
        "INSERT INTO jobs (destination, source, message_id, ordering_key, payload, state, available_at, created_at)"
        " VALUES (?, 'web', 'm', ?, X'7B7D', 0, ?, ?)",
        (destination, key, at, at),
    )


def _walked(conn: sqlite3.Connection, limit: int, now: float, ahead: frozenset[int], leases: Leases) -> list[int]:
    return sqlite_ops._due_ids_ordered(conn, DEST, limit, now, ahead, leases)


def _traced(conn: sqlite3.Connection) -> list[str]:
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    return statements


def test_with_nothing_waiting_the_lease_reads_no_ordering_key(conn: sqlite3.Connection) -> None:
    leases = Leases(lambda undo: None)
    for i in range(10):
        _enqueue(conn, USERS[i % 4], 100.0)
    statements = _traced(conn)
    first = sqlite_ops.lease(conn, DEST, 4, 30.0, True, 200.0, leases)
    assert [j.id for j in first] == [1, 2, 3, 4]
    assert not [s for s in statements if "ordering_key NOT IN" in s or "SELECT id, ordering_key" in s]
    # The next lease, with the first in flight (``ahead``), also goes straight to job 5.
    statements.clear()
    second = sqlite_ops.lease(conn, DEST, 4, 30.0, True, 200.0, leases, ahead=frozenset(j.id for j in first))
    assert [j.id for j in second] == [5, 6, 7, 8]
    assert not [s for s in statements if "SELECT id, ordering_key" in s]
    # A job retried: its user's later jobs wait for it, which only the walk knows.
    sqlite_ops.retry(conn, [1], 500.0, "http 500", leases)
    sqlite_ops.ack(conn, [2, 3, 4], "v", 200.0, leases)
    statements.clear()
    third = sqlite_ops.lease(conn, DEST, 4, 30.0, True, 200.0, leases, ahead=frozenset(j.id for j in second))
    assert [j.id for j in third] == [10]  # 9 and 5 are u1's, behind job 1; 6-8 are in flight
    assert [s for s in statements if "SELECT id, ordering_key" in s]
    # The retried job is known to wait before any payload is read: payloads are read once.
    assert len([s for s in statements if "payload" in s and "WHERE id IN" in s]) == 1, statements


def test_a_job_whose_clock_went_back_is_left_to_the_walk(conn: sqlite3.Connection) -> None:
    leases = Leases(lambda undo: None)
    _enqueue(conn, "u1", 100.0)
    _enqueue(conn, "u1", 300.0)  # stored by a clock ahead of the lease's
    _enqueue(conn, "u2", 100.0)
    jobs = sqlite_ops.lease(conn, DEST, 3, 30.0, True, 200.0, leases)
    assert [j.id for j in jobs] == [1, 3]  # job 2 is not due, and nothing of u1 passes it


@pytest.mark.parametrize("seed", range(12))
def test_the_lease_chooses_what_the_walk_would_in_random_histories(conn: sqlite3.Connection, seed: int) -> None:
    rng = random.Random(seed)
    leases = Leases(lambda undo: None)
    now = 1000.0
    in_flight: list[list[int]] = []
    fast = 0
    for _ in range(300):
        now += rng.choice((0.0, 0.5, 5.0, 40.0))
        for _ in range(rng.randint(0, 4)):
            alias = rng.random() < 0.1  # an alias's job holds two users
            key = KEY_SEPARATOR.join(rng.sample(USERS[:4], 2)) if alias else rng.choice(USERS)
            _enqueue(conn, key, now + (rng.choice((0.0, 0.0, 0.0, 3.0)) if rng.random() < 0.1 else 0.0))
            if rng.random() < 0.05:
                _enqueue(conn, key, now, destination="other")
        # Settle a batch in flight: deliver, retry or give back some of its jobs.
        if in_flight and rng.random() < 0.8:
            batch = in_flight.pop(rng.randrange(len(in_flight)))
            for job_id in batch:
                roll = rng.random()
                if roll < 0.9:
                    sqlite_ops.ack(conn, [job_id], "v", now, leases)
                elif roll < 0.95:
                    sqlite_ops.retry(conn, [job_id], now + rng.choice((1.0, 20.0)), "e", leases)
                elif roll < 0.99:
                    sqlite_ops.release(conn, [job_id], leases)
                # else: left held, its lease lapses in 30 s
        ahead = frozenset(in_flight[-1]) if in_flight and rng.random() < 0.7 else frozenset()
        limit = rng.randint(1, 6)
        expected = _walked(conn, limit, now, ahead, leases)
        if sqlite_ops._due_ids_in_order(conn, DEST, limit, ahead, leases) is not None:
            fast += 1
        jobs = sqlite_ops.lease(conn, DEST, limit, 30.0, True, now, leases, ahead=ahead)
        assert [j.id for j in jobs] == expected
        if jobs:
            in_flight.append([j.id for j in jobs])
    assert 3 <= fast <= 297  # the histories reach both ways of choosing
