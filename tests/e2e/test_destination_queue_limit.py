"""delivery.max_queued_events: a destination that stops delivering (down for days, paused for
bad credentials) fills the store that every destination shares, and then ingest refuses
everything. With a limit, only the events bound for that destination are refused (429 with
Retry-After, which senders wait out; 503 on /segment/webhook, whose sender retries only a 5xx);
the other sources' events go on being taken and delivered."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import orjson
from structlog.testing import capture_logs

from bridge.config.model import build_config
from bridge.destinations.base import ConfigError
from tests.e2e.harness import ADMIN_TOKEN, WEBHOOK_SECRET, WRITE_KEY, Bridge, basic, config_dict, wait_until
from tests.e2e.test_streams_to_segment import AUTH, PATH, seed_payload

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


def limited(raw: dict[str, Any]) -> None:
    raw["destinations"][0]["delivery"]["max_queued_events"] = 3  # moengage-main, fed by source "web"


def track(n: int) -> dict[str, Any]:
    return {"type": "track", "userId": f"user-{n}", "event": "Step", "messageId": f"limit-{n}"}


async def count_queues(bridge: Bridge) -> None:
    """What the bridge does every few seconds, and at each metrics scrape."""
    assert bridge.bindings is not None and bridge.runtime is not None
    await bridge.bindings.refresh_gauges(bridge.runtime)


async def queued(bridge: Bridge, name: str) -> int:
    _, status = await bridge.get("/admin/status", ADMIN)
    return int(next(d for d in status["destinations"] if d["name"] == name)["queue_depth"])


async def test_a_destination_past_its_queue_limit_refuses_only_its_own_events(make_bridge: Callable[..., Any]) -> None:
    bridge = await make_bridge(limited)
    moengage = bridge.moengage
    moengage.hold()  # MoEngage stops answering: its queue grows
    for n in range(3):
        assert (await bridge.post("/v1/track", track(n), H))[0] == 200
    with capture_logs() as logs:
        await count_queues(bridge)
    assert [(e["event"], e["destination"], e["queued"], e["limit"]) for e in logs] == [
        ("destination_queue_full", "moengage-main", 3, 3)
    ]

    _, status_body = await bridge.get("/admin/status", ADMIN)
    shown = {d["name"]: (d["max_queued_events"], d["queue_full"]) for d in status_body["destinations"]}
    assert shown == {"moengage-main": (3, True), "moengage-eu": (None, False), "segment-prod": (None, False)}
    status, data = await bridge.post("/v1/track", track(3), H)
    assert status == 429, data
    assert data == {
        "code": "destination_queue_full",
        "message": "the bridge is not accepting these events right now: a destination they go to has a full queue",
    }
    status, data = await bridge.post("/v1/batch", {"batch": [track(4), track(5)]}, H)
    assert (status, data["code"]) == (429, "destination_queue_full")
    # A Streams source feeds another destination (Segment): taken, and delivered.
    status, data = await bridge.post(PATH, seed_payload(), AUTH)
    assert status == 200, data
    await bridge.segment.wait_for(lambda: len(bridge.segment.requests) >= 1)

    moengage.release()
    with capture_logs() as logs:
        # Each /admin/status it polls counts the queues too, as the periodic count does.
        await wait_until(lambda: _empty(bridge, "moengage-main"), what="MoEngage's queue to drain")
        await count_queues(bridge)
    below = [(e["event"], e["destination"]) for e in logs if e["event"].startswith("destination_queue")]
    assert below == [("destination_queue_below_limit", "moengage-main")]
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert status_body["destinations"][0]["queue_full"] is False
    assert (await bridge.post("/v1/track", track(6), H))[0] == 200
    await moengage.wait_for(lambda: len(moengage.events()) == 4)
    assert [e["customer_id"] for e in moengage.events()] == ["user-0", "user-1", "user-2", "user-6"]


async def test_the_webhook_route_refuses_with_a_503_its_sender_retries(make_bridge: Callable[..., Any]) -> None:
    """Segment's (classic) Webhooks destination retries a request that gets a 5xx, for up to
    4 hours, and no other: a 429 there dropped the events, deletion requests among them. So
    /segment/webhook answers backpressure 503, still with Retry-After."""
    bridge = await make_bridge(limited)
    bridge.moengage.hold()
    for n in range(3):
        assert (await bridge.post("/v1/track", track(n), H))[0] == 200
    await count_queues(bridge)
    body = orjson.dumps(track(3))
    signature = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha1).hexdigest()
    assert bridge.client is not None
    resp = await bridge.client.post(
        "/segment/webhook", data=body, headers={**H, "Content-Type": "application/json", "X-Signature": signature}
    )
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["code"] == "destination_queue_full"
    assert resp.headers["Retry-After"] == "30"
    # What the documented backpressure alert counts (docs/operations.md).
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_http_requests_total{route="/segment/webhook",status="503"} 1.0' in metrics, metrics
    bridge.moengage.release()


async def _empty(bridge: Bridge, name: str) -> bool:
    return await queued(bridge, name) == 0


def test_the_limit_is_a_positive_integer(tmp_path: Any) -> None:
    for bad, says in ((0, "must be at least 1, got 0"), (True, "expected an integer"), ("10", "expected an integer")):
        raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
        raw["destinations"][0]["delivery"]["max_queued_events"] = bad
        try:
            build_config(raw)
        except ConfigError as exc:
            assert "destinations[0].delivery.max_queued_events" in str(exc) and says in str(exc), str(exc)
        else:
            raise AssertionError(f"{bad!r} was taken")
    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    assert build_config(raw).destinations[0].delivery.max_queued_events is None
    raw["destinations"][0]["delivery"]["max_queued_events"] = 1_000_000
    assert build_config(raw).destinations[0].delivery.max_queued_events == 1_000_000
