"""One event whose content fails the upstream with a 5xx every time (a poison event), in a
request with good ones. Retried whole, its request-mates waited out the 4-hour retry budget
with it, and in ordered delivery so did their users' later events. Once the upstream is
seen to take other requests, such a request is bisected and the mates are delivered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from bridge.delivery import worker
from tests.e2e.harness import ADMIN_TOKEN, WRITE_KEY, Bridge, basic, wait_until
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


def fast_retries(ordered: bool, batch_size: int | None = None) -> Callable[[dict[str, Any]], None]:
    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["delivery"]["ordered"] = ordered
        if batch_size is not None:
            # Leased oldest first: the 8 refused jobs alone, later traffic in batches of its own.
            moengage["delivery"].update(batch_size=batch_size, concurrency=1)
        moengage["retry"] = {"base_delay": 0.05, "max_delay": 0.2}

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
    """Every request refused, nothing taken since: an outage, not a poison event. Splitting
    would only multiply the requests sent to an upstream that is down."""
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
    assert {(e["items"], e["action"]) for e in failed} == {(8, "retry")}
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
    that is down, down to a request a merge with several loops."""
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
    assert {(e["items"], e["action"]) for e in failed} == {(8, "retry")}
    moengage.fail_containing(None)
    await moengage.wait_for(lambda: len(moengage.merges()) == 8, timeout=10)
