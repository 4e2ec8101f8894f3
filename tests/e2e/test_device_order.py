"""An identify with a push token is a Track User and a Track Device of one job: MoEngage adds
a device to an existing user only, so the device may reach it only after its user's customer
item was accepted, whatever the delivery mode.

The stand-in is MoEngage with a slow Track User (it takes the user in only after a delay):
a device sent beside its new user's Track User, rather than after its answer, reaches it
first, is accepted and never made (``MoEngageStandIn.ignored``), deterministically.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.testing.moengage_standin import MoEngageStandIn, Rejected
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WORKSPACE, WRITE_KEY, Bridge, basic, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)
SLOW_TRACK_USER = 0.5  # seconds; a device sent beside its user lands well inside it


class MoEngage(MoEngageStandIn):
    """MoEngage whose Track User answers its first requests with ``customer_answers``
    (statuses, from MoEngage's error shapes), then as MoEngage does."""

    def __init__(self, *customer_answers: int) -> None:
        super().__init__(WORKSPACE, API_KEY)
        self.customer_answers = deque(customer_answers)

    async def _customer(self, request: web.Request) -> web.Response:
        if not self.customer_answers:
            return await super()._customer(request)
        status = self.customer_answers.popleft()

        def refuse(body: dict[str, Any]) -> str:
            raise Rejected(status, f"scripted {status} for {body.get('customer_id')}")

        return await self._handle(request, refuse, 128_000)


@contextlib.asynccontextmanager
async def _bridge(
    make_bridge: Any,
    upstream: MoEngage,
    api: str,
    max_event_bytes: int | None = None,
    retry: dict[str, Any] | None = None,
    **delivery: Any,
) -> AsyncIterator[Bridge]:
    """A bridge whose moengage-main (the shipped mapping) sends to ``upstream`` through ``api``
    (``retry``: settings to change in its retry policy)."""
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()

    def tweak(raw: dict[str, Any]) -> None:
        main = raw["destinations"][0]
        main.update(api=api, base_url=str(server.make_url("")).rstrip("/"))
        main["delivery"].update(delivery)
        main["retry"].update(retry or {})
        if max_event_bytes is not None:
            raw["server"]["max_event_bytes"] = raw["server"]["max_request_bytes"] = max_event_bytes

    try:
        bridge = await make_bridge(tweak, start=False)
        await bridge.start()
        try:
            yield bridge
        finally:
            await bridge.stop()
    finally:
        upstream.stop()
        await server.close()


def _identifies(*users: str) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "identify",
                "userId": user,
                "messageId": f"m-{user}",
                "traits": {"email": f"{user}@example.com"},
                "context": {"device": {"id": f"d-{user}", "type": "android", "token": f"token-{user}"}},
            }
            for user in users
        ]
    }


def _arrivals(upstream: MoEngageStandIn) -> list[tuple[str, str]]:
    """(kind, customer_id) of every item the stand-in took in, in the order it took them."""
    seen: list[tuple[str, str]] = []
    for request in upstream.requests:
        if "/v1/transition/" in request.path:
            seen += [(e["type"], e["customer_id"]) for e in request.body["elements"]]
        elif "/v1/customer/" in request.path or "/v1/device/" in request.path:
            seen.append((request.path.split("/")[2], request.body["customer_id"]))
    return seen


async def _drained(bridge: Bridge) -> bool:
    _, status = await bridge.get("/admin/status", ADMIN)
    main = next(d for d in status["destinations"] if d["name"] == "moengage-main")
    return bool(main["queue_depth"] == 0)


@pytest.mark.parametrize(
    ("api", "ordered", "concurrency"),
    [
        ("single", False, 1),
        ("single", False, 2),
        ("single", True, 1),
        ("single", True, 2),
        ("bulk", False, 1),
        ("bulk", True, 1),
    ],
)
async def test_a_new_users_device_reaches_moengage_after_the_user(make_bridge, api, ordered, concurrency):
    upstream = MoEngage()
    upstream.delays["customer"] = upstream.delays["transition"] = SLOW_TRACK_USER
    users = ["ann", "ben", "cat"]
    async with _bridge(make_bridge, upstream, api, ordered=ordered, concurrency=concurrency) as bridge:
        assert (await bridge.post("/v1/batch", _identifies(*users), H))[0] == 200
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        arrivals = _arrivals(upstream)
        for user in users:
            assert arrivals.index(("customer", user)) < arrivals.index(("device", user)), arrivals
        assert upstream.ignored == [], "a device reached MoEngage before its user"
        assert sorted(d["customer_id"] for d in upstream.devices()) == users


async def test_a_device_in_a_bulk_import_waits_for_its_user_sent_alone_to_track_user(make_bridge):
    """A user's customer item too large for Bulk Import goes alone to Track User; its device
    goes in a Bulk Import, a request of its own: sent unordered, it still waits for the user."""
    upstream = MoEngage()
    upstream.delays["customer"] = SLOW_TRACK_USER
    identify = _identifies("fay")["batch"][0]
    identify["traits"]["notes"] = "n" * 101_000
    async with _bridge(make_bridge, upstream, "bulk", max_event_bytes=200_000, ordered=False) as bridge:
        assert (await bridge.post("/v1/batch", {"batch": [identify]}, H))[0] == 200
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        assert [r.path.split("/")[2] for r in upstream.requests] == ["customer", "transition"]
        assert _arrivals(upstream) == [("customer", "fay"), ("device", "fay")]
        assert upstream.ignored == []


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_device_waits_for_its_users_retried_track_user(make_bridge, ordered):
    """The Track User fails (500): the device does not go out in that attempt, and goes
    with the job's retry, after the user."""
    upstream = MoEngage(500)
    async with _bridge(make_bridge, upstream, "single", ordered=ordered) as bridge:
        assert (await bridge.post("/v1/batch", _identifies("dan"), H))[0] == 200
        await upstream.wait_for(lambda: len(upstream.devices()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        paths = [(s.path.split("/")[2], s.status) for s in upstream.seen]
        assert paths == [("customer", 500), ("customer", 200), ("device", 200)]
        assert upstream.ignored == []


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_device_of_a_dead_lettered_track_user_goes_with_its_replay(make_bridge, ordered):
    """The Track User is refused for good (400): the device is not sent to a user MoEngage
    will not have; the job's dead letter keeps both, and its replay sends both, in order."""
    upstream = MoEngage(400)
    async with _bridge(make_bridge, upstream, "single", ordered=ordered) as bridge:
        assert (await bridge.post("/v1/batch", _identifies("eve"), H))[0] == 200

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            return len(body["dead_letters"]) == 1

        await wait_until(dead_lettered, what="the event in the DLQ")
        assert [(s.path.split("/")[2], s.status) for s in upstream.seen] == [("customer", 400)]
        status, body = await bridge.post("/admin/dlq/replay", {"reason": "http_400"}, ADMIN)
        assert (status, body["replayed"]) == (200, 1), body
        await upstream.wait_for(lambda: len(upstream.devices()) == 1, timeout=10)
        assert _arrivals(upstream) == [("customer", "eve"), ("device", "eve")]
        assert upstream.ignored == []


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_device_whose_track_user_keeps_failing_ends_in_the_dlq(make_bridge, ordered):
    """The Track User keeps failing (503): each attempt is counted, though the device never
    went out in it, and once the retry budget is spent the job is dead-lettered. Given back
    uncounted instead (the device "unsent"), it was retried for as long as the upstream
    failed, and never reached the DLQ."""
    attempts = 3
    upstream = MoEngage(*[503] * 50)
    retry = {"min_attempts": attempts, "max_age": 0}
    async with _bridge(make_bridge, upstream, "single", retry=retry, ordered=ordered) as bridge:
        assert (await bridge.post("/v1/batch", _identifies("gus"), H))[0] == 200

        dead_letters: list[dict[str, Any]] = []

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=retries_exhausted", ADMIN)
            dead_letters[:] = body["dead_letters"]
            return len(dead_letters) == 1

        await wait_until(dead_lettered, what="the event in the DLQ")
        [dead] = dead_letters
        assert (dead["attempts"], dead["status"], dead["outputs_delivered"]) == (attempts, 503, 0), dead
        assert [(s.path.split("/")[2], s.status) for s in upstream.seen] == [("customer", 503)] * attempts
        assert upstream.devices() == [] and upstream.ignored == []
