"""One event whose content fails the upstream with a 5xx every time (a poison event), in a
request with good ones. Retried whole, its request-mates waited out the 4-hour retry budget
with it, and in ordered delivery so did their users' later events. Once the upstream is
seen to take other requests, such a request is bisected and the mates are delivered."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from bridge.delivery import worker
from bridge.testing.moengage_standin import MoEngageStandIn, Rejected
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WORKSPACE, WRITE_KEY, Bridge, basic, wait_until
from tests.e2e.test_delivery import dlq, seqs

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)
POISON = "poison-4f1c"


def batch(prefix: str, n: int, poison_at: int | None = None) -> dict[str, Any]:
    """``n`` tracks of as many users (so none waits for another's in ordered delivery)."""
    events = []
    for i in range(n):
        props: dict[str, Any] = {"seq": f"{prefix}-{i}"}
        if i == poison_at:
            props["note"] = POISON
        events.append(
            {
                "type": "track",
                "userId": f"{prefix}-user-{i}",
                "event": "Step",
                "messageId": f"{prefix}-{i}",
                "properties": props,
            }
        )
    return {"batch": events}


async def queued(bridge: Bridge) -> int:
    _, status = await bridge.get("/admin/status", ADMIN)
    return int(status["destinations"][0]["queue_depth"])


def fast_retries(
    ordered: bool, batch_size: int | None = None, max_age: float | None = None
) -> Callable[[dict[str, Any]], None]:
    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["delivery"]["ordered"] = ordered
        if batch_size is not None:
            # Leased oldest first: the 8 refused jobs alone, later traffic in batches of its own.
            moengage["delivery"].update(batch_size=batch_size, concurrency=1)
        moengage["retry"] = {"base_delay": 0.05, "max_delay": 0.2}
        if max_age is not None:
            moengage["retry"]["max_age"] = max_age

    return tweak


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_poison_events_request_mates_are_delivered_once_the_upstream_takes_others(
    make_bridge: Callable[..., Any], ordered: bool
) -> None:
    bridge = await make_bridge(fast_retries(ordered))
    moengage = bridge.moengage
    moengage.fail_containing(POISON.encode(), 500)
    assert (await bridge.post("/v1/batch", batch("p", 16, poison_at=5), H))[0] == 200
    await moengage.wait_for(lambda: any(s.status == 500 for s in moengage.seen))
    # Other traffic, which the upstream takes: it is up, and something in that request is not.
    assert (await bridge.post("/v1/batch", batch("other", 2), H))[0] == 200

    await moengage.wait_for(lambda: len(seqs(moengage)) == 17, timeout=10)
    assert seqs(moengage) == {f"p-{i}" for i in range(16) if i != 5} | {"other-0", "other-1"}
    # The poison event stays queued, retried alone until its budget is spent (4 h): not
    # dead-lettered with the rest, and not sent one event a request with every mate.
    await wait_until(lambda: _left(bridge, 1), what="the poison event alone in the queue")
    assert await dlq(bridge) == []
    # Bisected: the 15 mates went in a few requests, halves of halves (8, 4, 2, 1).
    carrying = [r for r in moengage.requests if b'"p-' in orjson.dumps(r.body)]
    assert len(carrying) <= 8, len(carrying)


async def test_a_refusal_that_asks_for_a_wait_is_not_bisected(
    make_bridge: Callable[..., Any], monkeypatch: Any
) -> None:
    """A 503 with Retry-After is the upstream asking for time, never a poison event's answer:
    the request waits as asked, whole, even once the upstream has taken others since."""
    monkeypatch.setattr(worker, "RETRY_SPLITS", 0)  # refused and retried whole until the switch below
    bridge = await make_bridge(fast_retries(True, batch_size=8))
    moengage = bridge.moengage
    moengage.fail_containing(POISON.encode(), 500)
    assert (await bridge.post("/v1/batch", batch("w", 8, poison_at=2), H))[0] == 200
    await moengage.wait_for(lambda: any(s.status == 500 for s in moengage.seen))
    assert (await bridge.post("/v1/batch", batch("other", 2), H))[0] == 200
    await moengage.wait_for(lambda: {"other-0", "other-1"} <= seqs(moengage))
    # Refused before the upstream took others: a 500 now would be bisected.
    moengage.fail_containing(POISON.encode(), 503, retry_after=1)
    monkeypatch.setattr(worker, "RETRY_SPLITS", 24)
    with capture_logs() as logs:
        await moengage.wait_for(lambda: sum(s.status == 503 for s in moengage.seen) >= 2, timeout=10)
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert failed and {(e["items"], e["action"]) for e in failed} == {(8, "retry")}, failed


async def test_a_batch_bisects_no_more_than_its_budget(make_bridge: Callable[..., Any], monkeypatch: Any) -> None:
    """RETRY_SPLITS bounds the requests one batch attempt sends without a backoff (an upstream
    failing at random while it takes others would otherwise be sent up to a request an event).
    With no budget at all, the poison's request is retried whole, as before bisecting."""
    monkeypatch.setattr(worker, "RETRY_SPLITS", 0)
    bridge = await make_bridge(fast_retries(True, batch_size=8))
    moengage = bridge.moengage
    moengage.fail_containing(POISON.encode(), 500)
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", batch("b", 8, poison_at=2), H))[0] == 200
        await moengage.wait_for(lambda: any(s.status == 500 for s in moengage.seen))
        assert (await bridge.post("/v1/batch", batch("other", 2), H))[0] == 200
        # Both waited for: the others are leased once the hold ends before the refused jobs
        # are due again, which the retries' jitter decides (on a loaded host, after the 4th).
        await moengage.wait_for(
            lambda: {"other-0", "other-1"} <= seqs(moengage) and sum(s.status == 500 for s in moengage.seen) >= 4,
            timeout=10,
        )
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert {(e["items"], e["action"]) for e in failed} == {(8, "retry")}, failed


async def test_an_upstream_that_is_down_is_not_bisected(make_bridge: Callable[..., Any]) -> None:
    """Every request refused, nothing taken since: an outage, not a poison event. Bisecting
    would only multiply the requests sent to an upstream that is down: its request is probed
    (two halves, refused too) an attempt at most, never cut smaller."""
    bridge = await make_bridge(fast_retries(True))
    moengage = bridge.moengage
    assert (await bridge.post("/v1/batch", batch("before", 1), H))[0] == 200
    await moengage.wait_for(lambda: len(seqs(moengage)) == 1)
    moengage.refuse_all(503)
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", batch("down", 8), H))[0] == 200
        await moengage.wait_for(lambda: sum(s.status == 503 for s in moengage.seen) >= 5, timeout=10)
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert len(failed) >= 5
    assert {(e["items"], e["action"]) for e in failed} <= {(8, "retry"), (8, "probe"), (4, "retry")}, failed
    moengage.refuse_all(None)
    await moengage.wait_for(lambda: len(seqs(moengage)) == 9, timeout=10)
    await wait_until(lambda: _left(bridge, 0), what="the queue to empty")


async def _left(bridge: Bridge, n: int) -> bool:
    return await queued(bridge) == n


@pytest.mark.parametrize("ordered", [True, False])
async def test_an_endpoint_that_is_down_is_not_bisected_while_another_takes_requests(
    make_bridge: Callable[..., Any], ordered: bool
) -> None:
    """MoEngage's Merge User endpoint down while Bulk Import takes the tracks: the merge
    requests' refusals are an outage of their endpoint, not something in them. Taken for a
    poison event because the upstream accepted other requests (on another endpoint), each
    retry of the merges was bisected at once, without backoff: more requests to an endpoint
    that is down, down to a request a merge with several loops. (Probed, its two halves
    refused too, an attempt at most: never cut smaller.)"""
    bridge = await make_bridge(fast_retries(ordered))
    moengage = bridge.moengage
    moengage.fail_containing(b"merged_user", 503)
    aliases = [
        {"type": "alias", "previousId": f"old-{i}", "userId": f"new-{i}", "messageId": f"alias-{i}"} for i in range(8)
    ]
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", {"batch": aliases}, H))[0] == 200
        await moengage.wait_for(lambda: any(s.status == 503 for s in moengage.seen))
        # Tracks, which Bulk Import takes, between the merges' retries.
        for i in range(12):
            assert (await bridge.post("/v1/batch", batch(f"t{i}", 1), H))[0] == 200
            await moengage.wait_for(lambda i=i: f"t{i}-0" in seqs(moengage), timeout=10)
            await asyncio.sleep(0.1)
        assert sum(s.status == 503 for s in moengage.seen) >= 3
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert {(e["items"], e["action"]) for e in failed} <= {(8, "retry"), (8, "probe"), (4, "retry")}, failed
    moengage.fail_containing(None)
    await moengage.wait_for(lambda: len(moengage.merges()) == 8, timeout=10)


def _carrying(bridge: Bridge, prefix: str) -> list[int]:
    """The sizes of the accepted requests that carried events of batch ``prefix``."""
    marker = f'"{prefix}-'.encode()
    return [len(r.body.get("elements") or []) for r in bridge.moengage.requests if marker in orjson.dumps(r.body)]


@pytest.mark.parametrize("ordered", [True, False])
async def test_on_a_quiet_destination_a_poison_events_request_mates_are_delivered_before_its_budget(
    make_bridge: Callable[..., Any], ordered: bool
) -> None:
    """The poison's request is the only traffic: no other request ever shows the upstream
    up, so without a probe the 15 mates were retried whole with it until the budget ran out
    (4 h by default), then sent one a request. Probed after two refusals, they are found
    and delivered in halves of halves, long before it; the poison alone runs out of retries
    and is dead-lettered as before."""
    bridge = await make_bridge(fast_retries(ordered, max_age=10.0))
    moengage = bridge.moengage
    moengage.fail_containing(POISON.encode(), 500)
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", batch("q", 16, poison_at=5), H))[0] == 200
        await moengage.wait_for(lambda: len(seqs(moengage)) == 15, timeout=20)
    assert seqs(moengage) == {f"q-{i}" for i in range(16) if i != 5}
    # Delivered within the budget: in requests of several (a mate past it goes alone).
    sizes = _carrying(bridge, "q")
    assert len(sizes) <= 8 and max(sizes) > 1, sizes
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert [(e["items"], e["action"]) for e in failed][:3] == [(16, "retry"), (16, "retry"), (16, "probe")], failed
    await wait_until(lambda: _left(bridge, 0), timeout=40, what="the poison out of retries")
    (dead,) = await dlq(bridge)
    assert (dead["message_id"], dead["reason"], dead["status"]) == ("q-5", "retries_exhausted", 500)


class DownMoEngage(MoEngageStandIn):
    """Refuses every Bulk Import with a 503 (an outage), counting the requests each event was in."""

    def __init__(self, workspace: str, api_key: str) -> None:
        super().__init__(workspace, api_key)
        self.sizes: list[int] = []
        self.carried: Counter[str] = Counter()

    def _accept_transition(self, body: dict[str, Any]) -> str:
        elements = body.get("elements") or []
        self.sizes.append(len(elements))
        self.carried.update(e["actions"][0]["attributes"]["seq"] for e in elements)
        raise Rejected(503, "Service Unavailable", "ServiceUnavailable")


@pytest.mark.parametrize("ordered", [True, False])
async def test_an_outage_costs_a_probe_a_retry_cycle_never_a_request_an_event(
    make_bridge: Callable[..., Any], tmp_path: Path, ordered: bool
) -> None:
    """Every request refused (503), so both halves of a probe are: an outage. Backed off as
    before, and the halves are not probed again before their next attempt: each attempt of
    an event puts it in two requests at most (its batch's, and the probe's half), where
    probing every refused half sent a request an event, every cycle."""
    down = DownMoEngage(WORKSPACE, API_KEY)
    server = TestServer(down.app(), host="127.0.0.1")
    await server.start_server()
    try:
        bridge = await make_bridge(fast_retries(ordered), start=False)
        bridge.destination("moengage-main")["base_url"] = str(server.make_url("")).rstrip("/")
        await bridge.start()
        with capture_logs() as logs:
            assert (await bridge.post("/v1/batch", batch("down", 16), H))[0] == 200
            await down.wait_for(lambda: len(down.sizes) >= 30, timeout=30)
            await bridge.stop()  # every attempt settled, counted or given back
    finally:
        down.stop()
        await server.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        attempts = dict(conn.execute("SELECT message_id, attempts FROM jobs"))
    assert len(attempts) == 16
    # A request an event, every cycle, would put each in 5 (16, 8, 4, 2, 1) an attempt.
    # (+1: a half given back unsent is leased again with its attempt uncounted.)
    over = {seq: (n, attempts[seq]) for seq, n in down.carried.items() if n > 2 * attempts[seq] + 1}

    assert not over, (over, down.sizes)
    failed = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert {e["action"] for e in failed} == {"retry", "probe"}, failed
    # Both halves sent (in ordered delivery too: no user has events in both), backed off
    # together: the batch stays whole, with a probe of two halves an attempt at most.
    assert set(down.sizes) == {16, 8} and down.sizes.count(8) <= 2 * down.sizes.count(16), down.sizes


async def test_a_probe_in_ordered_delivery_never_sends_a_users_later_event_first(
    make_bridge: Callable[..., Any],
) -> None:
    """Eight users with two events each, the first eight before the second eight, one of
    the first a poison, on a quiet destination. The probe's first half refused holds back
    every event of the second that is its users' later one: each user's events reach the
    upstream in their order, and the poison's user's later event waits for it (dead-lettered
    once its budget is spent) while the rest are delivered long before."""
    bridge = await make_bridge(fast_retries(True, max_age=10.0))
    moengage = bridge.moengage
    moengage.fail_containing(POISON.encode(), 500)
    events = batch("o", 16, poison_at=2)
    for i, event in enumerate(events["batch"]):
        event["userId"] = f"o-user-{i % 8}"
    assert (await bridge.post("/v1/batch", events, H))[0] == 200
    await moengage.wait_for(lambda: len(seqs(moengage)) == 14, timeout=20)
    assert seqs(moengage) == {f"o-{i}" for i in range(16) if i not in (2, 10)}
    # Left queued: the poison, and its user's later event behind it (the rest acked).
    await wait_until(lambda: _left(bridge, 2), what="the 14 others acked")
    assert "o-10" not in seqs(moengage)
    sizes = _carrying(bridge, "o")
    assert len(sizes) <= 10 and max(sizes) > 1, sizes  # found within the budget
    await wait_until(lambda: _left(bridge, 0), timeout=40, what="the poison out of retries")
    (dead,) = await dlq(bridge)
    assert (dead["message_id"], dead["reason"]) == ("o-2", "retries_exhausted")
    order = [e["actions"][0]["attributes"]["seq"] for e in moengage.events()]
    assert len(order) == 15
    for user in range(8):
        if user != 2:
            assert order.index(f"o-{user}") < order.index(f"o-{user + 8}"), order
