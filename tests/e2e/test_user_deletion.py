"""Segment deletion requests (a webhook's type delete) reach MoEngage's Delete User."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Callable
from typing import Any

import orjson
from structlog.testing import capture_logs

from bridge.delivery.worker import DEFER_SECONDS
from bridge.testing.upstream import Planned
from tests.e2e.harness import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    WORKSPACE,
    WRITE_KEY,
    Bridge,
    basic,
    on_postgres,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DELETE_PATH = "/v1/customer/delete"


async def webhook(bridge: Bridge, body: Any) -> tuple[int, Any]:
    """POST ``body`` to /segment/webhook as Segment does: Basic write key, signed (a batch
    by its first item only)."""
    raw = orjson.dumps(body)
    signed = orjson.dumps(body[0]) if isinstance(body, list) else raw
    signature = hmac.new(WEBHOOK_SECRET.encode(), signed, hashlib.sha1).hexdigest()
    headers = {**basic(WRITE_KEY), "Content-Type": "application/json", "X-Signature": signature}
    return await bridge.post("/segment/webhook", None, headers, raw=raw)


def deletion(user_id: str, message_id: str) -> dict[str, Any]:
    # What Segment's Webhooks destination posts for a deletion request.
    return {
        "type": "delete",
        "userId": user_id,
        "messageId": message_id,
        "timestamp": "2026-11-01T10:00:00.000Z",
        "receivedAt": "2026-11-01T10:00:00.500Z",
        "context": {},
    }


async def settled(bridge: Bridge) -> bool:
    """Nothing left queued for moengage-main."""
    _, status = await bridge.get("/admin/status", ADMIN)
    return bool(status["destinations"][0]["queue_depth"] == 0)


async def dead_letters(bridge: Bridge) -> list[Any]:
    status, data = await bridge.get("/admin/dlq", ADMIN)
    assert status == 200, data
    return list(data["dead_letters"])


async def test_a_deletion_reaches_moengage_after_the_users_earlier_events(bridge: Bridge) -> None:
    moengage = bridge.moengage
    moengage.hold()  # the user's events stay queued (in flight) while the deletion arrives
    batch = {
        "batch": [
            {"type": "identify", "userId": "del-u1", "traits": {"email": "d@example.com"}, "messageId": "d-i"},
            *({"type": "track", "userId": "del-u1", "event": f"Step {n}", "messageId": f"d-t{n}"} for n in range(3)),
        ]
    }
    assert (await bridge.post("/v1/batch", batch, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.received >= 1)
    status, data = await webhook(bridge, deletion("del-u1", "del-1"))
    assert (status, data) == (200, {"success": True}), data
    moengage.release()
    await moengage.wait_for(lambda: len(moengage.deletions()) == 1)

    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "del-u1"}]
    paths = [seen.path for seen in moengage.seen]
    assert paths[-1] == DELETE_PATH and paths.count(DELETE_PATH) == 1, paths
    # Every event of the user was delivered before the deletion: none is left to recreate it.
    assert [e["actions"][0]["action"] for e in moengage.events()] == ["Step 0", "Step 1", "Step 2"]
    assert [c["customer_id"] for c in moengage.customers()] == ["del-u1"]
    (request,) = [r for r in moengage.requests if r.path == DELETE_PATH]
    assert dict(request.query) == {"app_id": WORKSPACE}
    assert request.body == {"identity_type": "customer_id", "identity_value": "del-u1"}
    assert "del-u1" not in moengage.users()
    await wait_until(lambda: settled(bridge), what="the queue to empty")
    assert await dead_letters(bridge) == []


async def test_a_deletion_of_a_user_moengage_never_had_is_delivered_not_dead_lettered(bridge: Bridge) -> None:
    moengage = bridge.moengage
    status, data = await webhook(bridge, deletion("never-seen-9", "del-2"))
    assert (status, data) == (200, {"success": True}), data
    await moengage.wait_for(lambda: any(s.path == DELETE_PATH for s in moengage.seen))
    assert [(s.path, s.status) for s in moengage.seen] == [(DELETE_PATH, 400)]
    await wait_until(lambda: settled(bridge), what="the deletion to be settled")
    assert await dead_letters(bridge) == []
    assert moengage.deletions() == []
    assert [(s.path, s.status) for s in moengage.seen] == [(DELETE_PATH, 400)]  # answered once, not retried


async def test_a_deletion_moengage_rate_limits_is_retried_after_its_retry_after(bridge: Bridge) -> None:
    """Delete User's 429 is the one MoEngage error without the {"error": {...}} envelope
    (a title and a description instead): still a rate limit, retried once the Retry-After
    has passed, and its body shown whole where the failure is reported."""
    moengage = bridge.moengage
    identify = {"userId": "del-u40", "traits": {"email": "u40@example.com"}, "messageId": "u40-i"}
    assert (await bridge.post("/v1/identify", identify, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: "del-u40" in moengage.users())
    moengage.plan(Planned(429, headers={"Retry-After": "3"}))
    with capture_logs() as logs:
        assert (await webhook(bridge, deletion("del-u40", "del-40")))[0] == 200
        await moengage.wait_for(lambda: any(s.path == DELETE_PATH for s in moengage.seen))
        _, status = await bridge.get("/admin/status", ADMIN)
        destination = status["destinations"][0]
        failure = destination["last_failure"]
        assert (failure["status"], failure["action"], failure["items"]) == (429, "retry", 1), failure
        assert "Exceeded rate limit for this url" in failure["body"], failure
        # The Retry-After holds the destination, beyond the harness's backoff (max_delay 0.3 s).
        assert 0.3 < destination["backing_off_seconds"] <= 3, destination
        await moengage.wait_for(lambda: len(moengage.deletions()) == 1, timeout=10)
    assert [s.status for s in moengage.seen if s.path == DELETE_PATH] == [429, 200]
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "del-u40"}]
    (logged,) = [e for e in logs if e["event"] == "delivery_attempt_failed"]
    assert (logged["status"], logged["action"]) == (429, "retry")
    assert "Rate limit exceeded" in logged["body"] and "Exceeded rate limit for this url" in logged["body"]
    await wait_until(lambda: settled(bridge), what="the deletion to settle")
    assert await dead_letters(bridge) == []


async def test_a_replayed_dead_letter_does_not_recreate_a_deleted_user(bridge: Bridge) -> None:
    """MoEngage makes a user of any identifiers it is sent: the user's identify, refused and
    dead-lettered before the deletion, recreated them (and their email) when a replay sent
    it after. A delivered deletion removes its user's dead letters."""
    moengage = bridge.moengage
    moengage.plan(Planned(400))  # the user's identify is refused for good: dead-lettered
    identify = {"userId": "gdpr-u1", "traits": {"email": "gone@example.com"}, "messageId": "g-i"}
    assert (await bridge.post("/v1/identify", identify, basic(WRITE_KEY)))[0] == 200
    await wait_until(lambda: _dead_letter_count(bridge, 1), what="the identify to be dead-lettered")
    status, data = await webhook(bridge, deletion("gdpr-u1", "g-del"))
    assert (status, data) == (200, {"success": True}), data
    await wait_until(lambda: settled(bridge), what="the deletion to settle")
    assert await dead_letters(bridge) == []  # nothing of who they were is kept either
    status, data = await bridge.post("/admin/dlq/replay", {"destination": "moengage-main"}, ADMIN)
    assert (status, data) == (200, {"replayed": 0}), data
    await wait_until(lambda: settled(bridge), what="the replay to settle")
    assert "gdpr-u1" not in moengage.users()


async def _dead_letter_count(bridge: Bridge, count: int) -> bool:
    return len(await dead_letters(bridge)) == count


async def test_a_deletion_is_sent_under_the_users_linked_id(bridge: Bridge) -> None:
    moengage = bridge.moengage
    identify = {"userId": "u-link-1", "traits": {"id": "crm-link-1", "email": "l@example.com"}}
    assert (await bridge.post("/v1/identify", identify, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"crm-link-1"})
    status, data = await webhook(bridge, deletion("u-link-1", "del-3"))
    assert (status, data) == (200, {"success": True}), data
    await moengage.wait_for(lambda: len(moengage.deletions()) == 1)
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "crm-link-1"}]
    assert moengage.users() == set()


async def test_a_delivered_deletion_erases_the_users_identity_links(bridge: Bridge) -> None:
    await deletion_erases_links(bridge)


async def test_a_delivered_deletion_erases_the_users_identity_links_on_postgres(
    make_bridge: Callable[..., Any], pg_schema: str
) -> None:
    await deletion_erases_links(await on_postgres(make_bridge, pg_schema))


async def deletion_erases_links(bridge: Bridge) -> None:
    """Deleted, a user's identity link (userId -> traits.id) went on being applied: their
    later calls were sent under the deleted customer_id, and MoEngage made that user again
    (a GDPR erasure undone). The link is erased once the deletion is delivered, not
    before: the user's events queued ahead of the deletion, and the deletion itself,
    still go out under the linked id."""
    moengage = bridge.moengage
    identify = {"userId": "u-erase-1", "traits": {"id": "crm-erase-1", "email": "e@example.com"}}
    assert (await bridge.post("/v1/identify", identify, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"crm-erase-1"})

    def track(event: str) -> dict[str, Any]:
        return {"type": "track", "userId": "u-erase-1", "event": event, "messageId": f"erase-{event}"}

    moengage.hold()  # "Before" stays in flight while the deletion and "After" queue behind it
    assert (await bridge.post("/v1/batch", {"batch": [track("Before")]}, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.received >= 1)
    assert (await webhook(bridge, deletion("u-erase-1", "del-erase-1")))[0] == 200
    assert (await bridge.post("/v1/batch", {"batch": [track("After")]}, basic(WRITE_KEY)))[0] == 200
    moengage.release()
    await moengage.wait_for(lambda: len(moengage.events()) == 2)
    await wait_until(lambda: settled(bridge), what="the queue to empty")

    sent = {e["actions"][0]["action"]: e["customer_id"] for e in moengage.events()}
    assert sent == {"Before": "crm-erase-1", "After": "u-erase-1"}
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "crm-erase-1"}]
    assert moengage.users() == {"u-erase-1"}  # the deleted user was not made again
    assert await dead_letters(bridge) == []


async def test_a_job_given_back_for_an_erased_link_holds_back_its_users_later_jobs(bridge: Bridge) -> None:
    """An alias mapped, in the deletion's batch, with the deleted user's link goes back to
    the queue unsent (mapped again once the link is erased). Its retained user's later
    event in that batch did not wait for it: sent first, it overtook the merge, though
    delivery is ordered per user."""
    moengage = bridge.moengage
    identify = {"userId": "u-held-1", "traits": {"id": "crm-held-1"}, "messageId": "held-id"}
    assert (await bridge.post("/v1/identify", identify, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"crm-held-1"})

    def track(user_id: str, event: str) -> dict[str, Any]:
        return {"type": "track", "userId": user_id, "event": event, "messageId": f"held-{event}"}

    moengage.hold()  # "Before" stays in flight while the next batch queues behind it
    assert (await bridge.post("/v1/batch", {"batch": [track("u-held-1", "Before")]}, basic(WRITE_KEY)))[0] == 200
    await moengage.wait_for(lambda: moengage.received >= 2)
    assert (await webhook(bridge, deletion("u-held-1", "del-held-1")))[0] == 200
    alias = {"type": "alias", "previousId": "u-held-1", "userId": "n-held-1", "messageId": "held-alias"}
    later = track("n-held-1", "After")
    assert (await bridge.post("/v1/batch", {"batch": [alias, later]}, basic(WRITE_KEY)))[0] == 200
    moengage.release()
    await moengage.wait_for(lambda: any(s.path.endswith("/merge") for s in moengage.seen))
    await wait_until(lambda: settled(bridge), what="the queue to empty")

    paths = [s.path for s in moengage.seen]
    # The identify, "Before", the deletion, then the merge before "After" (a Bulk Import).
    assert paths[2:] == [DELETE_PATH, "/v1/customer/merge", f"/v1/transition/{WORKSPACE}"], paths
    assert moengage.merges() == [{"merged_user": "u-held-1", "retained_user": "n-held-1"}]
    assert {e["actions"][0]["action"]: e["customer_id"] for e in moengage.events()}["After"] == "n-held-1"


async def test_a_deletion_without_a_user_id_is_refused_at_ingest(bridge: Bridge) -> None:
    status, data = await webhook(bridge, {"type": "delete", "anonymousId": "anon-1", "messageId": "del-4"})
    assert status == 400
    assert (data["code"], data["message"]) == ("id_required", "delete requires userId, the user to delete")
    # In a batch, the nameless deletion (first: the item Segment signs) is rejected by its
    # index and the rest is kept.
    track = {"type": "track", "userId": "u-batch-1", "event": "Step", "messageId": "del-5"}
    status, data = await webhook(bridge, [{"type": "delete", "messageId": "del-6"}, track])
    assert status == 200, data
    assert data["accepted"] == 1
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [(0, "id_required")]


async def test_the_tracking_api_still_refuses_a_deletion(bridge: Bridge) -> None:
    h = basic(WRITE_KEY)
    call = {"type": "delete", "userId": "u-api-1", "messageId": "del-7"}
    status, data = await bridge.post("/v1/batch", {"batch": [call]}, h)
    assert (status, data["code"]) == (400, "invalid_type")
    assert data["message"] == "type must be one of alias, group, identify, page, screen, track; got 'delete'"
    status, _ = await bridge.post("/v1/delete", call, h)
    assert status == 404  # no such route: a client cannot ask for a deletion
    await wait_until(lambda: settled(bridge), what="an empty queue")
    assert bridge.moengage.seen == []


def unsigned(raw: dict[str, Any]) -> None:
    raw["sources"][0]["webhook_secret"] = ""  # the "web" source: webhooks vouched for by the write key alone


async def test_a_source_without_a_webhook_secret_takes_no_deletion(make_bridge: Callable[..., Any]) -> None:
    """A write key is no proof that Segment sent a request: browser and mobile apps carry it
    for anyone to read. Taken with it alone, anyone could delete any MoEngage user; the
    Tracking API refuses the type for that reason, and so does a webhook Segment did not sign."""
    bridge = await make_bridge(unsigned)
    headers = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    track = {"type": "track", "userId": "del-u10", "event": "Step", "messageId": "u10-t"}
    track["timestamp"] = "2026-11-01T09:00:00Z"
    status, data = await bridge.post("/segment/webhook", deletion("del-u10", "del-10"), headers)
    assert (status, data["code"]) == (400, "unsigned_deletion"), data
    assert "webhook_secret" in data["message"]
    # In a batch, only the deletion is refused.
    status, data = await bridge.post("/segment/webhook", [track, deletion("del-u10", "del-11")], headers)
    assert status == 200, data
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [(1, "unsigned_deletion")]
    await wait_until(lambda: settled(bridge), what="an empty queue")
    assert [s.path for s in bridge.moengage.seen if s.path == DELETE_PATH] == []
    assert "del-u10" in bridge.moengage.users()


async def test_a_signed_batch_takes_a_deletion_from_its_first_item_only(bridge: Bridge) -> None:
    """Segment signs only a webhook batch's first item: the others are vouched for by the
    write key alone, so a deletion further on is refused by its index, like an unsigned one,
    and the batch's other events are kept. A deletion as the first item goes through."""
    track = {"type": "track", "userId": "del-u20", "event": "Step", "messageId": "u20-t"}
    track["timestamp"] = "2026-11-01T09:00:00Z"
    other = {**track, "userId": "del-u21", "messageId": "u21-t"}
    status, data = await webhook(bridge, [track, deletion("del-u20", "del-20"), other, {"type": 7}])
    assert status == 200, data
    got = [(r["index"], r["code"]) for r in data["rejected"]]
    assert got == [(1, "unsigned_deletion"), (3, "invalid_type")], data
    assert "first item" in data["rejected"][0]["message"]
    status, data = await webhook(bridge, [deletion("del-u21", "del-21"), track])
    assert status == 200 and not data.get("rejected"), data
    await wait_until(lambda: settled(bridge), what="an empty queue")
    deleted = [r.body["identity_value"] for r in bridge.moengage.requests if r.path == DELETE_PATH]
    assert deleted == ["del-u21"], deleted
    assert "del-u20" in bridge.moengage.users()


def unordered(raw: dict[str, Any]) -> None:
    destination = raw["destinations"][0]
    destination["delivery"] = {**destination["delivery"], "ordered": False, "concurrency": 2}


async def test_an_unordered_destination_still_sends_a_deletion_after_the_users_earlier_events(
    make_bridge: Callable[..., Any],
) -> None:
    # delivery.ordered: false lets events overtake each other, but a deletion that overtook
    # the user's earlier events would be undone by them: MoEngage creates the user again.
    bridge = await make_bridge(unordered)
    moengage = bridge.moengage
    moengage.hold()  # the user's events stay in flight (leased by one loop)
    batch = {
        "batch": [
            {"type": "identify", "userId": "del-u9", "traits": {"email": "u9@example.com"}, "messageId": "u9-i"},
            {"type": "track", "userId": "del-u9", "event": "Step", "messageId": "u9-t"},
        ]
    }
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", batch, basic(WRITE_KEY)))[0] == 200
        await moengage.wait_for(lambda: moengage.received == 1)
        assert (await webhook(bridge, deletion("del-u9", "del-9")))[0] == 200
        # The other loop takes the deletion: it goes out at once, or waits.
        await wait_until(
            lambda: moengage.received == 2 or any(e["event"] == "delivery_deferred" for e in logs),
            what="the deletion to be sent or deferred",
        )
        moengage.plan(Planned(500))  # the user's events fail once: retried
        moengage.release()
        await wait_until(lambda: settled(bridge), what="the queue to empty")
    assert [s.path for s in moengage.seen if s.status == 200][-1] == DELETE_PATH
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "del-u9"}]
    assert "del-u9" not in moengage.users()
    assert await dead_letters(bridge) == []


async def test_a_deferred_deletion_spends_no_attempt_while_it_waits(make_bridge: Callable[..., Any]) -> None:
    # Each wait behind the user's earlier events was settled as a failed attempt: a deletion
    # that waited out a long retry of them had spent its own retry budget (attempts and age),
    # and its first failure once sent went straight to the DLQ.
    bridge = await make_bridge(unordered)
    moengage = bridge.moengage
    moengage.hold()  # the user's event stays in flight (leased by one loop)
    event = {"type": "track", "userId": "del-u10", "event": "Step", "messageId": "u10-t"}
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", {"batch": [event]}, basic(WRITE_KEY)))[0] == 200
        await moengage.wait_for(lambda: moengage.received == 1)
        assert (await webhook(bridge, deletion("del-u10", "del-10")))[0] == 200
        # Deferred twice: the first deferral's settle is written before the second lease.
        await wait_until(
            lambda: sum(e["event"] == "delivery_deferred" for e in logs) >= 2, what="the deletion to wait twice"
        )
        with sqlite3.connect(bridge.tmp_path / "bridge.db") as conn:
            row = conn.execute("SELECT attempts, first_attempt_at FROM jobs WHERE message_id = 'del-10'").fetchone()
        assert row == (0, None)  # never tried: no attempt, and its retry budget not running
        moengage.release()
        await wait_until(lambda: settled(bridge), what="the queue to empty")
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "del-u10"}]
    assert await dead_letters(bridge) == []


async def test_a_deferred_deletion_waits_even_with_no_base_delay(make_bridge: Callable[..., Any]) -> None:
    # With `retry.base_delay: 0` (allowed) a deferred deletion was due again at once: leased,
    # checked and deferred again in a tight loop for as long as the user's events waited.
    def no_base_delay(raw: dict[str, Any]) -> None:
        unordered(raw)
        raw["destinations"][0]["retry"] = {**raw["destinations"][0].get("retry", {}), "base_delay": 0}

    bridge = await make_bridge(no_base_delay)
    moengage = bridge.moengage
    moengage.hold()  # the user's event stays in flight (leased by one loop)
    event = {"type": "track", "userId": "del-u11", "event": "Step", "messageId": "u11-t"}
    with capture_logs() as logs:
        assert (await bridge.post("/v1/batch", {"batch": [event]}, basic(WRITE_KEY)))[0] == 200
        await moengage.wait_for(lambda: moengage.received == 1)
        assert bridge.runtime is not None
        sent_at = bridge.runtime.store.now()
        assert (await webhook(bridge, deletion("del-u11", "del-11")))[0] == 200
        await wait_until(lambda: any(e["event"] == "delivery_deferred" for e in logs), what="the deletion to wait")
        with sqlite3.connect(bridge.tmp_path / "bridge.db") as conn:
            (available_at,) = conn.execute("SELECT available_at FROM jobs WHERE message_id = 'del-11'").fetchone()
        assert available_at >= sent_at + DEFER_SECONDS
        moengage.release()
        await wait_until(lambda: settled(bridge), what="the queue to empty")
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "del-u11"}]


async def test_a_deletion_segment_routed_to_the_webhook_alone_reaches_moengage(bridge: Bridge) -> None:
    """A deletion whose integrations select the Webhooks destination alone ({"All": false,
    "Webhooks": true}, Segment's way to pick destinations) was discarded as
    integrations_disabled: the user was never deleted from MoEngage, and nothing failed."""
    track = {"type": "track", "userId": "del-u30", "event": "Step", "messageId": "u30-t"}
    track["timestamp"] = "2026-11-01T09:00:00Z"
    status, data = await webhook(bridge, track)
    assert status == 200, data
    request = {**deletion("del-u30", "del-30"), "integrations": {"All": False, "Webhooks": True}}
    status, data = await webhook(bridge, request)
    assert (status, data) == (200, {"success": True}), data
    await wait_until(lambda: settled(bridge), what="an empty queue")
    deleted = [r.body["identity_value"] for r in bridge.moengage.requests if r.path == DELETE_PATH]
    assert deleted == ["del-u30"]
