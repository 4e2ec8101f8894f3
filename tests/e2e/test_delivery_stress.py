"""Seeded stress: a few hundred Segment calls of ~30 users through the real Tracking API,
and a MoEngage that answers at random (200, 429, 5xx, a reset or a timeout before or after
it took the request in, and a 400 for one poison event). Whatever it answers, the README's
delivery promises hold: every event but the poison one reaches MoEngage at least once, the
poison one alone is dead-lettered, each user's events are first seen in the order they
were sent (identify before its track, a merge after the merged user's events, a deletion
after the user's events), and nothing of a deleted user arrives after its deletion."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.store.postgres import PostgresStore
from bridge.testing.moengage_standin import MoEngageStandIn
from bridge.testing.upstream import Planned
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, DSN, WORKSPACE, WRITE_KEY, Bridge, basic, wait_until
from tests.e2e.test_user_deletion import deletion, webhook

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)
POISON = "POISON-PILL"
REQUEST_TIMEOUT = 0.3
USERS = 30
# More seeds for a longer hunt: BRIDGE_STRESS_SEEDS=1,2,3,... pytest tests/e2e/test_delivery_stress.py
SEEDS = [int(s) for s in os.environ.get("BRIDGE_STRESS_SEEDS", "7,1234").split(",")]


class ChaoticMoEngage(MoEngageStandIn):
    """MoEngage answering at random; ``taken`` lists what it took in, across endpoints, in
    the order it took it: ("item", seq, customer_id), ("merge", merged, retained) and
    ("delete", customer_id)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(WORKSPACE, API_KEY)
        self.rng = rng
        self.taken: list[tuple[str, ...]] = []
        self.poison_refusals = 0

    @web.middleware
    async def _front(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        raw = await request.read()
        if POISON.encode() in raw:
            # An event MoEngage refuses for good, in any request that carries it.
            self.poison_refusals += 1
            return self.error(400, "actions[0].attributes: invalid value", "InvalidParams")
        roll = self.rng.random()
        if roll < 0.55:
            return await super()._front(request, handler)
        if roll < 0.65:
            # Taken in, but the answer is lost (too late, or the connection drops): sent
            # again, at least once.
            response = await super()._front(request, handler)
            if self.rng.random() < 0.5 and request.transport is not None:
                request.transport.abort()
            else:
                await asyncio.sleep(REQUEST_TIMEOUT * 2)
            return response
        self.plan(
            self.rng.choice(
                [
                    Planned(429, headers={"Retry-After": "0"}),
                    Planned(500),
                    Planned(502),
                    Planned(503),
                    Planned(reset=True),
                    Planned(503, delay=REQUEST_TIMEOUT * 2),  # never taken in, timed out
                ]
            )
        )
        return await super()._front(request, handler)

    def _keep_user_item(self, item: dict[str, Any], into: list[dict[str, Any]]) -> None:
        attributes = item.get("attributes") or {}
        actions = item.get("actions") or [{}]
        seq = attributes.get("seq") or (actions[0].get("attributes") or {}).get("seq")
        self.taken.append(("item", str(seq), item["customer_id"]))
        super()._keep_user_item(item, into)

    def _accept_merge(self, body: dict[str, Any]) -> str:
        summary = super()._accept_merge(body)
        self.taken.extend(("merge", p["merged_user"], p["retained_user"]) for p in body["merge_data"])
        return summary

    def _accept_delete(self, body: dict[str, Any]) -> str:
        summary = super()._accept_delete(body)
        self.taken.append(("delete", body["identity_value"]))
        return summary


@dataclass
class Plan:
    """What is sent, call by call, and what each user must see in order."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    # Segment user -> the keys of its calls, in the order sent: a seq, or ("merge", merged)
    # or ("delete", customer_id).
    order: dict[str, list[Any]] = field(default_factory=dict)
    deleted: dict[str, str] = field(default_factory=dict)  # userId -> its customer_id
    # seq -> the customer_ids it may reach MoEngage under: the traits.id of an identify of
    # the user sent before it (or by it); else its userId, or the traits.id of a later
    # identify (links are applied when an event is sent, and may be learnt by then).
    customer_of: dict[str, set[str]] = field(default_factory=dict)
    poison: str = ""


def make_plan(rng: random.Random, n_events: int) -> Plan:
    plan = Plan()
    users = [f"u{k}" for k in range(USERS)]
    customer = {u: u for u in users}  # the customer_id a user's calls go out under, once identified
    anonymous = {u: f"anon-{u}" for u in rng.sample(users, 2)}  # users that arrive by an alias
    doomed = set(rng.sample([u for u in users if u not in anonymous], 2))
    alive = list(users)

    def add(user: str, key: Any, call: dict[str, Any]) -> None:
        plan.calls.append(call)
        plan.order.setdefault(user, []).append(key)
        if isinstance(key, str):
            plan.customer_of[key] = {customer.get(user, user)}

    for anon in anonymous.values():  # the anonymous users' events first, merged later
        for j in range(3):
            seq = f"{anon}-t{j}"
            add(anon, seq, _track(anon, seq))
    for i in range(n_events):
        user = rng.choice(alive)
        seq = f"s{i}"
        if user in anonymous and rng.random() < 0.3:
            anon = anonymous.pop(user)
            add(anon, ("merge", anon), _alias(anon, user, f"alias-{anon}"))
            plan.order.setdefault(user, []).append(("merge", anon))
        elif user in doomed and user in plan.order and i > n_events // 2 and rng.random() < 0.1:
            plan.calls.append({"delete": deletion(user, f"del-{user}")})
            plan.order.setdefault(user, []).append(("delete", customer[user]))
            plan.deleted[user] = customer[user]
            alive.remove(user)
        elif rng.random() < 0.25:
            traits: dict[str, Any] = {"seq": seq, "plan": rng.choice(["free", "pro"])}
            if customer[user] == user and rng.random() < 0.5:
                customer[user] = traits["id"] = f"c-{user}"
            add(user, seq, {"type": "identify", "userId": user, "traits": traits, "messageId": seq})
            if "id" in traits:  # the user's earlier events may be sent after the link is learnt
                for earlier in plan.order[user][:-1]:
                    if isinstance(earlier, str):
                        plan.customer_of[earlier].add(traits["id"])
        else:
            add(user, seq, _track(user, seq))
    # One poison event, somewhere in the middle, of a user that lives on.
    at = rng.randrange(len(plan.calls) // 3, 2 * len(plan.calls) // 3)
    user = rng.choice([u for u in alive if u not in anonymous])
    plan.poison = f"{POISON}-{user}"
    plan.calls.insert(at, {**_track(user, plan.poison), "event": POISON})
    return plan


def _track(user: str, seq: str) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": "Stressed", "messageId": seq, "properties": {"seq": seq}}


def _alias(previous: str, user: str, message_id: str) -> dict[str, Any]:
    return {"type": "alias", "previousId": previous, "userId": user, "messageId": message_id}


async def send(nodes: list[Bridge], plan: Plan, rng: random.Random) -> None:
    """The calls in order, each request to any of ``nodes``: runs of calls in one /v1/batch,
    or one by one to /v1/{type}."""
    calls = list(plan.calls)
    while calls:
        bridge = rng.choice(nodes)
        if "delete" in calls[0]:
            status, data = await webhook(bridge, calls.pop(0)["delete"])
        elif rng.random() < 0.7:
            size = rng.randint(1, 40)
            run: list[dict[str, Any]] = []
            while calls and len(run) < size and "delete" not in calls[0]:
                run.append(calls.pop(0))
            status, data = await bridge.post("/v1/batch", {"batch": run}, H)
        else:
            call = calls.pop(0)
            status, data = await bridge.post(f"/v1/{call['type']}", call, H)
        assert status == 200, data


async def queue_depth(bridge: Bridge) -> int:
    _, status = await bridge.get("/admin/status", ADMIN)
    destination = next(d for d in status["destinations"] if d["name"] == "moengage-main")
    return int(destination["queue_depth"])


def check(moengage: ChaoticMoEngage, plan: Plan, dead: list[dict[str, Any]], ordered: bool = True) -> None:
    taken = moengage.taken
    first: dict[Any, int] = {}
    for index, entry in enumerate(taken):
        if entry[0] == "item":
            key: Any = entry[1]
        elif entry[0] == "merge":
            key = ("merge", entry[1])
        else:
            key = ("delete", entry[1])
        first.setdefault(key, index)
    every = {key for keys in plan.order.values() for key in keys}
    missing = sorted(map(str, every - set(first)))
    assert not missing, f"never reached MoEngage: {missing}"
    assert plan.poison not in first
    wrong = [e for e in taken if e[0] == "item" and e[2] not in plan.customer_of[e[1]]]
    assert not wrong, f"under another customer_id than expected: {wrong[:5]}"
    assert [d["message_id"] for d in dead] == [plan.poison], dead
    for user, keys in plan.order.items():
        if ordered:
            seen = sorted(keys, key=lambda k: first[k])
            assert seen == keys, f"{user}: sent {keys}, first seen {seen}"
        # Whatever the mode, a merge or a deletion goes after the user's earlier events.
        for at, barrier in enumerate(keys):
            if isinstance(barrier, tuple):
                overtaken = [k for k in keys[:at] if first[k] > first[barrier]]
                assert not overtaken, f"{user}: {barrier} before {overtaken}"
    for user, customer_id in plan.deleted.items():
        gone = first[("delete", customer_id)]
        later = [e for e in taken[gone + 1 :] if {customer_id, user} & set(e[1:])]
        assert not later, f"{user} ({customer_id}) after its deletion: {later}"


def fast(
    concurrency: int, store_url: str | None = None, *, api: str = "bulk", ordered: bool = True
) -> Callable[[dict[str, Any]], None]:
    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["api"] = api
        moengage["delivery"].update(
            concurrency=concurrency, batch_size=25, request_timeout=REQUEST_TIMEOUT, ordered=ordered
        )
        moengage["retry"] = {"base_delay": 0.01, "max_delay": 0.05}
        if store_url is not None:
            raw["store"]["url"] = store_url

    return tweak


async def chaotic(make_bridge: Callable[..., Any], tweak: Callable[[dict[str, Any]], None], seed: int) -> Bridge:
    """A bridge (not started) whose moengage-main is a ChaoticMoEngage seeded with ``seed``."""
    bridge: Bridge = await make_bridge(tweak, start=False)
    moengage = ChaoticMoEngage(random.Random(seed))
    server = TestServer(moengage.app(), host="127.0.0.1")
    await server.start_server()
    bridge.moengage.stop()
    await bridge.moengage_server.close()
    bridge.moengage, bridge.moengage_server = moengage, server  # the fixture closes it
    bridge.destination("moengage-main")["base_url"] = str(server.make_url("")).rstrip("/")
    return bridge


# (api, delivery.ordered, delivery.concurrency, events): one request an event is slower to
# get through this many failures, so it gets fewer events.
MODES = {
    "bulk-ordered-1": ("bulk", True, 1, 400),
    "bulk-ordered-4": ("bulk", True, 4, 400),
    "bulk-unordered-4": ("bulk", False, 4, 400),
    "single-ordered-4": ("single", True, 4, 80),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_upstream_failures_lose_nothing_and_keep_each_users_order(
    make_bridge: Callable[..., Any], seed: int, mode: str
) -> None:
    api, ordered, concurrency, events = MODES[mode]
    rng = random.Random(seed)
    plan = make_plan(rng, events)
    bridge = await chaotic(make_bridge, fast(concurrency, api=api, ordered=ordered), seed)
    await bridge.start()
    await send([bridge], plan, rng)

    async def settled() -> bool:
        return await queue_depth(bridge) == 0

    await wait_until(settled, timeout=30, what="the queue to empty")
    _, data = await bridge.get("/admin/dlq", ADMIN)
    assert isinstance(bridge.moengage, ChaoticMoEngage)
    check(bridge.moengage, plan, data["dead_letters"], ordered)


@pytest.mark.parametrize("seed", SEEDS)
async def test_two_postgres_nodes_under_random_upstream_failures_lose_nothing_and_keep_order(
    make_bridge: Callable[..., Any], pg_schema: str, seed: int
) -> None:
    """The same on the shared PostgreSQL store: two nodes, each taking calls and each
    delivering from the one queue, with two loops apiece."""
    rng = random.Random(seed)
    plan = make_plan(rng, 400)
    first = await chaotic(make_bridge, fast(2, DSN), seed)
    first.store_factory = lambda: PostgresStore(DSN, schema=pg_schema)
    second = Bridge(
        first.tmp_path,
        first.moengage,
        first.segment,
        first.moengage_server,
        first.segment_server,
        first.raw,
        store_factory=first.store_factory,
    )
    await first.start()
    await second.start()
    try:
        await send([first, second], plan, rng)

        async def settled() -> bool:
            return await queue_depth(first) == 0

        await wait_until(settled, timeout=30, what="the queue to empty")
        _, data = await first.get("/admin/dlq", ADMIN)
    finally:  # both nodes stop before the schema is dropped
        await second.stop()
        await first.stop()
    assert isinstance(first.moengage, ChaoticMoEngage)
    check(first.moengage, plan, data["dead_letters"])
