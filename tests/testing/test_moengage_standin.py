"""The MoEngage stand-in answers like MoEngage's Data API, errors included."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from bridge.destinations.http import basic_auth
from bridge.testing.standins import BLOCKED_CUSTOMER_IDS, MoEngageStandIn, Planned

WS = "WS1"
KEY = "k3y"
GOOD = {"Authorization": basic_auth(WS, KEY), "MOE-APPKEY": WS, "Content-Type": "application/json"}


@pytest.fixture
async def moe(aiohttp_server, aiohttp_client):
    standin = MoEngageStandIn(WS, KEY)
    client = await aiohttp_client(await aiohttp_server(standin.app()))
    return standin, client


async def call(client, path, body, headers=None):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post(path, data=data, headers=GOOD if headers is None else headers)
    return resp.status, await resp.json(content_type=None)


def customer(cid="u1"):
    return {"type": "customer", "customer_id": cid, "attributes": {"plan": "pro"}}


def event(cid="u1", actions=None):
    return {"type": "event", "customer_id": cid, "actions": actions or [{"action": "Bought", "attributes": {}}]}


def device_item(cid="u1", **attributes):
    attrs = {"platform": "ANDROID", "push_id": "fcm-token-1", **attributes}
    return {"type": "device", "customer_id": cid, "device_id": "d1", "attributes": attrs}


async def test_accepts_a_valid_customer_and_records_it(moe):
    standin, client = moe
    status, body = await call(client, f"/v1/customer/{WS}", customer())
    assert status == 200
    assert body == {"status": "success", "message": "Your request has been accepted and will be processed soon."}
    assert standin.customers() == [customer()]
    assert standin.requests[0].headers["MOE-APPKEY"] == WS
    assert standin.requests[0].body == customer()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"MOE-APPKEY": WS, "Content-Type": "application/json"}, "Authentication Header Required"),
        ({**GOOD, "Authorization": "Bearer abc"}, "MoEngage only supports 'Basic Auth'"),
        ({**GOOD, "Authorization": basic_auth(WS, "nope")}, "App Secret key mismatch"),
        ({**GOOD, "Authorization": basic_auth("OTHER", KEY)}, "App Secret key mismatch"),
        ({**GOOD, "Authorization": "Basic !!!"}, "Authentication Header Malformed"),
        ({**GOOD, "MOE-APPKEY": "OTHER"}, "MOE_APPKEY doesn't match the Username"),
        ({"Authorization": basic_auth(WS, KEY), "Content-Type": "application/json"}, "MOE-APPKEY header is required"),
    ],
)
async def test_auth_failures_are_401_with_the_error_envelope(moe, headers, message):
    standin, client = moe
    status, body = await call(client, f"/v1/customer/{WS}", customer(), headers)
    assert status == 401
    assert body["status"] == "fail"
    assert message in body["error"]["message"]
    assert len(body["error"]["request_id"]) == 32
    assert standin.customers() == []
    assert standin.received == 1


async def test_merge_may_omit_moe_appkey_but_not_mismatch_app_id(moe):
    standin, client = moe
    headers = {"Authorization": basic_auth(WS, KEY), "Content-Type": "application/json"}
    pairs = {"merge_data": [{"merged_user": "a1", "retained_user": "b1"}]}
    assert (await call(client, f"/v1/customer/merge?app_id={WS}", pairs, headers))[0] == 200
    status, body = await call(client, "/v1/customer/merge?app_id=OTHER", pairs, headers)
    assert (status, body["error"]["message"]) == (409, "App key mismatch in params and authentication.")
    status, body = await call(client, "/v1/customer/merge", pairs, headers)
    assert (status, body["error"]["type"]) == (400, "InvalidParams")
    assert standin.merges() == pairs["merge_data"]


async def test_workspace_in_path_must_match_the_credentials(moe):
    _standin, client = moe
    status, _ = await call(client, "/v1/event/SOMEONE_ELSE", event())
    assert status == 409


async def test_several_workspaces_each_with_its_own_key(aiohttp_server, aiohttp_client):
    standin = MoEngageStandIn(WS, KEY, workspaces={"WS2": "k2", WS: "ignored"})
    client = await aiohttp_client(await aiohttp_server(standin.app()))
    second = {"Authorization": basic_auth("WS2", "k2"), "MOE-APPKEY": "WS2", "Content-Type": "application/json"}
    assert (await call(client, f"/v1/customer/{WS}", customer("a1")))[0] == 200
    assert (await call(client, "/v1/customer/WS2", customer("b1"), second))[0] == 200
    # Each key opens only its own workspace; a workspace's own key wins over a duplicate.
    for user, key in (("WS2", KEY), (WS, "k2"), (WS, "ignored")):
        headers = {**second, "Authorization": basic_auth(user, key), "MOE-APPKEY": user}
        status, body = await call(client, f"/v1/customer/{user}", customer(), headers)
        assert status == 401
        assert "App Secret key mismatch" in body["error"]["message"]
    assert (await call(client, f"/v1/customer/{WS}", customer(), second))[0] == 409
    assert standin.customers() == [customer("a1"), customer("b1")]


async def test_content_type_must_be_json(moe):
    _standin, client = moe
    status, body = await call(client, f"/v1/event/{WS}", event(), {**GOOD, "Content-Type": "text/plain"})
    assert (status, body["error"]["type"]) == (415, "MediaTypeError")


async def test_payload_caps_128_kb_and_100_kb_for_bulk(moe):
    standin, client = moe
    big = customer()
    big["attributes"]["blob"] = "x" * 110_000  # under 128 KB, over 100 KB
    assert (await call(client, f"/v1/customer/{WS}", big))[0] == 200
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": [big]})
    assert (status, body["error"]["type"]) == (413, "PayloadTooLarge")
    bigger = customer()
    bigger["attributes"]["blob"] = "x" * 130_000
    status, body = await call(client, f"/v1/customer/{WS}", bigger)
    assert status == 413
    assert body["error"]["message"] == "Payload size exceeds 128 KB"
    # far beyond aiohttp's own default body limit: still MoEngage's answer
    status, body = await call(client, f"/v1/customer/{WS}", b"{" + b" " * 3_000_000 + b"}")
    assert (status, body["status"]) == (413, "fail")
    assert len(standin.customers()) == 1


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_malformed_json_is_400(moe, raw):
    _standin, client = moe
    status, body = await call(client, f"/v1/event/{WS}", raw)
    assert (status, body["error"]["type"]) == (400, "Malformed JSON")


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        (f"/v1/customer/{WS}", {"type": "customer", "attributes": {}}, "customer_id can not be empty"),
        (f"/v1/customer/{WS}", {"type": "customer", "customer_id": "  "}, "customer_id can not be empty"),
        (f"/v1/event/{WS}", {"type": "event", "customer_id": "u1", "actions": []}, "actions can not be empty"),
        (f"/v1/event/{WS}", event(actions=[{"attributes": {}}]), "action is not found in the payload"),
        (f"/v1/transition/{WS}", {"type": "transition", "elements": []}, "'elements cannot be empty array"),
        (f"/v1/transition/{WS}", {"type": "transition"}, "'elements cannot be empty array"),
        (
            f"/v1/customer/merge?app_id={WS}",
            {"merge_data": [{"merged_user": "a1"}]},
            "merge_data[0].retained_user is not found",
        ),
    ],
)
async def test_missing_attributes_are_400_missing_attribute_error(moe, path, payload, message):
    standin, client = moe
    status, body = await call(client, path, payload)
    assert status == 400
    assert body["error"]["type"] == "MissingAttributeError"
    assert message in body["error"]["message"]
    assert standin.customers() == standin.events() == standin.merges() == []


async def test_bulk_element_types_are_checked(moe):
    _standin, client = moe
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": [{"type": "x"}]})
    assert status == 400
    assert body["error"]["message"] == "'type in elements should be customer/event/device"
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "customer", "elements": [customer()]})
    assert (status, body["error"]["message"]) == (400, "type should be transition")


async def test_a_bulk_import_drops_a_malformed_element_and_keeps_the_others(moe):
    """ "All bulk API requests return a 200 response code" (MoEngage): an element the single
    endpoint would refuse with a 400 is acknowledged with its request and silently dropped."""
    standin, client = moe
    bad_event = {"type": "event", "customer_id": "u1", "actions": []}
    nameless = {"type": "customer", "attributes": {"plan": "free"}}
    elements = [customer("u1"), bad_event, event("u1"), nameless]
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": elements})
    assert (status, body) == (
        200,
        {"status": "success", "message": "Your request has been accepted and will be processed soon."},
    )
    assert standin.customers() == [customer("u1")]
    assert standin.events() == [event("u1")]
    assert [(i.reason, i.item, i.detail) for i in standin.ignored] == [
        ("malformed", bad_event, "elements[1].actions can not be empty Array"),
        ("malformed", nameless, "elements[3].customer_id can not be empty Unicode String"),
    ]
    assert standin.requests[-1].body["elements"] == elements


async def test_the_log_line_of_a_request_shows_what_moengage_dropped_and_why(moe):
    """Real MoEngage says nothing of what it drops: the sandbox's log line is where a
    sandbox user sees it."""
    standin, client = moe
    standin.log_requests = True
    elements = [customer("u1"), {"type": "event", "customer_id": "u1", "actions": []}, customer("guest")]
    with capture_logs() as logs:
        assert (await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": elements}))[0] == 200
        assert (await call(client, f"/v1/customer/{WS}", customer("u2")))[0] == 200
    dropped, clean = [entry for entry in logs if entry["event"] == "upstream_request"]
    assert dropped["summary"] == "bulk customers=2 events=1 devices=0 ignored=2"
    assert orjson.loads(dropped["ignored"]) == [
        {"reason": "malformed", "detail": "elements[1].actions can not be empty Array", "item": elements[1]},
        {"reason": "blocked_customer_id", "item": elements[2]},
    ]
    assert (clean["summary"], "ignored" in clean) == ("customer 'u2'", False)


async def test_merge_takes_at_most_50_pairs(moe):
    standin, client = moe
    pairs = [{"merged_user": f"old{n}", "retained_user": f"new{n}"} for n in range(51)]
    status, body = await call(client, f"/v1/customer/merge?app_id={WS}", {"merge_data": pairs})
    assert status == 400
    assert "at most 50" in body["error"]["message"]
    status, body = await call(client, f"/v1/customer/merge?app_id={WS}", {"merge_data": pairs[:50]})
    assert (status, body) == (200, {"status": "success", "operation": "created"})
    assert len(standin.merges()) == 50


async def test_blocklisted_ids_are_accepted_but_silently_ignored(moe):
    standin, client = moe
    elements = [customer("guest"), customer("real-user"), event("NULL"), event("x"), event("real-user")]
    status, _ = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": elements})
    assert status == 200
    assert [c["customer_id"] for c in standin.customers()] == ["real-user"]
    assert [e["customer_id"] for e in standin.events()] == ["real-user"]
    assert [(i.reason, i.item["customer_id"]) for i in standin.ignored] == [
        ("blocked_customer_id", "guest"),
        ("blocked_customer_id", "NULL"),
        ("blocked_customer_id", "x"),
    ]
    assert {"unknown", "0", "-1", "n/a", "user_attribute_unique_id", "(empty)"} <= BLOCKED_CUSTOMER_IDS


async def test_future_dated_actions_are_accepted_but_silently_ignored(moe):
    """MoEngage "does not accept any future dated events": answered 200, never recorded."""
    standin, client = moe
    now = int(time.time())
    past, ahead = {"action": "Past", "current_time": now - 60}, {"action": "Ahead", "current_time": now + 3600}
    iso_ahead = {"action": "IsoAhead", "current_time": "2999-01-01T00:00:00Z"}
    millis_past = {"action": "MillisPast", "current_time": str((now - 60) * 1000)}
    status, _ = await call(client, f"/v1/event/{WS}", event("u1", [past, ahead, iso_ahead, millis_past]))
    assert status == 200
    status, _ = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": [event("u2", [ahead])]})
    assert status == 200
    # Only the past actions are kept; a user none of whose actions were kept is not made.
    assert standin.events() == [event("u1", [past, millis_past])]
    assert standin.users() == {"u1"}
    assert [(i.reason, i.item["customer_id"], i.item["actions"]) for i in standin.ignored] == [
        ("future_dated", "u1", [ahead]),
        ("future_dated", "u1", [iso_ahead]),
        ("future_dated", "u2", [ahead]),
    ]


async def test_unknown_route_is_404_in_moengage_shape(moe):
    _standin, client = moe
    status, body = await call(client, f"/v1/device2/{WS}", {})
    assert (status, body["status"]) == (404, "fail")


# -- failure injection -----------------------------------------------------------------


async def test_plan_is_consumed_in_order_then_normal_handling_resumes(moe):
    standin, client = moe
    standin.plan(
        Planned(429, headers={"Retry-After": "5"}),
        Planned(500, body={"custom": True}),
        Planned(503, body="plain text"),
    )
    resp = await client.post(f"/v1/customer/{WS}", data=orjson.dumps(customer()), headers=GOOD)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"]["type"] == "RateLimitError"
    assert await call(client, f"/v1/customer/{WS}", customer()) == (500, {"custom": True})
    resp = await client.post(f"/v1/customer/{WS}", data=orjson.dumps(customer()), headers=GOOD)
    assert (resp.status, await resp.text()) == (503, "plain text")
    assert (await call(client, f"/v1/customer/{WS}", customer()))[0] == 200
    assert standin.received == 4
    assert [s.status for s in standin.seen] == [429, 500, 503, 200]
    assert len(standin.customers()) == 1


async def test_refuse_all_until_cleared(moe):
    standin, client = moe
    standin.refuse_all(503)
    for _ in range(3):
        assert (await call(client, f"/v1/customer/{WS}", customer()))[0] == 503
    standin.refuse_all(None)
    assert (await call(client, f"/v1/customer/{WS}", customer()))[0] == 200
    assert standin.received == 4
    assert len(standin.requests) == 1


async def test_hold_and_release(moe):
    standin, client = moe
    standin.hold()
    pending = asyncio.ensure_future(call(client, f"/v1/customer/{WS}", customer()))
    await standin.wait_for(lambda: standin.received == 1, timeout=5)
    await asyncio.sleep(0.1)
    assert not pending.done()
    standin.release()
    assert (await asyncio.wait_for(pending, 5))[0] == 200


async def test_delay_then_answer(moe):
    standin, client = moe
    standin.plan(Planned(200, body={"ok": 1}, delay=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await call(client, f"/v1/customer/{WS}", customer()) == (200, {"ok": 1})
    assert loop.time() - started >= 0.2
    assert standin.customers() == []  # planned answers bypass normal handling


async def test_reset_closes_without_answering(moe):
    standin, client = moe
    standin.plan(Planned(reset=True))
    with pytest.raises(aiohttp.ClientError):
        await call(client, f"/v1/customer/{WS}", customer())
    assert [s.status for s in standin.seen] == [0]


async def test_wait_for_times_out_with_a_clear_message(moe):
    standin, _client = moe
    with pytest.raises(TimeoutError, match=r"moengage stand-in: condition not met within 0.1s \(0 requests"):
        await standin.wait_for(lambda: len(standin.events()) == 1, timeout=0.1)


async def test_wait_for_wakes_on_arrival(moe):
    standin, client = moe

    async def later():
        await asyncio.sleep(0.05)
        for n in range(3):
            await call(client, f"/v1/event/{WS}", event(f"user{n}"))

    task = asyncio.ensure_future(later())
    await standin.wait_for(lambda: len(standin.events()) == 3, timeout=5)
    await task
    assert [e["customer_id"] for e in standin.events()] == ["user0", "user1", "user2"]


async def test_a_standin_can_be_served_again_after_shutdown(aiohttp_server, aiohttp_client):
    standin = MoEngageStandIn(WS, KEY)
    first = await aiohttp_server(standin.app())
    await first.close()
    client = await aiohttp_client(await aiohttp_server(standin.app()))
    standin.plan(Planned(hang=True))
    pending = asyncio.ensure_future(call(client, f"/v1/customer/{WS}", customer()))
    await standin.wait_for(lambda: standin.received == 1, timeout=5)
    await asyncio.sleep(0.05)
    assert not pending.done()  # hangs again: the earlier shutdown does not leak into this run
    standin.stop()
    assert (await asyncio.wait_for(pending, 5))[0] == 503
    assert (await call(client, f"/v1/customer/{WS}", customer()))[0] == 200


# -- data centers: a workspace lives in one, and another's host does not serve it ---------


@pytest.mark.parametrize(
    ("data_centers", "path", "status"),
    [
        ({}, f"/v1/customer/{WS}", 200),  # no data center in the path: the stand-in's own (01)
        ({}, f"/api-01/v1/customer/{WS}", 200),
        ({}, f"/api-02/v1/customer/{WS}", 400),
        ({WS: "02"}, f"/api-02/v1/customer/{WS}", 200),
        ({WS: "02"}, f"/v1/customer/{WS}", 400),
        ({WS: "02"}, f"/api-101/v1/customer/{WS}", 400),
    ],
)
async def test_a_workspace_is_served_only_by_its_own_data_center(
    aiohttp_server, aiohttp_client, data_centers, path, status
):
    standin = MoEngageStandIn(WS, KEY, data_centers=data_centers)
    client = await aiohttp_client(await aiohttp_server(standin.app()))
    got, body = await call(client, path, customer())
    assert got == status, body
    if status == 400:
        assert body["status"] == "fail"
        assert (body["error"]["type"], body["error"]["message"]) == ("InvalidParams", "given app_id is invalid/blocked")
        assert standin.customers() == []
    else:
        assert standin.customers() == [customer()]


async def test_every_endpoint_checks_the_data_center(moe):
    standin, client = moe
    merge = {"merge_data": [{"merged_user": "u-old", "retained_user": "u-new"}]}
    bulk = {"type": "transition", "elements": [customer()]}
    for path, body in (
        (f"/api-02/v1/event/{WS}", event()),
        (f"/api-02/v1/transition/{WS}", bulk),
        (f"/api-02/v1/customer/merge?app_id={WS}", merge),
    ):
        status, answer = await call(client, path, body)
        assert (status, answer["error"]["type"]) == (400, "InvalidParams"), path
    for path, body in ((f"/api-01/v1/event/{WS}", event()), (f"/api-01/v1/customer/merge?app_id={WS}", merge)):
        assert (await call(client, path, body))[0] == 200, path
    assert standin.merges() == merge["merge_data"]


def deletion(cid="u1"):
    return {"identity_type": "customer_id", "identity_value": cid}


async def test_delete_user_removes_a_user_it_has_and_is_a_400_for_one_it_never_saw(moe):
    standin, client = moe
    assert (await call(client, f"/v1/customer/{WS}", customer("u1")))[0] == 200
    assert (await call(client, f"/v1/event/{WS}", event("u2")))[0] == 200
    assert standin.users() == {"u1", "u2"}
    status, body = await call(client, f"/v1/customer/delete?app_id={WS}", deletion("u1"))
    assert (status, body) == (
        200,
        {"status": "success", "message": "Your request has been accepted and will be processed soon."},
    )
    assert standin.deletions() == [deletion("u1")]
    assert standin.users() == {"u2"}
    for absent in ("u1", "never-seen"):
        status, body = await call(client, f"/v1/customer/delete?app_id={WS}", deletion(absent))
        assert (status, body["error"]["message"]) == (400, f"User doesn't exists with customer id {absent}")
    assert standin.deletions() == [deletion("u1")]


async def test_delete_users_429_has_its_own_body_and_the_others_keep_the_envelope(moe):
    # MoEngage documents Delete User's 429 outside the {"error": {...}} envelope every other
    # refusal uses: a title and a description (shared/reference/moengage-api.md §1.5).
    standin, client = moe
    assert (await call(client, f"/v1/customer/{WS}", customer("u1")))[0] == 200
    delete_429 = {"status": "fail", "title": "Rate limit exceeded", "description": "Exceeded rate limit for this url"}
    standin.plan(Planned(429, headers={"Retry-After": "7"}), Planned(429), Planned(429))
    resp = await client.post(f"/v1/customer/delete?app_id={WS}", data=orjson.dumps(deletion("u1")), headers=GOOD)
    assert (resp.status, await resp.json()) == (429, delete_429)
    assert resp.headers["Retry-After"] == "7"  # the plan's headers, as for any endpoint
    # Every data center's host, and refuse_all as well as plan.
    assert await call(client, f"/api-01/v1/customer/delete?app_id={WS}", deletion("u1")) == (429, delete_429)
    status, body = await call(client, f"/v1/customer/{WS}", customer("u2"))
    assert (status, body["error"]["type"], body["error"]["message"]) == (429, "RateLimitError", "Rate limit exceeded")
    standin.refuse_all(429)
    assert await call(client, f"/v1/customer/delete?app_id={WS}", deletion("u1")) == (429, delete_429)
    status, body = await call(client, f"/v1/customer/merge?app_id={WS}", {"merge_data": []})
    assert (status, body["error"]["type"]) == (429, "RateLimitError")
    standin.refuse_all(None)
    assert standin.deletions() == []
    assert (await call(client, f"/v1/customer/delete?app_id={WS}", deletion("u1")))[0] == 200
    assert standin.deletions() == [deletion("u1")]


async def test_a_merged_away_user_is_gone_and_the_retained_one_exists(moe):
    standin, client = moe
    assert (await call(client, f"/v1/customer/{WS}", customer("old")))[0] == 200
    merge = {"merge_data": [{"merged_user": "old", "retained_user": "new"}]}
    assert (await call(client, f"/v1/customer/merge?app_id={WS}", merge))[0] == 200
    assert standin.users() == {"new"}


async def test_delete_user_checks_auth_app_id_and_body_like_the_other_calls(moe):
    standin, client = moe
    path = f"/v1/customer/delete?app_id={WS}"
    assert (await call(client, path, deletion(), {**GOOD, "Authorization": basic_auth(WS, "nope")}))[0] == 401
    no_appkey = {"Authorization": basic_auth(WS, KEY), "Content-Type": "application/json"}
    assert (await call(client, path, deletion(), no_appkey))[0] == 401
    status, body = await call(client, "/v1/customer/delete?app_id=OTHER", deletion())
    assert (status, body["error"]["type"]) == (409, "Authentication required.")
    status, body = await call(client, "/v1/customer/delete", deletion())
    assert (status, body["error"]["type"]) == (400, "InvalidParams")
    # Delete User answers an app id it does not serve with a 403, where the others answer 400.
    status, body = await call(client, f"/api-02{path}", deletion())
    assert (status, body["error"]["message"]) == (403, "given app_id is invalid/blocked")
    status, body = await call(client, path, {"identity_type": "customer_id"})
    assert (status, body["error"]["type"]) == (400, "MissingAttributeError")
    status, body = await call(client, path, {"identity_type": "email", "identity_value": "a@b.co"})
    assert (status, body["error"]["type"]) == (400, "InvalidParams")
    assert standin.deletions() == []


async def test_a_suspended_account_is_refused_as_each_endpoint_documents(moe):
    standin, client = moe
    standin.suspended = True
    merge = {"merge_data": [{"merged_user": "old", "retained_user": "new"}]}
    answers = {
        f"/v1/customer/{WS}": (customer(), 403, "Account Suspended"),
        f"/v1/event/{WS}": (event(), 403, "Account Suspended"),
        f"/v1/device/{WS}": (device_item(), 403, "Account Suspended"),
        f"/v1/transition/{WS}": ({"type": "transition", "elements": [customer()]}, 403, "Account Suspended"),
        # Merge User's suspended account is a 400; Delete User's blocked app id a 403.
        f"/v1/customer/merge?app_id={WS}": (merge, 400, "Account Suspended"),
        f"/v1/customer/delete?app_id={WS}": (deletion(), 403, "InvalidParams"),
    }
    for path, (body, status, kind) in answers.items():
        got, answer = await call(client, path, body)
        assert (got, answer["status"], answer["error"]["type"]) == (status, "fail", kind), path
    # Credentials are checked first: a wrong key is still a 401.
    assert (await call(client, f"/v1/customer/{WS}", customer(), {**GOOD, "Authorization": basic_auth(WS, "x")}))[
        0
    ] == 401
    assert standin.customers() == [] and standin.merges() == [] and standin.deletions() == []
    standin.suspended = False
    assert (await call(client, f"/v1/customer/merge?app_id={WS}", merge))[0] == 200


async def test_track_device_adds_a_device_to_a_user_it_has_and_records_it(moe):
    standin, client = moe
    assert (await call(client, f"/v1/customer/{WS}", customer()))[0] == 200
    status, body = await call(client, f"/v1/device/{WS}", device_item())
    assert (status, body["status"]) == (200, "success")
    assert standin.devices() == [device_item()]
    assert standin.requests[-1].path == f"/v1/device/{WS}"
    # Another data center's host does not know the workspace, as for every endpoint.
    status, answer = await call(client, f"/api-02/v1/device/{WS}", device_item())
    assert (status, answer["error"]["type"]) == (400, "InvalidParams")


async def test_a_device_of_a_user_moengage_does_not_have_is_accepted_and_never_made(moe):
    """MoEngage creates devices for existing users only: the call is accepted (it is
    processed later) and no device is made, alone or in a Bulk Import before its user."""
    standin, client = moe
    assert (await call(client, f"/v1/device/{WS}", device_item("u1")))[0] == 200
    elements = [device_item("u2"), customer("u2"), customer("u3"), device_item("u3")]
    assert (await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": elements}))[0] == 200
    assert standin.devices() == [device_item("u3")]
    assert [(i.reason, i.item["customer_id"]) for i in standin.ignored] == [
        ("no_such_user", "u1"),
        ("no_such_user", "u2"),
    ]
    assert standin.requests[-1].body["elements"] == elements


async def test_update_existing_only_keeps_nothing_for_a_user_moengage_does_not_have(moe):
    """With ``update_existing_only: true`` MoEngage creates no user: a Track User or Create
    Event item for an unknown customer_id is accepted and dropped, alone or in a Bulk
    Import; for a user it has, the item counts as without the flag."""
    standin, client = moe
    only = {"update_existing_only": True}
    assert (await call(client, f"/v1/customer/{WS}", {**customer("u1"), **only}))[0] == 200
    assert (await call(client, f"/v1/event/{WS}", {**event("u1"), **only}))[0] == 200
    assert standin.customers() == [] and standin.events() == [] and "u1" not in standin.users()
    elements = [{**event("u2"), **only}, customer("u2"), {**event("u2"), **only}, {**customer("u3"), **only}]
    assert (await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": elements}))[0] == 200
    assert standin.customers() == [customer("u2")] and standin.events() == [{**event("u2"), **only}]
    assert [(i.reason, i.item["type"], i.item["customer_id"]) for i in standin.ignored] == [
        ("no_such_user", "customer", "u1"),
        ("no_such_user", "event", "u1"),
        ("no_such_user", "event", "u2"),
        ("no_such_user", "customer", "u3"),
    ]
    # The flag set to false creates the user as usual.
    assert (await call(client, f"/v1/customer/{WS}", {**customer("u4"), "update_existing_only": False}))[0] == 200
    assert "u4" in standin.users()


INCOMPLETE_DEVICES = pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"push_id": "t"}, "attributes.platform is not found in the payload"),
        ({"platform": "iOS"}, "attributes.push_id is not found in the payload"),
        ({"platform": "iOS", "push_id": ""}, "attributes.push_id is not found in the payload"),
        (None, "attributes.platform is not found in the payload"),
    ],
)


def incomplete_device(attributes):
    return (
        {"type": "device", "customer_id": "u1"} if attributes is None else {**device_item(), "attributes": attributes}
    )


@INCOMPLETE_DEVICES
async def test_a_device_without_platform_or_push_id_is_400_missing_attribute_error(moe, attributes, message):
    standin, client = moe
    await call(client, f"/v1/customer/{WS}", customer())
    status, answer = await call(client, f"/v1/device/{WS}", incomplete_device(attributes))
    assert (status, answer["error"]["type"]) == (400, "MissingAttributeError")
    assert answer["error"]["message"] == message
    assert standin.devices() == [] and len(standin.customers()) == 1


@INCOMPLETE_DEVICES
async def test_a_device_element_without_platform_or_push_id_is_dropped_from_its_bulk_import(moe, attributes, message):
    standin, client = moe
    item = incomplete_device(attributes)
    body = {"type": "transition", "elements": [customer(), item]}
    assert (await call(client, f"/v1/transition/{WS}", body))[0] == 200
    assert standin.devices() == [] and standin.customers() == [customer()]
    assert [(i.reason, i.item, i.detail) for i in standin.ignored] == [("malformed", item, f"elements[1].{message}")]


async def test_error_bodies_carry_moengages_own_types_and_attributes(moe):
    """As MoEngage's spec examples write them (api-evangelist/moengage, openapi user and bulk
    files): a test against the stand-in reads the same body as one against MoEngage."""
    _standin, client = moe
    # Bulk Import's invalid element type and empty elements name the attribute at fault.
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": [{"type": "x"}]})
    assert (status, body["error"]["type"], body["error"]["attribute"]) == (400, "AttributeError", "type")
    assert body["error"]["message"] == "'type in elements should be customer/event/device"
    status, body = await call(client, f"/v1/transition/{WS}", {"type": "transition", "elements": []})
    assert (status, body["error"]["type"], body["error"]["attribute"]) == (400, "MissingAttributeError", "elements")
    assert body["error"]["message"] == "'elements cannot be empty array"
    # Every endpoint's 401 and 409 are of type "Authentication required".
    status, body = await call(client, f"/v1/customer/{WS}", customer(), {**GOOD, "Authorization": basic_auth(WS, "x")})
    assert (status, body["error"]["type"]) == (401, "Authentication required")
    status, body = await call(client, "/v1/customer/OTHER", customer())
    assert (status, body["error"]["type"]) == (409, "Authentication required.")
    # Delete User's 400 for a user it does not have is of type "Not Found".
    status, body = await call(client, f"/v1/customer/delete?app_id={WS}", deletion("nobody"))
    assert (status, body["error"]["type"]) == (400, "Not Found")


@pytest.mark.parametrize("status", [500, 503])
async def test_delete_users_5xx_has_a_title_and_description_as_its_429(moe, status):
    standin, client = moe
    standin.plan(Planned(status))
    assert await call(client, f"/v1/customer/delete?app_id={WS}", deletion("u1")) == (
        status,
        {"status": "fail", "title": "Internal Error", "description": "Please contact the MoEngage team."},
    )
    standin.plan(Planned(status))
    code, body = await call(client, f"/v1/customer/{WS}", customer())
    assert (code, body["status"], "error" in body) == (status, "fail", True)  # the others keep the envelope


async def test_merge_and_content_type_refusals_read_as_moengages(moe):
    _standin, client = moe
    pairs = {"merge_data": [{"merged_user": f"old-{n}-" + "x" * 3000, "retained_user": f"new-{n}"} for n in range(45)]}
    status, body = await call(client, f"/v1/customer/merge?app_id={WS}", pairs)
    assert (status, body["error"]["message"]) == (413, "The payload can not exceed 128KB")
    status, body = await call(client, f"/v1/event/{WS}", event(), {**GOOD, "Content-Type": "text/plain"})
    assert (status, body["error"]["message"]) == (415, "Unsupported Media Type")
