"""Nodes sharing one PostgreSQL database keep time by the database's clock, not their own.

Each node below runs with a wall clock set off from the real one, as a host whose NTP
failed would be. Leases, retries and row dates must come out as if it were right."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from bridge.store.postgres import PostgresStore
from tests.store.conftest import PG_DSN, pg_problem
from tests.store.helpers import event

pytestmark = pytest.mark.skipif(pg_problem() is not None, reason=str(pg_problem()))

SKEW = 300.0  # seconds: far past any lease, so an uncorrected clock fails every check here


class Clock:
    """A node's wall clock, ``skew`` seconds off the real one; a test may move it."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def __call__(self) -> float:
        return time.time() + self.skew


@pytest.fixture
async def open_node(pg_schema: str) -> AsyncIterator[Callable[[float], object]]:
    opened: list[PostgresStore] = []

    async def make(skew: float) -> PostgresStore:
        store = PostgresStore(PG_DSN, schema=pg_schema, pool_size=3, wall_clock=Clock(skew))
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_now_is_the_databases_clock_whatever_the_nodes(open_node) -> None:
    for skew in (SKEW, -SKEW, 0.0):
        node = await open_node(skew)
        assert abs(node.now() - time.time()) < 0.5, (skew, node.now() - time.time())


async def test_a_node_whose_clock_runs_ahead_leaves_a_live_lease_alone(open_node) -> None:
    right, ahead = await open_node(0.0), await open_node(SKEW)
    await right.enqueue("web", [event(f"ahead-{i}", f"u{i}") for i in range(4)])
    leased = await right.lease("moe", 10, 30)
    assert len(leased) == 4
    # Uncorrected, the node ahead reads every 30 s lease as expired 270 s ago.
    assert await ahead.lease("moe", 10, 30) == []
    assert await ahead.lease("moe", 10, 30, ordered=False) == []


async def test_a_node_whose_clock_runs_behind_writes_leases_and_retries_that_last(open_node) -> None:
    behind, right = await open_node(-SKEW), await open_node(0.0)
    await behind.enqueue("web", [event("behind-1", "u1"), event("behind-2", "u2")])
    first, second = await behind.lease("moe", 10, 30)
    # Its lease, dated by an uncorrected clock, would have expired 270 s before it was taken.
    assert await right.lease("moe", 10, 30, ordered=False) == []
    await behind.retry([first.id], behind.now() + 60, "503 from upstream")
    await behind.ack([second.id])
    assert await right.lease("moe", 10, 30, ordered=False) == [], "the retry was due at once"
    await right.make_due("moe")
    again = await right.lease("moe", 10, 30, ordered=False)
    assert [j.message_id for j in again] == ["behind-1"]
    # The first attempt and the rows' dates are the database's time too.
    assert abs(again[0].first_attempt_at - time.time()) < 5 and abs(again[0].created_at - time.time()) < 5


async def test_a_clock_that_jumps_after_open_is_measured_again(open_node, monkeypatch) -> None:
    monkeypatch.setattr("bridge.store.postgres.CLOCK_CHECK_SECONDS", 0.0)
    right, jumpy = await open_node(0.0), await open_node(0.0)
    await right.enqueue("web", [event("jump-1", "u1")])
    assert len(await right.lease("moe", 10, 30)) == 1
    clock = jumpy._wall_clock
    assert isinstance(clock, Clock)
    clock.skew = SKEW  # stepped forward after open, as a late NTP correction would
    with capture_logs() as logs:
        assert await jumpy.lease("moe", 10, 30) == []
    assert abs(jumpy.now() - time.time()) < 0.5
    warned = [e for e in logs if e["event"] == "clock_offset_from_database"]
    assert warned and abs(warned[0]["offset_seconds"] + SKEW) < 1, logs


async def test_an_idle_node_measures_its_clock_again_without_leasing(open_node, monkeypatch) -> None:
    """All its destinations paused, a node takes no leases, but its ingest still dates rows."""
    monkeypatch.setattr("bridge.store.postgres.CLOCK_CHECK_SECONDS", 0.5)
    node = await open_node(0.0)
    clock = node._wall_clock
    assert isinstance(clock, Clock)
    clock.skew = SKEW
    deadline = time.monotonic() + 5
    while abs(node.now() - time.time()) > 0.5:
        assert time.monotonic() < deadline, "the offset was not measured again"
        await asyncio.sleep(0.1)
    await node.enqueue("web", [event("idle-1", "u1")])
    assert abs((await node.queue_stats())["moe"].oldest_created_at - time.time()) < 5


async def test_a_clock_stepped_forward_between_measurements_leaves_a_live_lease_alone(open_node) -> None:
    """A node measures its clock against the database's every CLOCK_CHECK_SECONDS (60). Its
    clock stepped between two measurements (NTP correcting a resumed VM, an operator's
    date -s) moved its leases' time with it: a minute of reading the other nodes' leases
    as long expired, and taking their jobs while they were still being sent."""
    right, jumpy = await open_node(0.0), await open_node(0.0)
    await right.enqueue("web", [event(f"fwd-{i}", f"u{i}") for i in range(4)])
    assert len(await right.lease("moe", 10, 30)) == 4
    clock = jumpy._wall_clock
    assert isinstance(clock, Clock)
    clock.skew = SKEW
    assert await jumpy.lease("moe", 10, 30) == []
    assert await jumpy.lease("moe", 10, 30, ordered=False) == []


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_clock_stepped_back_between_measurements_writes_leases_that_last(open_node, ordered: bool) -> None:
    jumpy, right = await open_node(0.0), await open_node(0.0)
    await jumpy.enqueue("web", [event("back-1", "u1")])
    clock = jumpy._wall_clock
    assert isinstance(clock, Clock)
    clock.skew = -SKEW
    assert len(await jumpy.lease("moe", 10, 30, ordered=ordered)) == 1
    # Dated by the stepped clock, its 30 s lease had expired 270 s before it was taken.
    assert await right.lease("moe", 10, 30) == []
    assert await right.lease("moe", 10, 30, ordered=False) == []
