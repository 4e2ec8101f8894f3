"""A misbehaving upstream on loopback against a real worker: a blip of failures across many
requests in flight, a redirect, and the like. What test_delivery.py covers (5xx, 429 with
Retry-After, timeouts, resets, 413, bisection, the guard) is not repeated here."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from bridge.testing.standins import Planned
from tests.e2e.harness import ADMIN_TOKEN, WRITE_KEY, basic, wait_until
from tests.e2e.test_delivery import dlq, seqs, tracks
from tests.e2e.test_user_deletion import settled, unordered

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


async def _status_of(bridge: Any, name: str = "moengage-main") -> dict[str, Any]:
    _, status = await bridge.get("/admin/status", ADMIN)
    return next(d for d in status["destinations"] if d["name"] == name)


async def test_a_blip_that_fails_many_requests_in_flight_backs_off_once_not_once_each(make_bridge):
    """Unordered, one event a request (`api: single`): a batch's 20 requests are on the wire
    together, and a blip answers each 503. That is one failure of the upstream, so the
    destination waits a first backoff (at most base_delay), as the README's retry policy
    says. Counted once per request, the 20th doubled the backoff 19 times, up to max_delay:
    the destination stood still for minutes after a blip that lasted a few milliseconds."""

    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["api"] = "single"
        moengage["delivery"]["ordered"] = False
        moengage["retry"] = {"base_delay": 0.05, "max_delay": 300}

    bridge = await make_bridge(tweak)
    bridge.moengage.plan(*[Planned(503)] * 20)
    assert (await bridge.post("/v1/batch", tracks(20), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 20, timeout=15)
    assert [s.status for s in bridge.moengage.seen].count(503) == 20
    assert await dlq(bridge) == []


async def test_429s_to_many_requests_in_flight_halve_the_rate_once_not_once_each(make_bridge):
    """Unordered, one event a request: a batch's 20 requests are on the wire together and
    MoEngage answers each 429. That is one signal of the upstream, paced at one rate, so the
    refused bucket's rate is halved once (operations.md), as the backoff holds once. Each
    429 halved it again: the 20 took it straight to its floor (5%), and then recovered 10%
    a second, 30 seconds of crawling after one burst of 429s."""

    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["api"] = "single"
        moengage["delivery"]["ordered"] = False
        moengage["retry"] = {"base_delay": 0.05, "max_delay": 300}

    bridge = await make_bridge(tweak)
    bucket = bridge.runtime.delivery.workers["moengage-main"].limiter.buckets["events"]
    bridge.moengage.plan(*[Planned(429, headers={"Retry-After": "0"})] * 20)
    assert (await bridge.post("/v1/batch", tracks(20), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 20, timeout=15)
    assert [s.status for s in bridge.moengage.seen].count(429) == 20
    # Halved once; the recovery since (10% a second) may have given some of it back.
    assert bucket.base_rate / 2 <= bucket.rate < bucket.base_rate, bucket.rate
    assert await dlq(bridge) == []


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_pauses_the_destination_and_dead_letters_nothing(bridge, status):
    """A redirect is never followed (a POST would lose its body on a 301/302, and the
    credentials would go to another host), and it says the destination's URL is wrong or
    has moved, not that the events are bad. It used to dead-letter each batch as
    `http_3xx` until the guard had seen 20 of them; now it pauses at once, naming where
    the upstream pointed, and the events wait for the fix."""
    moved = {"Location": "https://api-02.moengage.com/v1/transition/WSPACE1"}
    bridge.moengage.plan(Planned(status, body="", headers=moved))  # the batch's one request
    assert (await bridge.post("/v1/batch", tracks(3, prefix="moved"), H))[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what=f"the pause for HTTP {status}")
    state = await _status_of(bridge)
    assert f"HTTP {status}" in state["pause_reason"], state
    assert "https://api-02.moengage.com/v1/transition/WSPACE1" in state["pause_reason"], state
    assert await dlq(bridge) == [] and state["queue_depth"] == 3, state

    # The operator fixes the URL (here: the upstream stops redirecting) and resumes.
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 3, timeout=10)
    assert await dlq(bridge) == []


async def test_an_unordered_destination_sends_a_merge_after_the_merged_users_earlier_events(make_bridge):
    """README: an alias is delivered after the earlier events of its previousId, with
    `delivery.ordered: false` too. The merge went out at once, on the other loop, while the
    merged user's event was still on the wire (and then failed once, so it arrived after
    the merge): MoEngage kept that event on a new profile of the merged-away user."""
    bridge = await make_bridge(unordered)
    moengage = bridge.moengage
    moengage.hold()  # the anonymous user's event stays in flight (leased by one loop)
    event = {"type": "track", "userId": "anon-42", "event": "Step", "messageId": "a42-t", "properties": {"seq": "t"}}
    alias = {"type": "alias", "previousId": "anon-42", "userId": "user-42", "messageId": "a42-alias"}
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", {"batch": [event]}, H))[0] == 200
        await moengage.wait_for(lambda: moengage.received == 1)
        assert (await bridge.post("/v1/alias", alias, H))[0] == 200
        # The other loop takes the alias: it waits for the event in flight.
        await wait_until(lambda: any(e["event"] == "delivery_deferred" for e in logs), what="the merge to wait")
        assert moengage.received == 1
        moengage.plan(Planned(500))  # the event fails once: retried, and the merge waits for it
        moengage.release()
        await wait_until(lambda: settled(bridge), what="the queue to empty")
    accepted = [s.path for s in moengage.seen if s.status == 200]
    assert accepted[-1] == "/v1/customer/merge", moengage.seen
    assert moengage.merges() == [{"merged_user": "anon-42", "retained_user": "user-42"}]
    assert seqs(moengage) == {"t"}
    assert await dlq(bridge) == []


async def test_an_unordered_destination_sends_two_merges_of_one_user_that_share_a_request(make_bridge):
    """Two aliases naming one user in one batch are packed into one Merge User request.
    Each merge waits for its users' earlier jobs, and the second found the first among them:
    not yet sent, since it was in the very request being checked. The whole request was
    deferred, leased again with the same two jobs and deferred again, for good: neither
    merge ever reached MoEngage. Jobs in one request go out together, in their order, as
    with `delivery.ordered: true`."""
    bridge = await make_bridge(lambda raw: raw["destinations"][0]["delivery"].update(ordered=False, concurrency=1))
    aliases = [
        {"type": "alias", "previousId": "anon-1", "userId": "user-9", "messageId": "m-alias-1"},
        {"type": "alias", "previousId": "anon-2", "userId": "user-9", "messageId": "m-alias-2"},
    ]
    assert (await bridge.post("/v1/batch", {"batch": aliases}, H))[0] == 200
    await wait_until(lambda: settled(bridge), what="both merges to be delivered")
    assert bridge.moengage.merges() == [
        {"merged_user": "anon-1", "retained_user": "user-9"},
        {"merged_user": "anon-2", "retained_user": "user-9"},
    ]
    assert await dlq(bridge) == []


async def test_destinations_on_one_moengage_workspace_share_its_rate_limits(make_bridge):
    """MoEngage counts its rate limits per workspace (30,000 events a minute for one
    workspace, not for each client of it). Two destinations on one workspace and data center
    (two mappings, say) each kept buckets of their own: together they sent twice the
    documented rate, and a 429 answered to one slowed only that one while the other went on
    at full rate into the same limit. They share one set of buckets, at the lower rate where
    their `rate_limits` differ."""

    def tweak(raw: dict[str, Any]) -> None:
        main = raw["destinations"][0]
        copy = {**main, "name": "moengage-copy", "delivery": dict(main["delivery"]), "retry": dict(main["retry"])}
        copy["rate_limits"] = {"bulk_users": "6000/min"}
        raw["destinations"].append(copy)
        raw["sources"][0]["to"] = ["moengage-main", "moengage-copy"]

    bridge = await make_bridge(tweak)
    workers = bridge.runtime.delivery.workers
    main, copy = workers["moengage-main"].limiter, workers["moengage-copy"].limiter
    # The lower of the two configured rates holds for both; the other buckets are MoEngage's.
    assert main.buckets["bulk_users"].base_rate == copy.buckets["bulk_users"].base_rate == 100
    assert main.buckets["bulk_events"].base_rate == copy.buckets["bulk_events"].base_rate == 1000
    # Another workspace's limits (moengage-eu's data center) stay its own.
    assert workers["moengage-eu"].limiter.buckets["bulk_users"].base_rate == 1000
    bridge.moengage.plan(Planned(429))  # whichever destination's Bulk Import comes first
    assert (await bridge.post("/v1/batch", tracks(6), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 12, timeout=15)
    assert [s.status for s in bridge.moengage.seen].count(429) == 1
    # One 429 to the workspace slows both; the recovery since may have given some back.
    for limiter in (main, copy):
        bucket = limiter.buckets["bulk_events"]
        assert bucket.base_rate / 2 <= bucket.rate < bucket.base_rate, bucket.rate
    assert await dlq(bridge) == []
