"""MoEngage Streams -> Segment end to end, the loop guard, and the cross-region guard."""

from __future__ import annotations

import asyncio
import copy
import gzip
import hashlib
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from structlog.testing import capture_logs

from bridge.cli import main as cli_main
from bridge.config.model import build_config
from bridge.destinations.base import ConfigError
from bridge.testing.standins import Planned
from tests.e2e.harness import (
    ADMIN_TOKEN,
    SEGMENT_OUT_KEY,
    STREAMS_PASSWORD,
    STREAMS_USER,
    WRITE_KEY,
    basic,
    config_dict,
    depth,
    nested,
    raw_post,
    wait_until,
)
from tests.e2e.test_operations import metric

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = basic(STREAMS_USER, STREAMS_PASSWORD)
PATH = "/moengage/streams/streams-main"

USER_ATTRS = {"moengage_user_id": "moe_internal_user_id", "user_attr_1": "user_attr_val1"}
DEVICE_ATTRS = {"moengage_device_id": "moe_internal_device_id", "device_attr_1": "device_attr_val1"}


def seed_payload() -> dict[str, Any]:
    """Seed 004's example request, with distinct event_uuids as real traffic has."""
    base = {
        "event_time": 1580967474,
        "event_type": "CAMPAIGN_EVENT",
        "event_source": "MOENGAGE",
        "uid": "<MoEngage customer_id>",
        "user_attributes": dict(USER_ATTRS),
        "device_attributes": dict(DEVICE_ATTRS),
    }
    return {
        "app_name": "App Name",
        "source": "MOENGAGE",
        "moe_request_id": "req-1",
        "events": [
            {
                **base,
                "event_name": "Notification Received Android",
                "event_code": "NOTIFICATION_RECEIVED_MOE",
                "event_uuid": "uuid-push-1",
                "push_id": "recipient device's push token",
                "event_attributes": {
                    "campaign_id": "353df897hkbh67658",
                    "campaign_name": "Name of the Campaign",
                    "campaign_type": "Smart Trigger",
                    "campaign_channel": "Push",
                },
            },
            {
                **base,
                "event_name": "Email Sent",
                "event_code": "MOE_EMAIL_SENT",
                "event_uuid": "uuid-email-1",
                "email_id": "recipient email_id",
                "event_attributes": {
                    "campaign_id": "353df897hkbh67658",
                    "campaign_name": "Name of the Campaign",
                    "campaign_type": "General",
                    "campaign_channel": "Email",
                },
            },
            {
                **base,
                "event_name": "SMS Delivered",
                "event_code": "SMS_DELIVERED",
                "event_uuid": "uuid-sms-1",
                "mobile_number": "recipient mobile number",
                "event_attributes": {
                    "campaign_id": "353df897hkbh67658",
                    "campaign_name": "Name of the Campaign",
                    "campaign_type": "Smart Trigger",
                    "campaign_channel": "SMS",
                },
            },
        ],
    }


def without_time(event: dict[str, Any]) -> dict[str, Any]:
    out = dict(event)
    out.pop("timestamp", None)
    return out


async def test_seed_payload_end_to_end(bridge):
    status, data = await bridge.post(PATH, seed_payload(), AUTH)
    assert (status, data) == (200, {"success": True})
    seg = bridge.segment
    await seg.wait_for(lambda: len(seg.events()) == 3)

    assert len(seg.requests) >= 1
    request = seg.requests[0]
    assert request.path == "/v1/batch"
    assert request.headers["Authorization"] == basic(SEGMENT_OUT_KEY)["Authorization"]
    assert set(request.body) == {"batch", "sentAt", "writeKey"}
    assert request.body["writeKey"] == SEGMENT_OUT_KEY
    datetime.fromisoformat(request.body["sentAt"])

    push = next(e for e in seg.events() if e["messageId"] == "uuid-push-1")
    assert datetime.fromisoformat(push["timestamp"]) == datetime.fromtimestamp(1580967474, UTC)
    assert without_time(push) == {
        "type": "track",
        "event": "Notification Received Android",
        "userId": "<MoEngage customer_id>",
        "messageId": "uuid-push-1",
        "properties": {
            "campaign_id": "353df897hkbh67658",
            "campaign_name": "Name of the Campaign",
            "campaign_type": "Smart Trigger",
            "campaign_channel": "Push",
            "event_code": "NOTIFICATION_RECEIVED_MOE",
            "event_type": "CAMPAIGN_EVENT",
            "push_id": "recipient device's push token",
        },
        "context": {
            "traits": USER_ATTRS,
            "device": {
                "id": "moe_internal_device_id",
                "device_attr_1": "device_attr_val1",
                "token": "recipient device's push token",
            },
            "integration": {"name": "segment-moengage-bridge", "version": "1"},
        },
        "integrations": {"MoEngage": False, "MoEngage (Actions)": False, "Moengage (Actions)": False},
    }
    email = next(e for e in seg.events() if e["messageId"] == "uuid-email-1")
    assert email["event"] == "Email Sent" and email["properties"]["email_id"] == "recipient email_id"
    sms = next(e for e in seg.events() if e["messageId"] == "uuid-sms-1")
    assert sms["properties"]["mobile_number"] == "recipient mobile number"


async def test_single_event_variant_and_time_formats(bridge):
    one = seed_payload()["events"][1]
    for i, t in enumerate((1580967474123, "2020-02-06T05:37:54Z")):
        body = {
            "app_name": "App",
            "export_doc_id": f"doc-{i}",
            "event": dict(one, event_uuid=f"single-{i}", event_time=t),
        }
        assert (await bridge.post(PATH, body, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 2)
    for e in bridge.segment.events():
        assert datetime.fromisoformat(e["timestamp"]).replace(microsecond=0) == datetime.fromtimestamp(1580967474, UTC)


async def test_a_single_event_beside_a_null_events_array_is_taken(bridge):
    """A sender that writes every field of its payload class sends one event as
    {"events": null, "event": {...}}: a 400 there (MoEngage retries it, then drops it)
    lost the event, while {"events": [...], "event": null} was read."""
    one = dict(seed_payload()["events"][1], event_uuid="beside-null-events")
    body = {"app_name": "App", "export_doc_id": "doc-n", "events": None, "event": one}
    status, data = await bridge.post(PATH, body, AUTH)
    assert (status, data) == (200, {"success": True}), data
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)
    assert bridge.segment.events()[0]["messageId"] == "beside-null-events"
    status, data = await bridge.post(PATH, {"app_name": "App", "events": None}, AUTH)
    assert (status, data["code"]) == (400, "invalid_payload"), data


async def test_event_codes_without_names_are_named(bridge):
    named = {
        "MOE_EMAIL_SENT": "Email Sent",
        "MOE_EMAIL_OPEN": "Email Opened",
        "n_i_s": "Notification Sent iOS",
        "NOTIFICATION_CLICKED_WEB_MOE": "Notification Clicked Web",
        "SMS_DELIVERED": "SMS Delivered",
        "MOE_CARD_CLICKED": "Card Clicked",
        "USER_ENTERED_FLOW": "User Entered Flow",
    }
    codes = [
        "MOE_EMAIL_SENT",
        "MOE_EMAIL_DEFERRED",
        "MOE_EMAIL_DELIVERED",
        "MOE_EMAIL_DROP",
        "MOE_EMAIL_HARD_BOUNCE",
        "MOE_EMAIL_SOFT_BOUNCE",
        "MOE_EMAIL_OPEN",
        "MOE_EMAIL_CLICK",
        "MOE_EMAIL_UNSUBSCRIBE",
        "MOE_EMAIL_SPAM",
        "SMS_SENT",
        "SMS_DELIVERED",
        "NOTIFICATION_RECEIVED_MOE",
        "NOTIFICATION_CLICKED_MOE",
        "NOTIFICATION_CLEARED_MOE",
        "n_i_s",
        "NOTIFICATION_CLICKED_IOS_MOE",
        "NOTIFICATION_RECEIVED_WEB_MOE",
        "NOTIFICATION_CLICKED_WEB_MOE",
        "MOE_CONNECTOR_SENT",
        "MOE_CARD_SENT",
        "MOE_CARD_DELIVERED",
        "MOE_CARD_VIEWED",
        "MOE_CARD_CLICKED",
        "MOE_IN_APP_SHOWN",
        "MOE_IN_APP_CLICKED",
        "MOE_IN_APP_DISMISSED",
        "MOE_ONSITE_MESSAGE_SHOWN",
        "MOE_ONSITE_MESSAGE_CLICKED",
        "MOE_ONSITE_MESSAGE_DISMISSED",
        "USER_ENTERED_FLOW",
        "USER_EXITED_FLOW",
        "MOE_CAMPAIGN_CONTROL_GROUP",
    ]
    events = [
        {
            "event_code": c,
            "event_uuid": f"code-{c}",
            "event_time": 1580967474,
            "uid": "cust-1",
            "event_type": "CAMPAIGN_EVENT",
        }
        for c in codes
    ]
    events.append(
        {
            "event_name": "Added To Cart",
            "event_code": "Added To Cart",
            "event_uuid": "ua-1",
            "event_time": 1580967474,
            "uid": "cust-1",
            "event_type": "USER_ACTION_EVENT",
            "event_attributes": {"sku": "A1"},
        }
    )
    assert (await bridge.post(PATH, {"app_name": "A", "events": events}, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == len(events), timeout=10)
    by_id = {e["messageId"]: e for e in bridge.segment.events()}
    for code in codes:
        name = by_id[f"code-{code}"]["event"]
        assert name and name != code, f"{code} has no name"
    for code, name in named.items():
        assert by_id[f"code-{code}"]["event"] == name
    user_action = by_id["ua-1"]
    assert user_action["event"] == "Added To Cart" and user_action["properties"]["sku"] == "A1"


async def test_anonymous_id_when_uid_is_absent(bridge):
    event = dict(seed_payload()["events"][0], event_uuid="anon-uuid")
    del event["uid"]
    assert (await bridge.post(PATH, {"events": [event]}, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)
    sent = bridge.segment.events()[0]
    assert "userId" not in sent and sent["anonymousId"] == "moe_internal_user_id"


async def test_a_blank_or_odd_uid_and_a_far_future_time_never_reach_segment_as_such(bridge):
    blank = dict(seed_payload()["events"][0], event_uuid="blank-uid", uid="   ")
    odd = dict(seed_payload()["events"][0], event_uuid="odd-uid", uid={"a": 1})
    future = dict(seed_payload()["events"][0], event_uuid="far-future", event_time="9999-12-31T23:59:59Z")
    status, data = await bridge.post(PATH, {"events": [blank, odd, future]}, AUTH)
    assert status == 200 and data["accepted"] == 2, data
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [(2, "invalid_event_time")]
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 2)
    # A uid that is no id is no user: MoEngage's own id stands in, as for an absent one.
    for sent in bridge.segment.events():
        assert "userId" not in sent and sent["anonymousId"] == "moe_internal_user_id", sent


async def test_same_payload_twice_is_forwarded_once(bridge):
    payload = seed_payload()
    assert (await bridge.post(PATH, payload, AUTH))[0] == 200
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200 and data["duplicates"] == 3
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    await asyncio.sleep(0.3)
    assert len(bridge.segment.events()) == 3


async def test_an_empty_streams_batch_is_accepted_and_stores_nothing(bridge):
    """{"events": []}, as a connectivity check sends: refused (400 empty_batch), MoEngage
    retried it and reported the endpoint as failing. It is an accepted batch of nothing."""
    _, before = await bridge.get("/metrics")
    empty: list[dict[str, Any]] = [{"events": []}, {"events": [], "event": None}]
    for payload in empty:
        assert await bridge.post(PATH, payload, AUTH) == (200, {"success": True})
        assert await bridge.post(PATH + "/", payload, AUTH) == (200, {"success": True})
        # Still only for a caller the source lets in.
        assert (await bridge.post(PATH, payload))[0] == 401
    wrong: list[dict[str, Any]] = [{"events": "x"}, {"events": {}}, {"events": 1}]
    for payload in wrong:
        status, data = await bridge.post(PATH, payload, AUTH)
        assert (status, data["code"]) == (400, "invalid_payload"), data
    _, after = await bridge.get("/metrics")
    received = {"source": "streams-main"}
    assert metric(after, "bridge_events_received_total", **received) == metric(
        before, "bridge_events_received_total", **received
    )
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert [d["queue_depth"] for d in status_body["destinations"]] == [0] * len(status_body["destinations"])
    await asyncio.sleep(0.2)
    assert bridge.segment.requests == []


async def test_a_trailing_slash_is_the_same_route(bridge):
    """A URL pasted into the dashboard with a slash at its end got a 404, so every batch was
    lost after MoEngage's retries; a redirect would not do, as many senders do not follow one
    on a POST. Same credentials, same answers, same metrics label."""
    slash = PATH + "/"
    assert await bridge.post(slash, seed_payload(), AUTH) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    status, data = await bridge.post(slash, seed_payload(), AUTH)
    assert status == 200 and data["duplicates"] == 3  # one route, one source: deduplicated across both
    assert await bridge.post(slash, seed_payload()) == await bridge.post(PATH, seed_payload())
    assert (await bridge.post(slash, seed_payload()))[0] == 401
    wrong = basic(STREAMS_USER, "wrong")
    assert await bridge.post(slash, seed_payload(), wrong) == await bridge.post(PATH, seed_payload(), wrong)
    nope = "/moengage/streams/nope"
    assert await bridge.post(nope + "/", seed_payload(), AUTH) == await bridge.post(nope, seed_payload(), AUTH)
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_http_requests_total{route="/moengage/streams/{source}",status="200"} 2.0' in metrics, metrics
    assert 'route="/moengage/streams/{source}/"' not in metrics


async def test_an_event_without_event_uuid_is_relayed_with_an_id_from_its_content(bridge):
    """Refused (event_uuid_required), such an event was lost. It gets a deterministic id, so
    MoEngage's retry of the same request is deduplicated, not delivered twice."""
    payload = seed_payload()
    payload["events"][1].pop("event_uuid")
    payload["events"][2]["event_uuid"] = None
    sent = [copy.deepcopy(payload["events"][i]) for i in (1, 2)]
    status, data = await bridge.post(PATH, payload, AUTH)
    assert (status, data) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    expected = ["moe-h-" + hashlib.sha256(orjson.dumps(e, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32] for e in sent]
    by_name = {e["event"]: e["messageId"] for e in bridge.segment.events()}
    assert [by_name["Email Sent"], by_name["SMS Delivered"]] == expected
    assert by_name["Notification Received Android"] == "uuid-push-1"
    # MoEngage's retry, its members in another order: the same ids, so nothing new is sent.
    retried = seed_payload()
    retried["events"][1].pop("event_uuid")
    retried["events"][2]["event_uuid"] = None
    retried["events"] = [{k: e[k] for k in reversed(list(e))} for e in retried["events"]]
    status, data = await bridge.post(PATH, retried, AUTH)
    assert status == 200 and data["duplicates"] == 3, data
    await asyncio.sleep(0.3)
    assert len(bridge.segment.events()) == 3


async def test_an_event_without_event_time_is_relayed_timed_when_the_bridge_received_it(bridge):
    """Refused (event_time_required), such an event was lost: alone in its request, the 400
    was retried by MoEngage and then dropped; beside others, it was listed in a 200 MoEngage
    never reads. Segment's own Tracking API times a call without a timestamp when it gets
    it; the bridge does the same, once, so its retries and MoEngage's resends agree."""
    payload = seed_payload()
    del payload["events"][1]["event_time"]
    payload["events"][2]["event_time"] = None
    lone = dict(seed_payload()["events"][0], event_uuid="lone-no-time", event_time="")
    before = datetime.now(UTC).replace(microsecond=0)
    assert await bridge.post(PATH, payload, AUTH) == (200, {"success": True})
    assert await bridge.post(PATH, {"events": [lone]}, AUTH) == (200, {"success": True})
    after = datetime.now(UTC)
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 4)
    times = {e["messageId"]: datetime.fromisoformat(e["timestamp"]) for e in bridge.segment.events()}
    assert times.pop("uuid-push-1") == datetime.fromtimestamp(1580967474, UTC)
    assert all(before <= t <= after for t in times.values()), times
    # MoEngage's resend of the same request: duplicates, not new events at a new time.
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200 and data["duplicates"] == 3, data


async def test_streams_auth_json_and_validation_errors(bridge):
    status, data = await bridge.post(PATH, seed_payload())
    assert (status, data["code"]) == (401, "unauthorized")
    status, data = await bridge.post(PATH, seed_payload(), basic(STREAMS_USER, "wrong"))
    assert (status, data["code"]) == (401, "unauthorized")
    status, data = await bridge.post("/moengage/streams/nope", seed_payload(), AUTH)
    assert status == 401
    # A wrong credential and an unknown source name get one answer: no name can be probed.
    assert await bridge.post(PATH, seed_payload()) == await bridge.post("/moengage/streams/nope", seed_payload())
    status, data = await bridge.post(PATH, None, AUTH, raw=b"{not json")
    assert (status, data["code"]) == (400, "invalid_json")
    payload = seed_payload()
    payload["events"][1]["event_uuid"] = " "
    payload["events"][2]["event_time"] = "when?"
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200 and data["accepted"] == 1
    assert [(r["index"], r["code"]) for r in data["rejected"]] == [
        (1, "event_uuid_required"),
        (2, "invalid_event_time"),
    ]


async def test_one_half_emoji_does_not_cost_a_streams_batch_its_other_events(bridge):
    """A 400 for a whole Streams request is retried three times by MoEngage, then dropped:
    one lone surrogate escape lost every event of the batch. It becomes U+FFFD instead."""
    payload = seed_payload()
    raw = orjson.dumps(payload).replace(b"recipient device's push token", b"cut \\ud83d here")
    assert b"\\ud83d" in raw
    status, data = await bridge.post(PATH, None, {**AUTH, "Content-Type": "application/json"}, raw=raw)
    assert status == 200 and data.get("accepted", len(payload["events"])) == len(payload["events"]), data
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == len(payload["events"]), timeout=10)
    pushes = [e for e in bridge.segment.events() if e["messageId"] == "uuid-push-1"]
    assert [e["properties"]["push_id"] for e in pushes] == ["cut \ufffd here"]


async def test_a_streams_request_past_max_batch_events_keeps_its_first_events(make_bridge):
    """MoEngage resends a refused request as it is, a few times, then drops it: a 400 for
    one event too many cost every event of the batch. As the Tracking API does: 200, the
    first max_batch_events taken, those past them rejected in one entry at the first's index."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["max_batch_events"] = 3

    bridge = await make_bridge(tweak)
    payload = seed_payload()
    first = [e["event_uuid"] for e in payload["events"]]
    assert len(first) == 3
    payload["events"] += [{**payload["events"][0], "event_uuid": f"too-many-{i}"} for i in range(2)]
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200 and data["accepted"] == 3, data
    [entry] = data["rejected"]
    assert (entry["index"], entry["code"]) == (3, "too_many_events"), entry
    assert "5 events; the first 3 are taken" in entry["message"]
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    assert sorted(e["messageId"] for e in bridge.segment.events()) == sorted(first)
    _, metrics = await bridge.get("/metrics", ADMIN)
    assert 'bridge_events_rejected_total{code="too_many_events",source="streams-main"} 2.0' in metrics


@pytest.mark.parametrize(
    ("auth", "headers", "status"),
    [
        ({"type": "header", "header": "X-Api-Key", "value": "k-123456"}, {"X-Api-Key": "k-123456"}, 200),
        ({"type": "header", "header": "X-Api-Key", "value": "k-123456"}, {"X-Api-Key": "k-12345"}, 401),
        (
            {"type": "header", "header": "Authorization", "value": "Bearer tok-9"},
            {"Authorization": "Bearer tok-9"},
            200,
        ),
        ({"type": "none"}, {}, 200),
    ],
)
async def test_streams_auth_kinds(make_bridge, auth, headers, status):
    def tweak(raw: dict[str, Any]) -> None:
        raw["sources"][2]["auth"] = auth

    bridge = await make_bridge(tweak)
    got, _ = await bridge.post(PATH, seed_payload(), headers)
    assert got == status


async def test_allow_ips(make_bridge):
    def outside(raw: dict[str, Any]) -> None:
        raw["sources"][2]["allow_ips"] = ["10.20.0.0/16"]

    bridge = await make_bridge(outside)
    status, data = await bridge.post(PATH, seed_payload(), AUTH)
    assert (status, data["code"]) == (401, "unauthorized")
    await bridge.stop()
    bridge.raw["sources"][2]["allow_ips"] = ["127.0.0.0/8", "::1/128"]
    await bridge.start()
    assert (await bridge.post(PATH, seed_payload(), AUTH))[0] == 200


async def test_allow_ips_behind_a_trusted_proxy(make_bridge):
    """Behind a load balancer the peer is the proxy; the client is in X-Forwarded-For."""

    def behind_proxy(raw: dict[str, Any]) -> None:
        raw["sources"][2]["allow_ips"] = ["10.20.0.0/16"]

    bridge = await make_bridge(behind_proxy)
    # The peer (loopback) is not a trusted proxy yet, so its X-Forwarded-For is not believed.
    status, data = await bridge.post(PATH, seed_payload(), {**AUTH, "X-Forwarded-For": "10.20.3.4"})
    assert (status, data["code"]) == (401, "unauthorized")
    await bridge.stop()
    bridge.raw["server"]["trusted_proxies"] = ["127.0.0.0/8", "::1/128"]
    await bridge.start()
    assert (await bridge.post(PATH, seed_payload(), {**AUTH, "X-Forwarded-For": "10.20.3.4"}))[0] == 200
    # A forged first hop does not help: the proxy saw 198.51.100.9 (which only the log names).
    with capture_logs() as logs:
        status, data = await bridge.post(PATH, seed_payload(), {**AUTH, "X-Forwarded-For": "10.20.3.4, 198.51.100.9"})
    assert (status, data["code"]) == (401, "unauthorized") and "198.51.100.9" not in data["message"]
    [refused] = [e for e in logs if e["event"] == "streams_request_refused"]
    assert (refused["reason"], refused["client"]) == ("ip_not_allowed", "198.51.100.9")
    # Without the header the proxy itself is the client, and it is not allowed.
    assert (await bridge.post(PATH, seed_payload(), AUTH))[0] == 401


async def test_an_outsider_cannot_tell_a_source_name_from_an_unknown_one(make_bridge):
    """From an address outside allow_ips, with a malformed Basic header, or for a name that
    does not exist, the answer is the wrong-credentials answer, byte for byte: a 403 for
    allow_ips (and a 401 with another code for a malformed header) told an outsider which
    source names exist. The real reason is in the log, without the credentials."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["sources"][2]["allow_ips"] = ["10.20.0.0/16"]
        open_source = {**raw["sources"][2], "name": "streams-open"}
        del open_source["allow_ips"]
        raw["sources"].append(open_source)

    bridge = await make_bridge(tweak)
    assert bridge.client is not None

    async def answer(path: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        assert bridge.client is not None
        resp = await bridge.client.post(path, data=orjson.dumps(seed_payload()), headers=headers)
        kept = {k: v for k, v in resp.headers.items() if k != "Date"}
        return resp.status, await resp.read(), kept

    malformed = {"Authorization": "Basic !!not-base64!!"}
    with capture_logs() as logs:
        wrong = await answer("/moengage/streams/streams-open", basic(STREAMS_USER, "wrong"))
        assert wrong[0] == 401 and orjson.loads(wrong[1])["code"] == "unauthorized", wrong
        assert (await answer("/moengage/streams/streams-open", AUTH))[0] == 200
        refused = [
            await answer(PATH, AUTH),  # the right credentials, from outside allow_ips
            await answer(PATH, basic(STREAMS_USER, "wrong")),
            await answer("/moengage/streams/nope", AUTH),
            await answer("/moengage/streams/nope", {}),
            await answer("/moengage/streams/streams-open", malformed),
            await answer("/moengage/streams/nope", malformed),
        ]
    assert refused == [wrong] * len(refused)
    reasons = [(e["source"], e["reason"]) for e in logs if e["event"] == "streams_request_refused"]
    assert reasons == [
        ("streams-open", "wrong_credentials"),
        ("streams-main", "ip_not_allowed"),
        ("streams-main", "ip_not_allowed"),
        ("nope", "unknown_source"),
        ("nope", "unknown_source"),
        ("streams-open", "malformed_authorization"),
        ("nope", "unknown_source"),
    ]
    assert STREAMS_PASSWORD not in repr(logs)


async def test_a_client_that_sends_basic_credentials_only_when_challenged_gets_in(bridge):
    """RFC 7235 §3.1: a 401 carries a WWW-Authenticate challenge. A client that sends its
    credentials only in answer to one (urllib's HTTPBasicAuthHandler here; Apache HttpClient
    by default) got a bare 401 and never sent them: every batch refused."""
    url = bridge.url + PATH

    def post() -> int:
        passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        passwords.add_password(None, url, STREAMS_USER, STREAMS_PASSWORD)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPBasicAuthHandler(passwords)
        )
        request = urllib.request.Request(
            url, data=orjson.dumps(seed_payload()), headers={"Content-Type": "application/json"}, method="POST"
        )
        with opener.open(request, timeout=10) as resp:
            status: int = resp.status
            return status

    assert await asyncio.to_thread(post) == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    # The challenge names both schemes, for an unknown name too: it tells no source from another.
    assert bridge.client is not None
    for path in (PATH, "/moengage/streams/nope"):
        resp = await bridge.client.post(path, data=b"{}")
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="moengage-streams", Bearer realm="moengage-streams"'


def test_streams_auth_must_be_explicit(tmp_path: Path):
    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    del raw["sources"][2]["auth"]
    with pytest.raises(ConfigError, match=r"sources\[2\]\.auth: is required.*type: none"):
        build_config(raw)


def _write(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_cross_region_routes_are_refused_by_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    assert cli_main(["check", "--config", _write(tmp_path, raw)]) == 0

    eu_streams = copy.deepcopy(raw)
    eu_streams["sources"][2]["data_center"] = "02"
    assert cli_main(["check", "--config", _write(tmp_path, eu_streams)]) == 2
    err = capsys.readouterr().err
    assert "'streams-main' (region eu) -> 'segment-prod' (region us) crosses regions" in err
    assert "its users' data would leave region eu for region us" in err and "allow_cross_region" in err
    # Nothing on such a route is dropped by Segment (the destination's key and host agree),
    # so the refusal does not claim it: it guards where the data goes.
    assert "Segment silently drops" not in err

    eu_streams["sources"][2]["allow_cross_region"] = True
    assert cli_main(["check", "--config", _write(tmp_path, eu_streams)]) == 0

    to_india = copy.deepcopy(raw)
    to_india["destinations"][0]["data_center"] = "03"
    with pytest.raises(ConfigError, match=r"'web' \(region us\) -> 'moengage-main' \(region in\)"):
        build_config(to_india)

    unknown = copy.deepcopy(raw)
    unknown["destinations"][2]["region"] = "apac"
    with pytest.raises(ConfigError, match=r"destinations\[2\]"):
        build_config(unknown)


@pytest.mark.parametrize("value", [SEGMENT_OUT_KEY + "\n", SEGMENT_OUT_KEY + " ", " " + SEGMENT_OUT_KEY])
def test_a_destination_write_key_with_whitespace_is_refused_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
):
    """A secret file's line break, inside the quoted "${SEGMENT_WRITE_KEY}", became a
    trailing space in the key: Segment answers 200 to a key it does not know and drops
    every event, so nothing anywhere said that no Streams event was arriving."""
    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["destinations"][2]["write_key"] = "${SEGMENT_WRITE_KEY}"
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw).replace("${SEGMENT_WRITE_KEY}", '"${SEGMENT_WRITE_KEY}"'))
    monkeypatch.setenv("SEGMENT_WRITE_KEY", SEGMENT_OUT_KEY)
    assert cli_main(["check", "--config", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SEGMENT_WRITE_KEY", value)
    assert cli_main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "destinations[2].write_key: starts or ends with whitespace" in err, err
    assert SEGMENT_OUT_KEY not in err


async def test_relayed_events_do_not_loop_back_to_moengage(bridge):
    assert (await bridge.post(PATH, seed_payload(), AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    relayed = copy.deepcopy(bridge.segment.events())
    # Segment would route these to MoEngage unless told not to; a stripped integrations
    # object must not matter: the context mark is enough.
    for e in relayed[1:]:
        e.pop("integrations", None)
    control = {"type": "track", "userId": "u-control", "event": "Control", "messageId": "control-1"}
    status, data = await bridge.post("/v1/batch", {"batch": [*relayed, control], "writeKey": WRITE_KEY})
    assert status == 200, data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    await asyncio.sleep(0.2)
    assert [e["actions"][0]["action"] for e in bridge.moengage.events()] == ["Control"]

    async def loops() -> bool:
        _, found = await bridge.get("/admin/discards?reason=loop", ADMIN)
        return len(found["discards"]) == 2

    await wait_until(loops, what="loop discards")


async def test_an_oversize_event_is_dead_lettered_for_replay_while_the_batch_is_delivered(bridge):
    """Over Segment's 32 KB once mapped: never sent (Segment would refuse it), but kept
    where an operator sees it and can replay it, not discarded as if meant to be dropped."""
    payload = seed_payload()
    payload["events"][0]["event_attributes"]["blob"] = "x" * 40_000
    assert (await bridge.post(PATH, payload, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 2)

    async def dead_lettered() -> list[dict[str, Any]]:
        _, found = await bridge.get("/admin/dlq?reason=event_too_large", ADMIN)
        return list(found["dead_letters"])

    await wait_until(lambda: _nonempty(dead_lettered()), what="the event_too_large dead letter")
    [entry] = await dead_lettered()
    assert entry["message_id"] == payload["events"][0]["event_uuid"], entry
    _, full = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
    assert "x" * 1000 in orjson.dumps(full["request"]).decode(), "the refused item is shown"
    assert "event_too_large" in full["response_body"], full["response_body"]
    # By how much: what to trim before a replay, without measuring the request body.
    size = len(orjson.dumps(full["request"]))
    detail = f"the mapped track is {size} bytes, and Segment takes at most 32768 bytes an event"
    assert detail in full["response_body"], full["response_body"]
    assert {e["messageId"] for e in bridge.segment.events()} == {"uuid-email-1", "uuid-sms-1"}
    _, discards = await bridge.get("/admin/discards", ADMIN)
    assert discards["discards"] == []
    # Replayed as it is, it is refused again: the same dead letter comes back, not a loss.
    status, replayed = await bridge.post("/admin/dlq/replay", {"reason": "event_too_large"}, ADMIN)
    assert status == 200 and replayed["replayed"] == 1, replayed

    async def back_again() -> bool:
        return [e["id"] for e in await dead_lettered()] not in ([], [entry["id"]])

    await wait_until(back_again, what="the replayed event back in the DLQ")
    assert len(bridge.segment.events()) == 2


async def _nonempty(entries: Any) -> bool:
    return bool(await entries)


async def test_a_refused_batch_leaves_each_event_its_own_request_in_the_dlq(make_bridge):
    """Segment refuses a batch of three events for good: each dead letter keeps the batch
    its own event alone makes (without the write key), not the other two events."""

    def tweak(raw: dict[str, Any]) -> None:
        next(d for d in raw["destinations"] if d["name"] == "segment-prod")["guard"] = {"enabled": False}

    bridge = await make_bridge(tweak)
    bridge.segment.refuse_all(404)
    payload = seed_payload()
    assert (await bridge.post(PATH, payload, AUTH))[0] == 200

    async def dead_lettered() -> list[dict[str, Any]]:
        _, found = await bridge.get("/admin/dlq?destination=segment-prod", ADMIN)
        return list(found["dead_letters"])

    async def all_three() -> bool:
        return len(await dead_lettered()) == 3

    await wait_until(all_three, what="3 dead letters")
    assert bridge.segment.received == 1, "the three events went out in one batch"
    for entry in await dead_lettered():
        assert entry["reason"] == "http_404", entry
        _, full = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
        request = full["request"]  # parsed: valid JSON, in the batch call's shape
        assert isinstance(request, dict) and set(request) == {"batch", "sentAt"}, full
        assert [e["messageId"] for e in request["batch"]] == [entry["message_id"]], full


async def test_an_event_too_deep_to_store_is_rejected_by_index(bridge):
    """orjson parses 1024 levels but writes 254: such an event is bad input, not a 500."""
    deep = nested(300)
    payload = seed_payload()
    payload["events"] = payload["events"][:2]
    payload["events"][0]["event_attributes"] = deep
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200, data
    assert data["accepted"] == 1 and [(r["index"], r["code"]) for r in data["rejected"]] == [(0, "event_too_deep")]
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)


async def test_the_deepest_streams_event_ingest_takes_is_delivered_and_one_deeper_is_refused(bridge):
    """An event 252 levels deep (orjson writes 254, and a destination may nest what it maps
    two levels deeper) is delivered, its user attributes as the call's context.traits; one
    253 deep is refused by index at ingest rather than stored for a destination that
    nests deeper."""
    payload = seed_payload()
    payload["events"] = payload["events"][:2]
    deepest, deeper = payload["events"]
    deepest["user_attributes"] = nested(250)
    deeper["user_attributes"] = nested(251)
    assert (depth(deepest), depth(deeper)) == (252, 253)
    status, data = await bridge.post(PATH, payload, AUTH)
    assert status == 200, data
    assert data["accepted"] == 1 and [(r["index"], r["code"]) for r in data["rejected"]] == [(1, "event_too_deep")]
    assert "nested more than 252 levels deep" in data["rejected"][0]["message"], data
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)
    sent = bridge.segment.events()[0]
    assert sent["messageId"] == deepest["event_uuid"] and sent["context"]["traits"] == nested(250)


@pytest.mark.parametrize("auth", ["basic", "header"])
async def test_non_ascii_credentials_are_refused_not_crashed_on(make_bridge, auth):
    def tweak(raw: dict[str, Any]) -> None:
        if auth == "header":
            raw["sources"][2]["auth"] = {"type": "header", "header": "X-Api-Key", "value": "k-123"}

    bridge = await make_bridge(tweak)
    header = b"Authorization: Basic \xff\xfe" if auth == "basic" else b"X-Api-Key: k-\xff\xfe"
    status, data = await raw_post(bridge, PATH, header, orjson.dumps(seed_payload()))
    assert status == 401 and data["code"] in ("invalid_authorization", "unauthorized"), data


async def test_admin_translate_answers_for_a_streams_event_as_delivery_would(bridge):
    """A uid of `true` is dropped at ingest (MoEngage's own id stands in): the dry run
    must not answer with userId "true", which the bridge never sends."""
    event = {
        "event_uuid": "dry-1",
        "event_name": "Email Sent",
        "event_time": 1_700_000_000,
        "uid": True,
        "user_attributes": {"moengage_user_id": "moe-1"},
    }
    status, body = await bridge.post("/admin/translate?destination=segment-prod", [event, {"event_name": "E"}], ADMIN)
    assert status == 200, body
    sent, refused = body["results"]
    track = sent["outputs"][0]["body"]
    assert "userId" not in track and track["anonymousId"] == "moe-1", track
    assert refused["rejected"] == "id_required", refused  # no user; no time is no refusal
    # What the real path sends, for the same event.
    assert (await bridge.post(PATH, {"events": [event]}, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)
    delivered = bridge.segment.events()[0]
    assert "userId" not in delivered and delivered["anonymousId"] == "moe-1"


async def test_admin_translate_takes_a_captured_streams_request_body(bridge):
    """An operator pastes the request MoEngage sent (the envelope, not an event): each of
    its events is answered for, as the route takes them. Before, the envelope was read as
    one event and refused as event_uuid_required."""
    payload = seed_payload()
    status, body = await bridge.post("/admin/translate?destination=segment-prod", payload, ADMIN)
    assert status == 200, body
    names = [r["outputs"][0]["body"]["event"] for r in body["results"]]
    assert len(names) == len(payload["events"]) and "Notification Received Android" in names, body
    # The route's refusal of a whole body is one refused result, with its code.
    status, body = await bridge.post("/admin/translate?destination=segment-prod", {"events": "x"}, ADMIN)
    assert (status, body["results"]) == (200, [{"rejected": "invalid_payload", "detail": "`events` must be an array"}])
    # An empty batch, which the route accepts, has no events to answer for.
    status, body = await bridge.post("/admin/translate?destination=segment-prod", {"events": []}, ADMIN)
    assert (status, body["results"]) == (200, [])


def streams_events(n: int, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "events": [
            {
                "event_uuid": f"{prefix}-{i}",
                "event_name": "Email Sent",
                "event_code": "MOE_EMAIL_SENT",
                "event_time": 1580967474,
                "uid": f"user-{prefix}-{i}",
                **extra,
            }
            for i in range(n)
        ]
    }


@pytest.mark.parametrize("status", [410, 460])
async def test_a_410_or_460_from_segment_is_retried_as_segments_own_clients_retry_it(bridge, status):
    """Answered in passing by Segment's load balancers: retried, not dead-lettered, and
    no pause, however many events the request carried."""
    bridge.segment.plan(Planned(status))
    assert (await bridge.post(PATH, streams_events(30, f"lb{status}"), AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 30, timeout=10)
    _, body = await bridge.get("/admin/dlq", ADMIN)
    assert body["dead_letters"] == []
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert not next(d for d in status_body["destinations"] if d["name"] == "segment-prod")["paused"]


async def test_a_429_that_names_its_reset_only_in_x_ratelimit_reset_is_waited_out(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        for d in raw["destinations"]:
            d["retry"] = {"base_delay": 0.05, "max_delay": 0.3, "max_retry_after": 600}

    bridge = await make_bridge(tweak)
    bridge.segment.plan(Planned(429, headers={"X-RateLimit-Reset": "2"}))
    assert (await bridge.post(PATH, streams_events(3, "rl"), AUTH))[0] == 200
    await asyncio.sleep(1.2)  # the jittered backoff alone (at most 0.3 s) would have retried by now
    assert bridge.segment.received == 1 and bridge.segment.events() == []
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3, timeout=10)


async def test_a_burst_of_oversize_events_is_dead_lettered_without_pausing_the_rest(bridge):
    """Too large is the events' fault, not a bad deploy: the guard must not pause the
    destination (until an operator resumes it) and hold the good events with them."""
    big = streams_events(25, "big", user_attributes={"blob": "x" * 40_000})
    small = streams_events(10, "small")
    assert (await bridge.post(PATH, {"events": big["events"] + small["events"]}, AUTH))[0] == 200
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 10, timeout=10)

    async def all_dead() -> bool:
        _, body = await bridge.get("/admin/dlq?reason=event_too_large&limit=100", ADMIN)
        return len(body["dead_letters"]) == 25

    await wait_until(all_dead, what="the oversize events in the DLQ")
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert not next(d for d in status_body["destinations"] if d["name"] == "segment-prod")["paused"]


async def test_a_body_starting_with_a_utf8_bom_is_read(bridge):
    """Many HTTP stacks start a UTF-8 body with a byte order mark, which orjson refuses: the
    whole request was a 400, which MoEngage retries and then drops. The Tracking API reads
    the body through the same parser, so a BOM is skipped there too."""
    raw = b"\xef\xbb\xbf" + orjson.dumps(seed_payload())
    status, data = await bridge.post(PATH, None, {**AUTH, "Content-Type": "application/json"}, raw=raw)
    assert (status, data) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)
    batch = {"batch": [{"type": "track", "userId": "u-bom", "event": "With BOM", "messageId": "bom-1"}]}
    status, data = await bridge.post("/v1/batch", None, basic(WRITE_KEY), raw=b"\xef\xbb\xbf" + orjson.dumps(batch))
    assert (status, data) == (200, {"success": True})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    # Only a leading one: a BOM anywhere else is not JSON.
    status, data = await bridge.post(PATH, None, AUTH, raw=b" \xef\xbb\xbf" + orjson.dumps(seed_payload()))
    assert (status, data["code"]) == (400, "invalid_json"), data


async def test_a_number_no_double_holds_costs_only_the_events_holding_one(bridge):
    """orjson refuses 1e400 (infinite as a double), which cost the whole batch a 400:
    MoEngage retries it and then drops every event in it. Only the events holding such a
    number are rejected now, each by index; the rest are stored and delivered."""
    payload = seed_payload()
    payload["events"][0]["event_attributes"]["campaign_id"] = "@BIG@"
    payload["events"][2]["uid"] = "@HUGE@"
    raw = orjson.dumps(payload).replace(b'"@BIG@"', b"1e400").replace(b'"@HUGE@"', b"-" + b"9" * 5000)
    status, data = await bridge.post(PATH, None, {**AUTH, "Content-Type": "application/json"}, raw=raw)
    assert status == 200 and data["accepted"] == 1, data
    codes = [(r["index"], r["code"]) for r in data["rejected"]]
    assert codes == [(0, "number_out_of_range"), (2, "number_out_of_range")]
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 1)
    assert [e["messageId"] for e in bridge.segment.events()] == ["uuid-email-1"]
    # Integers past 64 bits are read as orjson reads them (a float), as before.
    payload = seed_payload()
    payload["events"] = payload["events"][:1]
    payload["events"][0]["event_uuid"] = "uuid-big-int"
    payload["events"][0]["event_attributes"]["campaign_id"] = "@BIG@"
    raw = orjson.dumps(payload).replace(b'"@BIG@"', b"18446744073709551616")
    assert await bridge.post(PATH, None, AUTH, raw=raw) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 2)
    [big] = [e for e in bridge.segment.events() if e["messageId"] == "uuid-big-int"]
    assert big["properties"]["campaign_id"] == 18446744073709551616.0
    # A body that is not JSON is still a 400, whatever numbers it holds.
    raw = orjson.dumps(seed_payload()).replace(b"1580967474", b"1e400")
    for bad in (raw[:-1], raw.replace(b'"req-1"', b"NaN"), raw + b"x", raw.replace(b"1e400", b"1e400.", 1)):
        status, data = await bridge.post(PATH, None, AUTH, raw=bad)
        assert (status, data["code"]) == (400, "invalid_json"), data
    # Every event holding one: a 400 that lists each, as for any other reason.
    status, data = await bridge.post(PATH, None, AUTH, raw=raw)
    assert (status, data["code"]) == (400, "number_out_of_range"), data
    assert [r["index"] for r in data["rejected"]] == [0, 1, 2]


async def test_a_batch_with_rejected_events_logs_one_warning_naming_them(bridge):
    """A 200 answer lists the rejected events, but MoEngage never reads it: only a counter
    moved. One warning a request names the first ten (index, event_uuid, code) and the
    count, never the events' contents (which the answer's messages may quote)."""
    payload = seed_payload()
    good = payload["events"][0]
    bad = [{**good, "event_uuid": f"bad-{i}", "event_time": "private-note-9931"} for i in range(11)]
    payload["events"] = [good, *bad, {**good, "event_uuid": ""}]
    with capture_logs() as logs:
        status, data = await bridge.post(PATH, payload, AUTH)
        assert status == 200 and data["accepted"] == 1 and len(data["rejected"]) == 12, data
        assert "private-note-9931" in repr(data["rejected"])
        assert (await bridge.post(PATH, seed_payload(), AUTH))[0] == 200  # nothing rejected: no line
        batch = {
            "batch": [
                {"type": "track", "userId": "u-1", "event": "Fine", "messageId": "m-ok"},
                {"type": "track", "userId": "u-1", "messageId": "m-no-event", "properties": {"n": "private-note-9931"}},
            ]
        }
        status, data = await bridge.post("/v1/batch", batch, basic(WRITE_KEY))
        assert status == 200 and data["accepted"] == 1, data
    lines = [e for e in logs if e["event"] == "events_rejected"]
    assert [(e["log_level"], e["source"], e["rejected"], e["accepted"]) for e in lines] == [
        ("warning", "streams-main", 12, 1),
        ("warning", "web", 1, 1),
    ]
    assert lines[0]["first"] == [
        {"index": i + 1, "event_id": f"bad-{i}", "code": "invalid_event_time"} for i in range(10)
    ]
    assert lines[1]["first"] == [{"index": 1, "event_id": "m-no-event", "code": "event_not_defined"}]
    assert "private-note-9931" not in repr(lines)


# A custom Streams -> Segment mapping a little off: properties from a field that may be
# text, anonymousId set beside userId even when the MoEngage user id is empty.
_LOOSE_MAPPING = """\
source_format: moengage_streams
destination_kind: segment
description: properties and anonymousId read as they come
rules:
  - name: track
    kind: track
    body:
      event: $.event_name
      userId: $.uid
      anonymousId: {path: $.user_attributes.moengage_user_id, pipe: [{to: string}]}
      messageId: $.event_uuid
      properties: $.campaign
"""


async def test_a_mapped_event_segment_would_answer_200_and_drop_is_dead_lettered(make_bridge, tmp_path):
    """Segment answers 200 to an event whose properties is no object, or whose id is empty
    beside a good one, and drops it (properties_not_object, id_not_string): counted as
    delivered, it was lost without a trace. It is dead-lettered instead, naming the field."""
    from tests.e2e.test_operations import copy_mappings

    mappings = copy_mappings(tmp_path)
    (mappings / "loose-to-segment.yaml").write_text(_LOOSE_MAPPING)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)
        segment = next(d for d in raw["destinations"] if d["name"] == "segment-prod")
        segment["mapping"] = "loose-to-segment"
        segment["guard"] = {"enabled": False}

    bridge = await make_bridge(tweak)
    base = {"event_name": "Email Sent", "event_time": 1580967474, "uid": "u-1"}
    events = [
        {**base, "event_uuid": "ok-1", "campaign": {"id": "c1"}, "user_attributes": {"moengage_user_id": "m-1"}},
        {**base, "event_uuid": "text-properties", "campaign": "c1", "user_attributes": {"moengage_user_id": "m-1"}},
        {**base, "event_uuid": "empty-anonymous-id", "campaign": {}, "user_attributes": {"moengage_user_id": ""}},
    ]
    assert (await bridge.post(PATH, {"events": events}, AUTH))[0] == 200

    async def dead_lettered() -> list[dict[str, Any]]:
        _, found = await bridge.get("/admin/dlq?destination=segment-prod", ADMIN)
        return list(found["dead_letters"])

    async def both() -> bool:
        return len(await dead_lettered()) == 2

    await bridge.segment.wait_for(lambda: len(bridge.segment.requests) >= 1)
    await wait_until(both, what="two dead letters")
    assert bridge.segment.events() == [bridge.segment.events()[0]]
    assert bridge.segment.events()[0]["messageId"] == "ok-1"
    assert bridge.segment.dropped == [], "nothing sent that Segment drops"
    by_id = {entry["message_id"]: entry for entry in await dead_lettered()}
    assert set(by_id) == {"text-properties", "empty-anonymous-id"}
    assert {entry["reason"] for entry in by_id.values()} == {"mapping_invalid_output"}
    _, full = await bridge.get(f"/admin/dlq/{by_id['text-properties']['id']}", ADMIN)
    assert "'properties' must be an object" in orjson.dumps(full).decode(), full


_TWO_CALLS_MAPPING = """\
source_format: moengage_streams
destination_kind: segment
description: each Streams event as a track, then an identify of its user
rules:
  - name: track
    kind: track
    continue: true
    body:
      event: $.event_name
      userId: $.uid
      messageId: $.event_uuid
  - name: identify
    kind: identify
    body:
      userId: $.uid
      traits: $.user_attributes
      messageId: MESSAGE_ID
"""


@pytest.mark.parametrize(
    ("message_id", "kept"),
    [("$.event_uuid", None), ('"{{event_uuid}}-identify"', ["two-1", "two-1-identify"])],
)
async def test_two_segment_calls_of_one_event_under_one_message_id_are_dead_lettered(
    make_bridge, tmp_path, message_id, kept
):
    """Segment keeps one event per messageId and answers 200 to the other: an identify
    sent under its track's messageId was lost without a trace. Such an event is
    dead-lettered, naming both outputs; calls with their own messageIds go out."""
    from tests.e2e.test_operations import copy_mappings

    mappings = copy_mappings(tmp_path)
    (mappings / "two-calls.yaml").write_text(_TWO_CALLS_MAPPING.replace("MESSAGE_ID", message_id))

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)
        segment = next(d for d in raw["destinations"] if d["name"] == "segment-prod")
        segment["mapping"] = "two-calls"
        segment["guard"] = {"enabled": False}

    bridge = await make_bridge(tweak)
    event = {"event_name": "Email Sent", "event_time": 1580967474, "uid": "u-1", "event_uuid": "two-1"}
    event["user_attributes"] = {"moengage_user_id": "m-1"}
    assert (await bridge.post(PATH, {"events": [event]}, AUTH))[0] == 200
    if kept is not None:
        await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 2)
        assert [e["messageId"] for e in bridge.segment.events()] == kept
        assert bridge.segment.dropped == []
        return

    async def dead_lettered() -> list[dict[str, Any]]:
        _, found = await bridge.get("/admin/dlq?destination=segment-prod", ADMIN)
        return list(found["dead_letters"])

    await wait_until(lambda: _nonempty(dead_lettered()), what="the dead letter")
    [entry] = await dead_lettered()
    assert (entry["message_id"], entry["reason"]) == ("two-1", "mapping_invalid_output"), entry
    _, full = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
    assert "the track and the identify outputs share messageId 'two-1'" in orjson.dumps(full).decode(), full
    assert bridge.segment.received == 0 and bridge.segment.dropped == []


async def test_a_streams_source_name_with_dots_and_tildes_is_reached_at_its_url(make_bridge):
    """The characters a Streams source name may hold reach it written as they are."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["sources"][2]["name"] = "moe.prod_1~eu-x"

    bridge = await make_bridge(tweak)
    assert await bridge.post("/moengage/streams/moe.prod_1~eu-x", seed_payload(), AUTH) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)


@pytest.mark.parametrize(
    ("name", "segment"), [("moe prod", "moe%20prod"), ("50%", "50%25"), ("moe/eu?x#1", "moe%2Feu%3Fx%231")]
)
async def test_a_streams_source_name_a_url_carries_percent_encoded_is_taken_and_reached(
    make_bridge: Callable[..., Any], name: str, segment: str
) -> None:
    """A name with a space, a '%', a '/', a '?' or a '#' reaches its source at its URL with
    those percent-encoded, as bridges before the name check took it and served it: refused at
    start, such a config that delivered yesterday stopped the bridge after an upgrade."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["sources"][2]["name"] = name

    bridge = await make_bridge(tweak)
    assert await bridge.post(f"/moengage/streams/{segment}", seed_payload(), AUTH) == (200, {"success": True})
    await bridge.segment.wait_for(lambda: len(bridge.segment.events()) == 3)


async def test_a_streams_body_past_5_mib_is_refused_with_the_limit_the_readme_gives(bridge):
    """A body at the limit is read; one byte more, sent whole, chunked or gzipped, is a 413
    naming the limit, the number the README gives."""
    from bridge.sources.streams.routes import MAX_STREAMS_BODY

    readme = re.sub(r"\s+", " ", (Path(__file__).resolve().parents[2] / "README.md").read_text())
    assert f"a body over 5 MiB ({MAX_STREAMS_BODY} bytes, after gzip or deflate decoding) a 413" in readme
    body = orjson.dumps(seed_payload())
    at_limit = body[:-1] + b" " * (MAX_STREAMS_BODY - len(body)) + b"}"
    assert len(at_limit) == MAX_STREAMS_BODY
    assert await bridge.post(PATH, None, AUTH, raw=at_limit) == (200, {"success": True})
    past = at_limit[:-1] + b" }"

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(past), 1 << 20):
            yield past[start : start + (1 << 20)]

    refused = {"code": "payload_too_large", "message": f"request body exceeds {MAX_STREAMS_BODY} bytes"}
    assert await bridge.post(PATH, None, AUTH, raw=past) == (413, refused)
    assert bridge.client is not None
    resp = await bridge.client.post(PATH, data=chunked(), headers=AUTH)
    assert (resp.status, await resp.json()) == (413, refused)
    gzipped = {**AUTH, "Content-Encoding": "gzip"}
    resp = await bridge.client.post(PATH, data=gzip.compress(past), headers=gzipped)
    assert (resp.status, await resp.json()) == (413, refused)
