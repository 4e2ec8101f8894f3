"""A Segment alias merges the previous user into the new one in MoEngage (Merge User), which
deletes the merged user. Its later calls (an old device still sending the old userId) must
reach the retained user: sent under the merged id, MoEngage makes that user again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from segment.analytics import Client

from tests.e2e.harness import ADMIN_TOKEN, WRITE_KEY, Bridge, basic, on_postgres, wait_until
from tests.e2e.test_user_deletion import deletion, webhook

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MERGE_PATH = "/v1/customer/merge"


async def settled(bridge: Bridge) -> bool:
    _, status = await bridge.get("/admin/status", ADMIN)
    return bool(status["destinations"][0]["queue_depth"] == 0)


def action_users(bridge: Bridge) -> dict[str, str]:
    """{event name: the customer_id MoEngage recorded it under}."""
    return {e["actions"][0]["action"]: e["customer_id"] for e in bridge.moengage.events()}


async def test_a_merged_users_later_calls_from_segments_client_reach_the_retained_user(bridge: Bridge) -> None:
    client = Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0)
    moengage = bridge.moengage

    def send(fn: Any, *args: Any, **kwargs: Any) -> Any:
        # The Segment client is synchronous (requests); the event loop stays free for the bridge.
        return asyncio.to_thread(fn, *args, **kwargs)

    await send(client.identify, "old-1", {"email": "old@example.com"})
    await send(client.identify, "new-1", {"email": "new@example.com"})
    await moengage.wait_for(lambda: moengage.users() == {"old-1", "new-1"})
    await send(client.alias, "old-1", "new-1")
    await moengage.wait_for(lambda: moengage.merges() == [{"merged_user": "old-1", "retained_user": "new-1"}])
    await wait_until(lambda: settled(bridge), what="the merge to be acked")

    await send(client.track, "old-1", "Late Event", {"n": 1})
    await send(client.identify, "old-1", {"plan": "pro"})
    await moengage.wait_for(lambda: len(moengage.events()) == 1 and len(moengage.customers()) == 3)
    await wait_until(lambda: settled(bridge), what="the queue to empty")

    assert action_users(bridge) == {"Late Event": "new-1"}
    assert moengage.customers()[-1]["customer_id"] == "new-1"
    assert moengage.customers()[-1]["attributes"]["plan"] == "pro"
    assert moengage.users() == {"new-1"}  # the merged user was not made again


async def test_an_id_linked_to_the_merged_user_follows_it_to_the_retained_user(bridge: Bridge) -> None:
    """identify(userId, traits.id) linked the userId to the MoEngage user the merge names:
    after the merge, that userId's calls go to the retained user too."""
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    identify = {"userId": "old-2", "traits": {"id": "crm-old-2", "email": "o2@example.com"}}
    assert (await bridge.post("/v1/identify", identify, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "new-2", "traits": {}}, h))[0] == 200
    assert (await bridge.post("/v1/alias", {"previousId": "old-2", "userId": "new-2"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 1)
    assert moengage.merges() == [{"merged_user": "crm-old-2", "retained_user": "new-2"}]
    await wait_until(lambda: settled(bridge), what="the merge to be acked")

    assert (await bridge.post("/v1/track", {"userId": "old-2", "event": "After"}, h))[0] == 200
    assert (await bridge.post("/v1/track", {"userId": "crm-old-2", "event": "Direct"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 2)
    assert action_users(bridge) == {"After": "new-2", "Direct": "new-2"}
    assert moengage.users() == {"new-2"}


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_call_mapped_before_its_users_merge_was_acked_is_mapped_again(
    make_bridge: Callable[..., Any], ordered: bool
) -> None:
    """The merged user's call in the merge's own batch (or the next, mapped while the merge
    is on the wire) was mapped before the ack linked the merged id: sent so, after the
    merge, it made the merged user again. It goes back to the queue unsent, and is mapped
    again once the merge is acked (ordered or not: unordered, the merge still goes last)."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["delivery"]["ordered"] = ordered

    bridge = await make_bridge(tweak)
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    for user in ("old-3", "new-3"):
        assert (await bridge.post("/v1/identify", {"userId": user, "traits": {"name": user}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"old-3", "new-3"})
    alias = {"type": "alias", "previousId": "old-3", "userId": "new-3", "messageId": "m3-alias"}
    late = {"type": "track", "userId": "old-3", "event": "Same Batch", "messageId": "m3-late"}
    other = {"type": "track", "userId": "bystander-3", "event": "Bystander", "messageId": "m3-other"}
    assert (await bridge.post("/v1/batch", {"batch": [alias, late, other]}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 2)
    await wait_until(lambda: settled(bridge), what="the queue to empty")

    assert action_users(bridge) == {"Same Batch": "new-3", "Bystander": "bystander-3"}
    assert moengage.users() == {"new-3", "bystander-3"}
    # The call given back went out once, after the merge.
    requests = [(r.path, orjson.dumps(r.body)) for r in moengage.requests]
    with_late = [i for i, (_, body) in enumerate(requests) if b"Same Batch" in body]
    merges = [i for i, (path, _) in enumerate(requests) if path == MERGE_PATH]
    assert len(with_late) == 1 and len(merges) == 1 and merges[0] < with_late[0], [p for p, _ in requests]


async def test_a_merged_users_later_calls_reach_the_retained_user_on_postgres(
    make_bridge: Callable[..., Any], pg_schema: str
) -> None:
    bridge = await on_postgres(make_bridge, pg_schema)
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    for user in ("old-4", "new-4"):
        assert (await bridge.post("/v1/identify", {"userId": user, "traits": {"name": user}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"old-4", "new-4"})
    assert (await bridge.post("/v1/alias", {"previousId": "old-4", "userId": "new-4"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 1)
    await wait_until(lambda: settled(bridge), what="the merge to be acked")
    assert (await bridge.post("/v1/track", {"userId": "old-4", "event": "After"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 1)
    assert action_users(bridge) == {"After": "new-4"}
    assert moengage.users() == {"new-4"}


async def test_a_second_alias_of_a_merged_id_merges_the_user_it_became(bridge: Bridge) -> None:
    """alias(X -> A) then alias(X -> B): X is A, and now B, so A is B (as an identity graph
    joins them). MoEngage no longer has X; the second merge names A, the user X became."""
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    for user in ("x-5", "a-5", "b-5"):
        assert (await bridge.post("/v1/identify", {"userId": user, "traits": {"name": user}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"x-5", "a-5", "b-5"})
    assert (await bridge.post("/v1/alias", {"previousId": "x-5", "userId": "a-5"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 1)
    await wait_until(lambda: settled(bridge), what="the first merge to be acked")
    assert (await bridge.post("/v1/alias", {"previousId": "x-5", "userId": "b-5"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 2)
    assert moengage.merges() == [
        {"merged_user": "x-5", "retained_user": "a-5"},
        {"merged_user": "a-5", "retained_user": "b-5"},
    ]
    await wait_until(lambda: settled(bridge), what="the second merge to be acked")
    assert (await bridge.post("/v1/track", {"userId": "x-5", "event": "Later"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 1)
    assert action_users(bridge) == {"Later": "b-5"}
    assert moengage.users() == {"b-5"}


async def test_a_merge_after_a_deletion_in_its_batch_keeps_the_links_it_moves(bridge: Bridge) -> None:
    await merge_after_deletion(bridge)


async def test_a_merge_after_a_deletion_in_its_batch_keeps_the_links_it_moves_on_postgres(
    make_bridge: Callable[..., Any], pg_schema: str
) -> None:
    await merge_after_deletion(await on_postgres(make_bridge, pg_schema))


async def merge_after_deletion(bridge: Bridge) -> None:
    """A deletion of new-7, then an alias of old-7 into it, delivered in one batch: the ack
    applied the merge first, then erased new-7's links learnt before the deletion, among
    them dev-7's, which the merge had just moved from old-7 to new-7. dev-7's later calls
    went out under dev-7: a user MoEngage had never had. Applied in their order, the
    deletion comes first, and the merge's links stay."""
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    identify = {"userId": "dev-7", "traits": {"id": "old-7", "name": "old"}}
    assert (await bridge.post("/v1/identify", identify, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "new-7", "traits": {"name": "new"}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"old-7", "new-7"})
    alias = {"type": "alias", "previousId": "old-7", "userId": "new-7", "messageId": "m7-alias"}
    # One signed request stores both: they are leased, delivered and acked together.
    assert (await webhook(bridge, [deletion("new-7", "m7-delete"), alias]))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 1)
    await wait_until(lambda: settled(bridge), what="the deletion and the merge to be acked")
    assert moengage.deletions() == [{"identity_type": "customer_id", "identity_value": "new-7"}]
    assert moengage.merges() == [{"merged_user": "old-7", "retained_user": "new-7"}]

    assert (await bridge.post("/v1/track", {"userId": "dev-7", "event": "Later"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 1)
    assert action_users(bridge) == {"Later": "new-7"}
    assert moengage.users() == {"new-7"}


async def test_with_anonymous_ids_a_merged_anonymous_ids_later_calls_reach_the_retained_user(
    make_bridge: Callable[..., Any],
) -> None:
    """With anonymous_ids an anonymousId is a MoEngage user, which analytics.js's alias(newId)
    before identify merges into the new userId. Its anonymous-only calls after the merge (in
    the merge's batch, or later) go to the retained user: sent under the anonymousId,
    MoEngage made that user again, a ghost profile beside the one it was merged into."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["mapping_options"] = {"anonymous_ids": True}

    bridge = await make_bridge(tweak)
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    assert (await bridge.post("/v1/track", {"anonymousId": "anon-9", "event": "Before"}, h))[0] == 200
    assert (await bridge.post("/v1/identify", {"userId": "user-9", "traits": {"name": "u9"}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"anon-9", "user-9"})
    alias = {"type": "alias", "previousId": "anon-9", "anonymousId": "anon-9", "userId": "user-9"}
    late = {"type": "track", "anonymousId": "anon-9", "event": "Same Batch"}
    assert (await bridge.post("/v1/batch", {"batch": [alias, late]}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 2)
    await wait_until(lambda: settled(bridge), what="the merge to be acked")
    assert moengage.merges() == [{"merged_user": "anon-9", "retained_user": "user-9"}]

    assert (await bridge.post("/v1/track", {"anonymousId": "anon-9", "event": "After"}, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 3)
    assert action_users(bridge) == {"Before": "anon-9", "Same Batch": "user-9", "After": "user-9"}
    assert moengage.users() == {"user-9"}  # the merged anonymousId was not made again
    # A dry run for the destination looks the anonymousId up as its worker does.
    dry = {"type": "track", "anonymousId": "anon-9", "event": "Dry"}
    status, body = await bridge.post("/admin/translate?destination=moengage-main", dry, ADMIN)
    assert status == 200 and body["results"][0]["outputs"][0]["body"]["customer_id"] == "user-9", body


async def test_an_alias_of_an_anonymous_id_never_sent_is_discarded_not_merged(bridge: Bridge) -> None:
    """Without anonymous_ids MoEngage never had the anonymousId analytics.js names as the
    previousId of alias(newId) before identify: no Merge User of it, but a discard with its
    reason, listed for a replay (once anonymous_ids is on, say). An alias of two userIds
    still merges."""
    h = basic(WRITE_KEY)
    moengage = bridge.moengage
    for user in ("user-10", "old-10"):
        assert (await bridge.post("/v1/identify", {"userId": user, "traits": {"name": user}}, h))[0] == 200
    await moengage.wait_for(lambda: moengage.users() == {"user-10", "old-10"})
    alias = {"previousId": "anon-10", "anonymousId": "anon-10", "userId": "user-10", "messageId": "m10-anon"}
    assert (await bridge.post("/v1/alias", alias, h))[0] == 200
    between = {"previousId": "old-10", "anonymousId": "anon-10", "userId": "user-10"}
    assert (await bridge.post("/v1/alias", between, h))[0] == 200
    await moengage.wait_for(lambda: len(moengage.merges()) == 1)
    await wait_until(lambda: settled(bridge), what="both aliases to be settled")

    assert moengage.merges() == [{"merged_user": "old-10", "retained_user": "user-10"}]
    _, body = await bridge.get("/admin/discards?reason=anonymous_previous_id", ADMIN)
    assert [(d["message_id"], d["reason"]) for d in body["discards"]] == [("m10-anon", "anonymous_previous_id")]
