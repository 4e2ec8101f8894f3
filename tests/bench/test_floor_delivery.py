"""The delivery floor and the bench's counting stand-ins, on loopback.

No timing assertions: only that the floor delivers every stored event once, as elements
the MoEngage stand-in accepts, moves its mark only past answered reads, and stops (with
its reason) when the upstream refuses; and that the bench stand-ins validate as always
while keeping counts instead of items.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from bench import floor
from bench.floor_delivery import MAX_REQUEST_BYTES, READ_SIZE, element, requests_for
from bench.httpload import LoadGenerator
from bench.payloads import batch_workload
from bench.standin import CountingMoEngage, CountingSegment
from bridge.testing.standins import MoEngageStandIn

WORKSPACE, API_KEY = "WS1", "moe-key"


async def _standin(aiohttp_server: Any, standin: Any) -> str:
    server: TestServer = await aiohttp_server(standin.app())
    return f"http://127.0.0.1:{server.port}"


async def _floor(aiohttp_server: Any, db: Path, upstream: str) -> TestServer:
    server: TestServer = await aiohttp_server(floor.build_app(str(db), (upstream, WORKSPACE, API_KEY)))
    return server


async def _health(session: ClientSession, server: TestServer) -> dict[str, Any]:
    async with session.get(server.make_url("/healthz")) as response:
        health: dict[str, Any] = await response.json()
        return health


async def _load(server: TestServer, requests: int) -> int:
    assert server.port is not None
    gen = LoadGenerator("127.0.0.1", server.port, batch_workload("wk", size=100), connections=4)
    await gen.connect()
    tally = await gen.closed_loop(duration=30.0, max_requests=requests)
    await gen.close()
    assert tally.statuses == {200: requests}
    return tally.all_events


def _mark(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        (last_id,) = conn.execute("SELECT last_id FROM delivered").fetchone()
        (top,) = conn.execute("SELECT max(id) FROM events").fetchone()
        return int(last_id), int(top)


async def test_every_stored_event_reaches_the_standin_once(aiohttp_server: Any, tmp_path: Path) -> None:
    standin = MoEngageStandIn(WORKSPACE, API_KEY)
    db = tmp_path / "floor.db"
    server = await _floor(aiohttp_server, db, await _standin(aiohttp_server, standin))
    stored = await _load(server, 13)  # 1,300 events: three reads, the last one short
    assert stored == 1300 > 2 * READ_SIZE
    async with ClientSession() as session:
        async with session.post(server.make_url("/_floor/deliver")) as response:
            assert response.status == 200
        for _ in range(400):
            health = await _health(session, server)
            if health["delivered"] >= stored:
                break
            await asyncio.sleep(0.025)
    assert health["delivered"] == stored and health["delivery_error"] == ""
    # The real stand-in validated every request: one accepted element per event, none twice.
    assert [s.status for s in standin.seen] == [200] * len(standin.seen)
    assert len(standin.customers()) + len(standin.events()) == stored
    assert all(r.size <= MAX_REQUEST_BYTES for r in standin.requests)
    last_id, top = _mark(db)
    assert last_id == top
    # A second start while running is the same delivery, not a second one.
    async with ClientSession() as session, session.post(server.make_url("/_floor/deliver")) as response:
        assert response.status == 200
    await asyncio.sleep(0.2)
    assert len(standin.customers()) + len(standin.events()) == stored


async def test_a_refusing_upstream_stops_the_floor_before_its_mark_moves(aiohttp_server: Any, tmp_path: Path) -> None:
    standin = MoEngageStandIn(WORKSPACE, "another-key")  # every request answers 401
    db = tmp_path / "floor.db"
    server = await _floor(aiohttp_server, db, await _standin(aiohttp_server, standin))
    await _load(server, 2)
    async with ClientSession() as session:
        async with session.post(server.make_url("/_floor/deliver")) as response:
            assert response.status == 200
        for _ in range(200):
            health = await _health(session, server)
            if health["delivery_error"]:
                break
            await asyncio.sleep(0.025)
    assert "401" in health["delivery_error"]
    assert health["delivered"] == 0
    assert _mark(tmp_path / "floor.db")[0] == 0


def test_elements_by_call_type() -> None:
    assert element({"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}}) == {
        "type": "customer",
        "customer_id": "u-1",
        "attributes": {"plan": "pro"},
    }
    assert element({"type": "track", "userId": "u-1", "event": "Bought", "properties": {"n": 1}}) == {
        "type": "event",
        "customer_id": "u-1",
        "actions": [{"action": "Bought", "attributes": {"n": 1}}],
    }
    assert element({"type": "page", "userId": "u-1"})["actions"][0]["action"] == "page"  # type: ignore[index]
    assert element({"type": "track", "anonymousId": "a-1", "event": "x"}) is None
    assert element(["not", "an", "event"]) is None


def test_requests_stay_within_the_cap_and_keep_every_element_in_order() -> None:
    bodies = [orjson.dumps({"type": "customer", "customer_id": f"u-{i}", "pad": "x" * 900}) for i in range(500)]
    requests = requests_for(bodies)
    assert len(requests) > 1
    assert all(len(r) <= MAX_REQUEST_BYTES for r in requests)
    elements = [e for r in requests for e in orjson.loads(r)["elements"]]
    assert [e["customer_id"] for e in elements] == [f"u-{i}" for i in range(500)]
    assert requests_for([]) == []


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_counting_standins_validate_and_count_without_keeping(aiohttp_server: Any) -> None:
    moengage = CountingMoEngage(WORKSPACE, API_KEY)
    segment = CountingSegment({"seg-key": "us"})
    apps = []
    for standin in (moengage, segment):
        app = standin.app()
        apps.append(await aiohttp_server(app))
    headers = {"Authorization": _basic(WORKSPACE, API_KEY), "MOE-APPKEY": WORKSPACE}
    good = {
        "type": "transition",
        "elements": [
            {"type": "customer", "customer_id": "user-1"},
            {"type": "event", "customer_id": "user-1", "actions": [{"action": "Bought"}]},
            {"type": "customer", "customer_id": "guest"},  # accepted, silently ignored
        ],
    }
    # An element MoEngage refuses is dropped from a Bulk Import answered 200, as MoEngage
    # does; an envelope it cannot read is a 400.
    dropped = {"type": "transition", "elements": [{"type": "event", "customer_id": "user-1", "actions": []}]}
    bad = {"type": "transition", "elements": []}
    async with ClientSession() as session:
        url = apps[0].make_url(f"/v1/transition/{WORKSPACE}")
        async with session.post(url, json=good, headers=headers) as response:
            assert response.status == 200
        async with session.post(url, json=dropped, headers=headers) as response:
            assert response.status == 200
        async with session.post(url, json=bad, headers=headers) as response:
            assert response.status == 400
        async with session.post(url, json=good, headers={}) as response:
            assert response.status == 401
        batch = {"batch": [{"type": "track", "event": "x", "userId": "u", "messageId": "m-1"}]}
        async with session.post(
            apps[1].make_url("/v1/batch"), json=batch, headers={"Authorization": _basic("seg-key", "")}
        ) as response:
            assert response.status == 200
    assert moengage.counts() == {
        "requests": 4,
        "customers": 1,
        "events": 1,
        "devices": 0,
        "merges": 0,
        "ignored": 2,  # the guest, and the dropped element
        "errors": 2,
    }
    assert moengage.customers() == [] and moengage.seen == []  # counted, not kept
    assert segment.counts() == {"requests": 1, "events": 1, "errors": 0}


async def test_floor_without_upstream_has_no_delivery_route(aiohttp_server: Any, tmp_path: Path) -> None:
    server: TestServer = await aiohttp_server(floor.build_app(str(tmp_path / "floor.db")))
    async with ClientSession() as session:
        async with session.post(server.make_url("/_floor/deliver")) as response:
            assert response.status in (404, 405)
        health = await _health(session, server)
    assert "delivered" not in health
