"""Delivery you can trust: upstream failures, splitting, poison isolation, the guard,
isolation between destinations and backpressure, against stand-ins on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from bridge.cli import main as cli_main
from bridge.store.base import DestinationState
from bridge.store.sqlite import SqliteStore
from bridge.testing.moengage_standin import MoEngageStandIn, Rejected
from bridge.testing.standins import Planned
from tests.destinations.keepalive import StaleKeepAliveProxy
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WORKSPACE, WRITE_KEY, basic, nested, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


def tracks(n: int, prefix: str = "e", user: str | None = None, **props: Any) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "userId": user or f"user-{i % 3}",
                "event": "Delivered",
                "messageId": f"{prefix}-{i}",
                "properties": {"seq": f"{prefix}-{i}", **props},
            }
            for i in range(n)
        ]
    }


def seqs(moengage: MoEngageStandIn) -> set[str]:
    return {e["actions"][0]["attributes"]["seq"] for e in moengage.events()}


async def dlq(bridge: Any, query: str = "") -> list[dict[str, Any]]:
    status, data = await bridge.get(f"/admin/dlq{query}", ADMIN)
    assert status == 200, data
    return list(data["dead_letters"])


async def test_500s_then_recovery(bridge):
    bridge.moengage.plan(Planned(500), Planned(502), Planned(503))
    assert (await bridge.post("/v1/batch", tracks(10), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 10, timeout=10)
    statuses = [s.status for s in bridge.moengage.seen]
    assert statuses[:3] == [500, 502, 503] and statuses[-1] == 200


async def test_429_retry_after_is_waited_out(bridge):
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "1"}))
    assert (await bridge.post("/v1/batch", tracks(3), H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 1)
    throttled_at = time.monotonic()
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 3, timeout=10)
    assert time.monotonic() - throttled_at >= 0.95  # Retry-After: 1 second


async def test_429_http_date_retry_after(bridge):
    from email.utils import formatdate

    bridge.moengage.plan(Planned(429, headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)}))
    assert (await bridge.post("/v1/batch", tracks(2), H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 1)
    throttled_at = time.monotonic()
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 2, timeout=10)
    assert time.monotonic() - throttled_at >= 0.9  # HTTP-dates have 1 s resolution


async def test_timeouts_and_connection_resets_are_retried(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["delivery"]["request_timeout"] = 0.3

    bridge = await make_bridge(tweak)
    bridge.moengage.plan(Planned(200, delay=2.0), Planned(reset=True), Planned(reset=True))
    assert (await bridge.post("/v1/batch", tracks(5), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 5, timeout=15)
    assert await dlq(bridge) == []


async def test_a_stale_keep_alive_connection_costs_no_attempt(make_bridge):
    # MoEngage (or its load balancer) closes every pooled connection just as the bridge
    # reuses it. Nothing reached MoEngage, so each such request is sent again at once on a
    # new connection: delivered in its first attempt, with no failure and no backoff.
    bridge = await make_bridge(start=False)
    proxy = StaleKeepAliveProxy(bridge.moengage_server.port)
    bridge.destination("moengage-main")["base_url"] = await proxy.start()
    try:
        await bridge.start()
        for prefix in ("ka", "kb", "kc"):  # one after another, each on a pooled connection
            assert (await bridge.post("/v1/batch", tracks(3, prefix=prefix), H))[0] == 200
            await bridge.moengage.wait_for(lambda p=prefix: f"{p}-2" in seqs(bridge.moengage), timeout=10)

        async def drained() -> bool:  # MoEngage has the last batch; its ack may still be on its way
            return bool((await _status_of(bridge))["queue_depth"] == 0)

        await wait_until(drained, what="the last batch's ack")
        status = await _status_of(bridge)
        assert proxy.dropped >= 1, proxy.dropped
        assert status["last_failure"] is None, status["last_failure"]
        assert status["backing_off_seconds"] == 0 and status["queue_depth"] == 0
        assert all(s.status == 200 for s in bridge.moengage.seen)
        assert await dlq(bridge) == []
    finally:
        await bridge.stop()
        await proxy.close()


async def test_413_splits_the_batch(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["delivery"]["batch_size"] = 200

    bridge = await make_bridge(tweak)
    # The bridge never packs past MoEngage's caps: its 413 is planned (a cap MoEngage lowered).
    bridge.moengage.plan(Planned(413))
    assert (await bridge.post("/v1/batch", tracks(150, pad="p" * 1500), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 150, timeout=15)
    assert 413 in [s.status for s in bridge.moengage.seen]
    assert await dlq(bridge) == []


class PoisonAttributeMoEngage(MoEngageStandIn):
    """Rejects a whole bulk request when any element's event has a poison_ attribute.

    Fault injection: MoEngage drops an element it refuses and answers 200, but it does refuse
    a whole Bulk Import for one element of a type it does not know, which bisection finds.
    (Not moe_, MoEngage's reserved prefix: the shipped mapping renames those before sending.)"""

    def _accept_transition(self, body: dict[str, Any]) -> str:
        for i, element in enumerate(body.get("elements") or []):
            for action in element.get("actions") or []:
                if any(str(k).startswith("poison_") for k in (action.get("attributes") or {})):
                    raise Rejected(400, f"elements[{i}]: poison_ attributes are refused", "InvalidParams")
        return super()._accept_transition(body)


async def test_poison_events_are_bisected_out(make_bridge):
    bridge = await make_bridge(start=False)
    poisoned = PoisonAttributeMoEngage(WORKSPACE, API_KEY)
    server = TestServer(poisoned.app(), host="127.0.0.1")
    await server.start_server()
    try:
        bridge.destination("moengage-main")["base_url"] = str(server.make_url("")).rstrip("/")
        await bridge.start()
        batch = tracks(40)
        for i in (7, 31):
            batch["batch"][i]["properties"]["poison_secret"] = 1
        assert (await bridge.post("/v1/batch", batch, H))[0] == 200
        await poisoned.wait_for(lambda: len(seqs(poisoned)) == 38, timeout=15)
        await wait_until(lambda: _dlq_size(bridge, 2), what="2 dead letters")
        dead = await dlq(bridge)
        assert sorted(d["message_id"] for d in dead) == ["e-31", "e-7"]
        assert {d["reason"] for d in dead} == {"http_400"}
        status, shown = await bridge.get(f"/admin/dlq/{dead[0]['id']}", ADMIN)
        assert status == 200
        assert "refused" in shown["response_body"]
        assert shown["request"]["elements"][0]["actions"][0]["attributes"]["poison_secret"] == 1
        assert shown["event"] == "Delivered" and shown["attempts"] >= 1
    finally:
        poisoned.stop()
        await server.close()


class FailsOnOneEventMoEngage(MoEngageStandIn):
    """Answers 500 to any Bulk Import holding a "Poison" event: an upstream that fails on one
    event's content (redpanda-data/connect#414, shared/reference/peers.md), for now every time."""

    def _accept_transition(self, body: dict[str, Any]) -> str:
        for element in body.get("elements") or []:
            if any(a.get("action") == "Poison" for a in element.get("actions") or []):
                raise Rejected(500, "Internal Server Error", "InternalError")
        return super()._accept_transition(body)


QUICK_RETRIES = {"base_delay": 0.05, "max_delay": 0.1, "max_age": 0.5, "min_attempts": 3}


@contextlib.asynccontextmanager
async def quick_retries_against(make_bridge: Any, upstream: MoEngageStandIn, **delivery: Any) -> AsyncIterator[Any]:
    """A bridge delivering to ``upstream`` with QUICK_RETRIES and ``delivery`` settings."""
    bridge = await make_bridge(start=False)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    try:
        destination = bridge.destination("moengage-main")
        destination["base_url"] = str(server.make_url("")).rstrip("/")
        destination["retry"] = QUICK_RETRIES
        destination["delivery"].update(delivery)
        await bridge.start()
        yield bridge
    finally:
        upstream.stop()
        await server.close()


@pytest.mark.parametrize("ordered", [True, False])
async def test_an_event_refused_for_now_every_time_runs_out_of_retries_alone(make_bridge, ordered):
    """A 5xx is retried, not bisected: an event the upstream always fails on took its
    request's other events with it, and when their retries ran out all of them were
    dead-lettered as retries_exhausted, which paused the destination as a bad deploy. Past
    its budget a job gets one attempt on its own, so only the poison is dead-lettered."""
    poisoned = FailsOnOneEventMoEngage(WORKSPACE, API_KEY)
    async with quick_retries_against(make_bridge, poisoned, ordered=ordered) as bridge:
        batch = tracks(40)
        batch["batch"][5]["event"] = "Poison"
        assert (await bridge.post("/v1/batch", batch, H))[0] == 200
        await wait_until(lambda: _dlq_size(bridge, 1), what="the poison's dead letter", timeout=20)
        await poisoned.wait_for(lambda: len(seqs(poisoned)) == 39, timeout=20)
        (dead,) = await dlq(bridge)
        assert (dead["message_id"], dead["reason"], dead["status"]) == ("e-5", "retries_exhausted", 500)
        _, status = await bridge.get("/admin/status", ADMIN)
        (main,) = [d for d in status["destinations"] if d["name"] == "moengage-main"]
        assert not main["paused"], main
        # Later events go out as usual.
        assert (await bridge.post("/v1/batch", tracks(6, prefix="later"), H))[0] == 200
        await poisoned.wait_for(lambda: len(seqs(poisoned)) == 45, timeout=15)
        assert len(await dlq(bridge)) == 1


class DownMoEngage(MoEngageStandIn):
    """Refuses every Bulk Import with a 503, counting the events each held."""

    def __init__(self, workspace: str, api_key: str) -> None:
        super().__init__(workspace, api_key)
        self.sizes: list[int] = []

    def _accept_transition(self, body: dict[str, Any]) -> str:
        self.sizes.append(len(body.get("elements") or []))
        raise Rejected(503, "Service Unavailable", "ServiceUnavailable")


async def test_an_outage_past_the_retry_budget_sends_each_event_alone_once(make_bridge):
    """While the upstream refuses everything, requests stay shared until the budget runs
    out (from the third attempt on, probed in two halves); then each event has one request of
    its own, and is dead-lettered after it: one request an event, once, not a request an event
    on every attempt."""
    down = DownMoEngage(WORKSPACE, API_KEY)
    async with quick_retries_against(make_bridge, down, ordered=False) as bridge:
        assert (await bridge.post("/v1/batch", tracks(30, prefix="down"), H))[0] == 200
        await wait_until(lambda: _dlq_size(bridge, 30), what="events out of retries", timeout=20)
        dead = await dlq(bridge, "?limit=1000")
        assert {d["reason"] for d in dead} == {"retries_exhausted"} and len(dead) == 30
        # Shared while the budget lasted (three attempts at least), then one each.
        assert down.sizes.count(1) == 30 and down.sizes.count(30) >= 3, down.sizes
        # A probe's two halves at most an attempt of the whole (see test_poison_events).
        assert down.sizes.count(15) <= 2 * down.sizes.count(30), down.sizes
        assert len(down.sizes) == 30 + down.sizes.count(30) + down.sizes.count(15), down.sizes


class RecoveringMoEngage(MoEngageStandIn):
    """Refuses every Bulk Import with a 503 until the first that holds one event (the
    bridge's attempt of an event alone, past its budget); from then on takes each one.
    Every Bulk Import takes ``delays["transition"]`` to answer: an upstream just back from
    an outage, slow but within the request timeout."""

    def __init__(self, workspace: str, api_key: str) -> None:
        super().__init__(workspace, api_key)
        self.up = False

    def _accept_transition(self, body: dict[str, Any]) -> str:
        if len(body.get("elements") or []) == 1:
            self.up = True
        if not self.up:
            raise Rejected(503, "Service Unavailable", "ServiceUnavailable")
        return super()._accept_transition(body)


async def test_the_end_of_an_outage_past_the_budget_times_out_no_event_waiting_for_a_connection(make_bridge):
    """Past the budget, unordered delivery sends a batch's events in a request each, at once:
    hundreds of requests, more than a destination's pool of connections. One waiting in
    aiohttp's pool for a connection spent its request timeout there: against an upstream
    that answered every request well within it, the last ones timed out unsent and, alone
    and past their budget, were dead-lettered as retries_exhausted."""
    upstream = RecoveringMoEngage(WORKSPACE, API_KEY)
    upstream.delays["transition"] = 0.4
    async with quick_retries_against(make_bridge, upstream, ordered=False, request_timeout=1.0) as bridge:
        assert (await bridge.post("/v1/batch", tracks(300, prefix="slow"), H))[0] == 200

        async def settled() -> bool:
            return len(seqs(upstream)) + len(await dlq(bridge, "?limit=1000")) >= 300

        await wait_until(settled, what="every event delivered or dead-lettered", timeout=60)
        assert upstream.up
        assert await dlq(bridge, "?limit=1000") == []
        assert len(seqs(upstream)) == 300


async def _dlq_size(bridge: Any, n: int) -> bool:
    return len(await dlq(bridge)) >= n


async def test_an_element_moengage_would_drop_from_a_bulk_import_is_dead_lettered_not_sent(make_bridge, tmp_path):
    """MoEngage answers a Bulk Import it can read with 200 and drops an element it refuses
    without a word (README, "What the bridge does"), so such an element would be counted
    delivered and lost. The bridge checks each item as MoEngage does first: an action name
    of whitespace alone (MoEngage trims) is dead-lettered, and its neighbours delivered."""
    from tests.e2e.test_operations import copy_mappings, metric

    # A plausible mapping edit: the action name taken from a property, blank in one event.
    mappings = copy_mappings(tmp_path)
    path = mappings / "segment-to-moengage.yaml"
    text = path.read_text()
    # (the track action's else: an event name without moe_, as these are)
    assert "else: {path: $.event, pipe: [{to: string}]}" in text
    path.write_text(text.replace("else: {path: $.event, pipe: [{to: string}]}", "else: {path: $.properties.label}"))

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    batch = tracks(3, prefix="drop", user="user-d", label="Delivered")
    batch["batch"][1]["properties"]["label"] = " "
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200

    async def settled() -> bool:
        _, text = await bridge.get("/metrics")
        return metric(text, "bridge_events_delivered_total", destination="moengage-main") == 2 and bool(
            await dlq(bridge)
        )

    await wait_until(settled, what="two events delivered, one dead-lettered")
    moengage = bridge.moengage
    assert {s.status for s in moengage.seen} == {200}
    assert sorted(seqs(moengage)) == ["drop-0", "drop-2"]
    assert moengage.ignored == []  # nothing reached MoEngage for it to drop
    [dead] = await dlq(bridge)
    assert dead["reason"] == "mapping_invalid_output", dead
    assert not (await _status_of(bridge))["paused"]


@pytest.mark.parametrize(("status", "reason"), [(503, "retries_exhausted"), (404, "http_404")])
async def test_a_dead_letter_of_a_shared_request_keeps_its_own_event_only(make_bridge, status, reason):
    """One Bulk Import carrying six users' events fails for good: each dead letter keeps
    the request its own event alone would make, not the whole request (the other users'
    events, and its size times the number of jobs)."""

    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["retry"] = {"base_delay": 0.05, "max_delay": 0.1, "max_age": 0, "min_attempts": 1}
        d["guard"] = {"enabled": False}

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(status)
    batch = {
        "batch": [
            {"type": "track", "userId": f"user-{i}", "event": "Shared", "messageId": f"m-{i}", "properties": {"i": i}}
            for i in range(6)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await wait_until(lambda: _dlq_size(bridge, 6), what="6 dead letters")
    # The six went out in one request; refused for now past their budget, each then had
    # one attempt alone before it was dead-lettered (see the poison tests above).
    assert bridge.moengage.received == (7 if status == 503 else 1), bridge.moengage.seen
    for entry in await dlq(bridge):
        assert entry["reason"] == reason, entry
        shown_status, shown = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
        assert shown_status == 200
        i = int(entry["message_id"].removeprefix("m-"))
        request = shown["request"]  # parsed: valid JSON, in Bulk Import's shape
        assert isinstance(request, dict) and request["type"] == "transition", shown
        (element,) = request["elements"]
        assert element["customer_id"] == f"user-{i}", shown
        assert element["actions"][0]["attributes"]["i"] == i, shown


async def test_guard_pauses_a_destination_and_resume_delivers_the_backlog(make_bridge, tmp_path):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["guard"] = {"window": 20, "min_events": 10, "threshold": 0.5}
        raw["destinations"][0]["delivery"]["batch_size"] = 5

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(401)  # a bad credential deploy: every request is refused
    assert (await bridge.post("/v1/batch", tracks(30, prefix="bad"), H))[0] == 200

    async def paused() -> bool:
        _, status = await bridge.get("/admin/status", ADMIN)
        return bool(status["destinations"][0]["paused"])

    await wait_until(paused, what="the guard to pause moengage-main")
    dead_before = len(await dlq(bridge))
    assert dead_before < 30  # it stopped instead of dead-lettering everything
    assert (await bridge.post("/v1/batch", tracks(10, prefix="later"), H))[0] == 200
    await asyncio.sleep(0.3)
    assert seqs(bridge.moengage) == set()
    _, metrics = await bridge.get("/metrics")
    assert 'bridge_destination_paused{destination="moengage-main"} 1.0' in metrics

    bridge.moengage.refuse_all(None)
    # Resume from the CLI, as an operator would; the running bridge sees the store's state.
    config_path = tmp_path / "ops.yaml"
    config_path.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
    assert (
        await asyncio.to_thread(cli_main, ["destinations", "resume", "moengage-main", "--config", str(config_path)])
        == 0
    )
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) >= 10 + 30 - dead_before, timeout=15)
    assert {f"later-{i}" for i in range(10)} <= seqs(bridge.moengage)


async def test_a_hung_destination_does_not_delay_another(make_bridge):
    second = MoEngageStandIn(WORKSPACE, API_KEY)
    server = TestServer(second.app(), host="127.0.0.1")
    await server.start_server()

    def tweak(raw: dict[str, Any]) -> None:
        other = dict(raw["destinations"][0], name="moengage-hung", base_url=str(server.make_url("")).rstrip("/"))
        raw["destinations"].append(other)
        raw["sources"][0]["to"] = ["moengage-main", "moengage-hung"]

    try:
        bridge = await make_bridge(tweak)
        second.hold()
        for i in range(3):
            assert (await bridge.post("/v1/batch", tracks(10, prefix=f"r{i}"), H))[0] == 200
        await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 30, timeout=10)
        assert seqs(second) == set()
        second.release()
        await second.wait_for(lambda: len(seqs(second)) == 30, timeout=10)
    finally:
        second.stop()
        await server.close()


async def test_backpressure_answers_429_with_retry_after(make_bridge):
    """A full store answers as Segment's Tracking API does when it cannot take more: 429
    with Retry-After, which analytics-node waits out without spending a retry (a 503 spent
    one each time, and it dropped the batch after its last)."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["store"]["max_bytes"] = 400_000  # an empty store is about 300 KB (16 KiB pages, a page per table and index)

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(503)
    statuses: list[int] = []
    assert bridge.client is not None
    for i in range(200):
        resp = await bridge.client.post("/v1/batch", json=tracks(50, prefix=f"bp{i}", pad="x" * 500), headers=H)
        statuses.append(resp.status)
        if resp.status != 200:
            break
        resp.release()
    assert statuses[-1] == 429, statuses[-1]
    assert (await resp.json())["code"] == "store_full"
    assert resp.headers["Retry-After"] == "30"
    assert set(statuses[:-1]) == {200}
    status, _ = await bridge.get("/healthz")
    assert status == 200


async def test_dead_letters_can_be_listed_replayed_and_purged(bridge, tmp_path, capsys):
    bridge.moengage.refuse_all(404)
    assert (await bridge.post("/v1/batch", tracks(4, prefix="d"), H))[0] == 200
    await wait_until(lambda: _dlq_size(bridge, 4), what="4 dead letters")
    ops = tmp_path / "ops.yaml"
    ops.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
    assert (
        await asyncio.to_thread(cli_main, ["dlq", "list", "--config", str(ops), "--destination", "moengage-main"]) == 0
    )
    out = capsys.readouterr().out
    assert "Delivered" in out and "http_404" in out and "4 dead letter(s)" in out
    assert await asyncio.to_thread(cli_main, ["dlq", "replay", "--config", str(ops)]) == 2  # refuses without a filter
    # A config of the store alone cannot say which destinations the server delivers: the
    # operator names the one to replay into.
    replay = ["dlq", "replay", "--config", str(ops), "--reason", "http_404"]
    assert await asyncio.to_thread(cli_main, replay) == 2
    assert "lists no destinations" in capsys.readouterr().err
    assert len(await dlq(bridge)) == 4
    bridge.moengage.refuse_all(None)
    assert await asyncio.to_thread(cli_main, [*replay, "--destination", "moengage-main"]) == 0
    assert "replayed 4" in capsys.readouterr().out
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 4, timeout=10)
    assert await dlq(bridge) == []


async def test_a_slow_rate_limit_never_sends_an_event_twice(make_bridge):
    """Rate-limit waits longer than the lease used to let a second loop lease and resend."""

    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["delivery"] = {"poll_interval": 0.05, "lease_seconds": 2, "request_timeout": 0.9, "concurrency": 2}
        d["rate_limits"] = {"bulk_events": "120/min"}  # 2 events/s: 6 events need ~3 s, longer than the lease

    bridge = await make_bridge(tweak)
    batch = {
        "batch": [
            {"type": "track", "userId": f"user-{i}", "event": "Slow", "properties": {"seq": f"s{i}"}} for i in range(6)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 6, timeout=20)
    await asyncio.sleep(2.5)  # past another lease: nothing more may arrive
    sent = [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events()]
    assert sorted(sent) == [f"s{i}" for i in range(6)], f"sent twice: {sent}"


async def test_retry_after_holds_the_whole_destination(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["api"] = "single"

    bridge = await make_bridge(tweak)
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "2"}))
    batch = {"batch": [{"type": "track", "userId": f"user-{i}", "event": "Held"} for i in range(20)]}
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 1)
    await asyncio.sleep(1.5)
    assert bridge.moengage.received <= 2, "requests kept flowing during Retry-After"
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 20, timeout=10)


@pytest.mark.parametrize("resume_by", ["admin API", "CLI"])
async def test_a_resume_delivers_now_what_a_long_retry_after_held_back(bridge, resume_by):
    """A 429 asked for 10 minutes; the operator pauses, fixes what was wrong, and resumes.
    The resume means "now": the destination's backoff and its jobs' retry times give way."""
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "600"}))
    assert (await bridge.post("/v1/batch", tracks(5), H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 1)
    await asyncio.sleep(0.3)  # the 429 is settled: every job waits for its retry time
    assert seqs(bridge.moengage) == set()
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    if resume_by == "admin API":
        status, data = await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN)
        assert (status, data["made_due"]) == (200, 5), data
    else:
        config_path = bridge.tmp_path / "ops.yaml"
        config_path.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
        resume = ["destinations", "resume", "moengage-main", "--config", str(config_path)]
        assert await asyncio.to_thread(cli_main, resume) == 0
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 5, timeout=10)


async def test_a_cli_resume_of_a_destination_that_was_not_paused_still_ends_its_backoff(bridge):
    """No pause first: the operator just resumes from the CLI to say "deliver now". The
    running bridge sees the new resume in the store and drops its backoff too."""
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "600"}))
    assert (await bridge.post("/v1/batch", tracks(4), H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 1)
    await asyncio.sleep(0.3)
    assert seqs(bridge.moengage) == set()
    config_path = bridge.tmp_path / "bridge.yaml"  # the bridge's own config (JSON is YAML)
    config_path.write_bytes(orjson.dumps(bridge.raw))
    resume = ["destinations", "resume", "moengage-main", "--config", str(config_path)]
    assert await asyncio.to_thread(cli_main, resume) == 0
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 4, timeout=10)


async def test_an_internal_fault_backs_off_and_ends_in_the_dlq(make_bridge):
    """A fault of the bridge's own (here: the store refusing one discard record) must not
    become a hot loop that starves the rest of the queue."""
    from bridge.store.base import Discard
    from bridge.store.sqlite import SqliteStore

    leases = 0

    class FlakyStore(SqliteStore):
        async def discard(self, entries: Any, *, fence: Any = None) -> None:
            if any(isinstance(e, Discard) and e.label == "Boom" for e in entries):
                # An internal fault's text may quote a credential (a driver echoing a DSN).
                raise RuntimeError("cannot record this discard at postgresql://bridge:hunter2-secret@db/x")
            await super().discard(entries, fence=fence)

        async def lease(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal leases
            jobs = await super().lease(*args, **kwargs)
            leases += bool(jobs)
            return jobs

    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["delivery"] = {"poll_interval": 0.05, "concurrency": 1}
        d["retry"] = {"base_delay": 0.2, "max_delay": 0.4, "max_age": 1.0, "min_attempts": 2}

    bridge = await make_bridge(tweak, start=False)
    db = bridge.raw["store"]["url"].removeprefix("sqlite:///")
    bridge.store_factory = lambda: FlakyStore(db)
    await bridge.start()
    assert (await bridge.post("/v1/track", {"anonymousId": "anon-1", "event": "Boom"}, H))[0] == 200
    good = {"batch": [{"type": "track", "userId": f"user-{i}", "event": "Good"} for i in range(5)]}
    assert (await bridge.post("/v1/batch", good, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 5, timeout=10)

    async def dead() -> bool:
        _, body = await bridge.get("/admin/dlq?reason=internal_error", ADMIN)
        return len(body["dead_letters"]) == 1

    await wait_until(dead, what="the faulty job to be dead-lettered")
    assert leases < 30, f"{leases} leases: the fault was retried in a hot loop"
    _, body = await bridge.get("/admin/dlq?reason=internal_error", ADMIN)
    (letter,) = body["dead_letters"]
    _, shown = await bridge.get(f"/admin/dlq/{letter['id']}", ADMIN)
    kept = orjson.dumps(shown).decode()
    assert "cannot record this discard" in kept  # the fault is kept, its credential is not
    assert "hunter2-secret" not in kept
    # Which mapping version met the fault, as every other dead letter says.
    assert shown["mapping_version"] and shown["mapping_version"] == (await _status_of(bridge))["mapping_version"]


async def _status_of(bridge: Any, name: str = "moengage-main") -> dict[str, Any]:
    _, status = await bridge.get("/admin/status", ADMIN)
    return next(d for d in status["destinations"] if d["name"] == name)


async def test_a_credential_deploy_pauses_before_dead_lettering_a_batch(bridge):
    """Every request refused with 401: the guard pauses instead of dead-lettering the batch."""
    bridge.moengage.refuse_all(401)
    assert (await bridge.post("/v1/batch", tracks(60, prefix="cred"), H))[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what="the guard to pause moengage-main")
    status = await _status_of(bridge)
    assert "401" in status["pause_reason"], status
    assert await dlq(bridge) == [] and status["queue_depth"] == 60  # all still queued, none dead

    bridge.moengage.refuse_all(None)  # the credential is fixed; an operator resumes
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 60, timeout=10)
    assert len(bridge.moengage.events()) == 60


async def test_an_alias_refused_for_a_suspended_account_pauses_and_waits_in_the_queue(bridge):
    """Merge User answers a suspended account with a 400, not the other endpoints' 403: the
    merge waits, queued, with the destination paused, instead of being dead-lettered."""
    bridge.moengage.suspended = True
    alias = {"previousId": "anon-7", "userId": "user-7", "messageId": "alias-7"}
    assert (await bridge.post("/v1/alias", alias, H))[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what="moengage-main to pause on the suspended account")
    status = await _status_of(bridge)
    assert "HTTP 400" in status["pause_reason"] and "Account Suspended" in status["pause_reason"], status
    assert await dlq(bridge) == [] and status["queue_depth"] == 1

    bridge.moengage.suspended = False  # MoEngage lifts the suspension; an operator resumes
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.merges()) == 1, timeout=10)
    assert bridge.moengage.merges() == [{"merged_user": "anon-7", "retained_user": "user-7"}]


@pytest.mark.parametrize("deploy", ["reload", "restart"])
async def test_a_mapping_deploy_that_fails_every_event_pauses_until_the_mapping_changes(make_bridge, tmp_path, deploy):
    """The fix arrives by a reload, or as a container deploy brings it: new files, new
    process. The pause recorded the version that failed, so either way it lifts."""
    from tests.e2e.test_operations import break_track_action, copy_mappings

    mappings = copy_mappings(tmp_path)
    good = (mappings / "segment-to-moengage.yaml").read_text()
    break_track_action(mappings)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    assert (await bridge.post("/v1/batch", tracks(30, prefix="map"), H))[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what="the guard to pause on the broken mapping")
    assert "failed to map" in (await _status_of(bridge))["pause_reason"]
    assert await dlq(bridge) == []
    if deploy == "restart":
        await bridge.stop()
        (mappings / "segment-to-moengage.yaml").write_text(good)
        await bridge.start()
    else:
        (mappings / "segment-to-moengage.yaml").write_text(good)
        assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 30, timeout=10)
    assert not (await _status_of(bridge))["paused"]


async def test_events_a_bad_mapping_discarded_are_delivered_once_it_is_fixed_and_they_are_replayed(
    make_bridge, tmp_path
):
    """A one-letter typo in the customer_id let: every event now maps to "no user" and is
    discarded, not failed, so the guard has nothing to count. The discards keep the
    events; after the fix, a replay (admin API, then the CLI) delivers them in order."""
    from tests.e2e.test_operations import copy_mappings

    mappings = copy_mappings(tmp_path)
    path = mappings / "segment-to-moengage.yaml"
    good = path.read_text()
    assert "      - $.userId\n" in good
    path.write_text(good.replace("      - $.userId\n", "      - $.userid\n", 1))

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    assert (await bridge.post("/v1/batch", tracks(12, prefix="typo", user="user-t"), H))[0] == 200
    assert (await bridge.post("/v1/batch", tracks(6, prefix="other"), H))[0] == 200

    async def all_discarded() -> bool:
        _, body = await bridge.get("/admin/discards?reason=anonymous_user", ADMIN)
        return len(body["discards"]) == 18

    await wait_until(all_discarded, what="every event discarded by the broken mapping")
    assert bridge.moengage.events() == []
    path.write_text(good)
    assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
    status, body = await bridge.post("/admin/discards/replay", {}, ADMIN)
    assert (status, body["code"]) == (400, "filter_required")  # never everything by accident
    status, body = await bridge.post(
        "/admin/discards/replay", {"reason": "anonymous_user", "destination": "moengage-main"}, ADMIN
    )
    assert status == 200 and body["replayed"] == 18, body
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 18, timeout=10)
    mine = [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events() if e["customer_id"] == "user-t"]
    assert mine == [f"typo-{i}" for i in range(12)], mine
    _, body = await bridge.get("/admin/discards", ADMIN)
    assert body["discards"] == []

    # The CLI replays discards too, and refuses to replay everything without --all, or (with a
    # config of the store alone) into destinations it was not told the server delivers.
    config_path = tmp_path / "ops.yaml"
    config_path.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
    replay = ["discards", "replay", "--config", str(config_path)]
    assert await asyncio.to_thread(cli_main, replay) == 2
    assert await asyncio.to_thread(cli_main, [*replay, "--reason", "anonymous_user"]) == 2
    assert await asyncio.to_thread(cli_main, [*replay, "--reason", "anonymous_user", "--all-destinations"]) == 0


@pytest.mark.parametrize("concurrency", [1, 2])  # 1: the loop pipelines (see worker._loop)
async def test_shutdown_starts_no_new_request_and_keeps_what_was_delivered(make_bridge, concurrency):
    """A batch that outlasts the shutdown timeout: what the upstream accepted is acked, the
    rest goes back to the queue, and after a restart nothing is sent twice."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["shutdown_timeout"] = 1
        raw["destinations"][0]["max_request_bytes"] = 1024  # one event per request
        raw["destinations"][0]["delivery"]["concurrency"] = concurrency

    bridge = await make_bridge(tweak)
    bridge.moengage.latency = 0.3
    pad = "x" * 700  # one event per 1024-byte request
    assert (await bridge.post("/v1/batch", tracks(20, prefix="sd", user="user-sd", pad=pad), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) >= 2, timeout=10)
    await bridge.stop()
    sent_before_restart = len(bridge.moengage.events())
    assert sent_before_restart < 6  # it stopped sending instead of finishing the batch

    bridge.moengage.latency = 0.0
    await bridge.start()
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 20, timeout=15)
    await asyncio.sleep(0.2)
    sent = [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events()]
    assert sorted(sent) == sorted(f"sd-{i}" for i in range(20)), "an event was sent twice after the restart"
    assert sent == [f"sd-{i}" for i in range(20)]  # and in order


@pytest.mark.parametrize("concurrency", [1, 2])  # 1: the loop pipelines (see worker._loop)
async def test_a_shutdown_that_cancels_a_request_keeps_what_was_delivered_before_it(make_bridge, concurrency):
    """The request in flight outlasts the shutdown timeout and is cancelled: its outcome is
    unknown, so it goes back to the queue, but the requests answered 200 before it are acked."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["server"]["shutdown_timeout"] = 0.5
        raw["destinations"][0]["max_request_bytes"] = 1024
        raw["destinations"][0]["delivery"]["concurrency"] = concurrency

    bridge = await make_bridge(tweak)
    bridge.moengage.latency = 0.4
    pad = "x" * 700
    assert (await bridge.post("/v1/batch", tracks(12, prefix="cx", user="user-cx", pad=pad), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) >= 2, timeout=10)
    bridge.moengage.latency = 3.0  # the next request hangs past the shutdown timeout
    await bridge.stop()
    answered = [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events()]

    bridge.moengage.latency = 0.0
    await bridge.start()
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 12, timeout=15)
    await asyncio.sleep(0.2)
    sent = [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events()]
    again = [seq for seq in sent[len(answered) :] if seq in answered]
    assert again == [], f"acknowledged by the upstream before the shutdown, then sent again: {again}"


async def test_a_few_bad_events_in_a_big_batch_are_dead_lettered_not_a_pause(make_bridge):
    """25 poison events among 300, in one batch after a (re)start: the guard must weigh them
    against the batch's good deliveries (8%), not pause the destination."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["delivery"]["batch_size"] = 500

    bridge = await make_bridge(tweak, start=False)
    poisoned = PoisonAttributeMoEngage(WORKSPACE, API_KEY)
    server = TestServer(poisoned.app(), host="127.0.0.1")
    await server.start_server()
    try:
        bridge.destination("moengage-main")["base_url"] = str(server.make_url("")).rstrip("/")
        await bridge.start()
        batch = tracks(300, prefix="few")
        for i in range(0, 300, 12):
            batch["batch"][i]["properties"]["poison_secret"] = 1
        assert (await bridge.post("/v1/batch", batch, H))[0] == 200
        await poisoned.wait_for(lambda: len(seqs(poisoned)) == 275, timeout=20)
        await wait_until(lambda: _dlq_size(bridge, 25), what="25 dead letters")
        assert not (await _status_of(bridge))["paused"]
    finally:
        poisoned.stop()
        await server.close()


@pytest.mark.parametrize("status", [401, 403, 409, 415])
async def test_an_account_refusal_pauses_at_once_even_for_a_few_events_after_good_traffic(bridge, status):
    """A rotated key (401), a suspended account (403), an app key mismatch (409): MoEngage
    says it of the account, not of the events, so every event would get it. A few calls
    after a day of good traffic are far below what the guard needs to trip: they must
    still wait, queued, not fill the DLQ one by one until it does."""
    assert (await bridge.post("/v1/batch", tracks(30, prefix="good"), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 30, timeout=10)
    bridge.moengage.refuse_all(status)
    for i in range(5):
        assert (
            await bridge.post(
                "/v1/track", {"userId": f"after-{i}", "event": "E", "properties": {"seq": f"after-{i}"}}, H
            )
        )[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what=f"the pause for HTTP {status}")
    await asyncio.sleep(0.3)  # any later batch would be dead-lettered by now, were it sent
    state = await _status_of(bridge)
    assert str(status) in state["pause_reason"], state
    assert await dlq(bridge) == [] and state["queue_depth"] == 5, state

    # An operator resumes before the fix: the first batch is refused again, and it pauses
    # again rather than dead-letter (the guard's "resume forces progress" is for events
    # judged bad, and these are not).
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await wait_until(paused, what="the pause after a resume that fixed nothing")
    assert await dlq(bridge) == []

    bridge.moengage.refuse_all(None)
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 35, timeout=10)
    assert await dlq(bridge) == []


async def test_the_guard_never_replaces_an_operators_pause(bridge):
    """An operator pauses while a bad batch is in flight: the guard must not turn that pause
    into its own (which a mapping reload would lift)."""
    bridge.moengage.refuse_all(401)
    bridge.moengage.latency = 0.5
    assert (await bridge.post("/v1/batch", tracks(60, prefix="op"), H))[0] == 200
    await wait_until(lambda: bridge.moengage.received > 0, what="the batch to be in flight")
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    await asyncio.sleep(1.0)  # the in-flight request is answered 401 and the batch settles
    status = await _status_of(bridge)
    assert status["paused"] and status["pause_reason"] == "paused by admin API", status
    assert bridge.runtime is not None
    state = (await bridge.runtime.store.get_destination_states())["moengage-main"]
    assert state.extra.get("by") != "guard"


async def test_a_fault_after_a_successful_send_does_not_send_it_again(make_bridge):
    """The store fails to record an ack once: the recovery must ack what the upstream
    accepted, not schedule it for another send."""
    from bridge.store.sqlite import SqliteStore

    failures = 1

    class AckOnceFails(SqliteStore):
        async def ack(self, job_ids: Any, mapping_version: str = "", **kw: Any) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise RuntimeError("the disk hiccuped")
            await super().ack(job_ids, mapping_version, **kw)

    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["retry"] = {"base_delay": 0.05, "max_delay": 0.1}

    bridge = await make_bridge(tweak, start=False)
    db = bridge.raw["store"]["url"].removeprefix("sqlite:///")
    bridge.store_factory = lambda: AckOnceFails(db)
    await bridge.start()
    assert (await bridge.post("/v1/batch", tracks(5, prefix="once"), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 5, timeout=10)

    async def drained() -> bool:
        return bool((await _status_of(bridge))["queue_depth"] == 0)

    await wait_until(drained, what="the queue to drain")
    await asyncio.sleep(0.3)  # a wrongly scheduled retry would have gone out by now
    assert failures == 0 and len(bridge.moengage.events()) == 5


async def test_ingest_does_not_spin_a_paused_destinations_loop(bridge):
    """Each request wakes its destinations' workers; a paused one has nothing to lease, so
    the wake-ups are ignored until the resume (under load they cost a loop turn per request)."""
    assert bridge.runtime is not None
    worker = bridge.runtime.delivery.workers["moengage-main"]
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    await wait_until(lambda: worker.paused, what="the worker to see the pause")
    turns = 0
    check = worker._check_mapping_changed

    async def counted() -> None:
        nonlocal turns
        turns += 1
        await check()

    worker._check_mapping_changed = counted
    started = time.monotonic()
    for i in range(40):
        event = {"type": "track", "userId": f"user-w{i}", "event": "While Paused", "messageId": f"w-{i}"}
        assert (await bridge.post("/v1/track", event, H))[0] == 200
    await asyncio.sleep(0.2)
    # It still polls (a guard's pause ends when the mapping changes): about once per
    # poll_interval (0.05 s here), never once per request.
    polls = (time.monotonic() - started) / worker.config.delivery.poll_interval
    assert turns < 20, f"the paused worker's loop turned {turns} times for 40 requests ({polls:.0f} polls)"
    assert bridge.moengage.events() == []
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await wait_until(lambda: len(bridge.moengage.events()) == 40, what="the backlog to be delivered after the resume")


async def test_one_loop_maps_its_next_batch_while_one_is_on_the_wire_and_keeps_each_users_order(make_bridge):
    """``concurrency: 1`` pipelines: the next batch is leased (its predecessor ``ahead``)
    while a request is in flight. When that request fails, the next batch's events of the
    same users must wait for the retry, not overtake it: with no backoff at all here,
    only the hold-back keeps them in order."""
    leased_ahead: list[int] = []

    class Watched(SqliteStore):
        async def lease(self, *args: Any, **kwargs: Any) -> Any:
            jobs = await super().lease(*args, **kwargs)
            if jobs and kwargs.get("ahead"):
                leased_ahead.append(len(jobs))
            return jobs

    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["delivery"] = {"poll_interval": 0.05, "batch_size": 4, "concurrency": 1}
        d["retry"] = {"base_delay": 0, "max_delay": 0}

    bridge = await make_bridge(tweak, start=False)
    db = bridge.raw["store"]["url"].removeprefix("sqlite:///")
    bridge.store_factory = lambda: Watched(db)
    await bridge.start()
    bridge.moengage.plan(Planned(500, delay=0.3))
    batch = {
        "batch": [
            {"type": "track", "userId": f"user-{i % 3}", "event": "Step", "properties": {"n": i}} for i in range(24)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) >= 24, timeout=15)
    await asyncio.sleep(0.2)
    assert leased_ahead, "the loop never leased a batch while another was on the wire"
    events = bridge.moengage.events()
    assert sorted(e["actions"][0]["attributes"]["n"] for e in events) == list(range(24))  # each once
    for user in ("user-0", "user-1", "user-2"):
        seen = [e["actions"][0]["attributes"]["n"] for e in events if e["customer_id"] == user]
        assert seen == sorted(seen), f"{user} got events out of order: {seen}"


async def test_an_event_too_deep_to_send_is_dead_lettered_alone_and_its_batch_goes_on(make_bridge, tmp_path):
    """orjson reads 1024 levels but writes 254. Ingest refuses an event deeper than any
    destination's shape could send (bridge/sources/encoding.py); a mapping may still wrap
    what it takes deeper than that, and such an event nests past 254 once mapped. It is
    dead-lettered as a request that cannot be built, at once; the rest of its lease is
    delivered, not retried with it until the retry budget runs out."""
    from tests.e2e.test_operations import copy_mappings

    mappings = copy_mappings(tmp_path)
    path = mappings / "segment-to-moengage.yaml"
    # The track rule's attributes are its first object with this field (page and screen follow).
    plain = "moe_project_name: $.properties.moe_project_name"
    wrapped = "wrapped: {object: {again: $.properties}}"
    assert plain in path.read_text()
    path.write_text(path.read_text().replace(plain, wrapped, 1))  # two levels past the shape's own

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    batch = tracks(6, prefix="ok")
    for levels in (249, 250):  # the second is as deep as ingest takes (252 levels, the event's own included)
        deep = {"type": "track", "userId": "user-deep", "event": "Deep", "properties": nested(levels)}
        deep["messageId"] = f"deep-{levels}"
        batch["batch"].insert(2, deep)
    status, answer = await bridge.post("/v1/batch", batch, H)
    assert status == 200 and "rejected" not in answer, answer
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 6)
    assert seqs(bridge.moengage) == {f"ok-{i}" for i in range(6)}

    async def dead_lettered() -> bool:
        return len(await dlq(bridge, "?reason=render_error")) == 2

    await wait_until(dead_lettered, what="the deep events in the DLQ")
    entries = await dlq(bridge, "?reason=render_error")
    assert {e["message_id"] for e in entries} == {"deep-249", "deep-250"}, entries
    for entry in entries:
        # Shown too: a payload too deep to nest in the answer comes back as its text.
        status, full = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
        assert status == 200 and "cannot be written as JSON" in full["response_body"], full
        assert full["payload"] is not None
    assert await dlq(bridge, "?reason=internal_error") == []


async def test_a_discarded_event_as_deep_as_ingest_takes_can_still_be_listed(bridge, tmp_path, capsys):
    """A listing nests each record's payload three levels down ({"discards": [{"payload":
    ...}]}, and the CLI's [{"payload": ...}] as deep): an event as deep as ingest takes (252
    levels) was 255 there, past what orjson writes. One such event discarded (a one-letter
    userId) made every GET /admin/discards a 500, and `bridge discards list --json` crash,
    until it was pruned. It is shown as text, as a dead letter too deep to nest is."""
    deep = {"type": "track", "userId": "u", "event": "Deep", "messageId": "deep-discard", "properties": nested(250)}
    status, answer = await bridge.post("/v1/track", deep, H)
    assert status == 200, answer

    async def discarded() -> bool:
        return bool((await _status_of(bridge))["discarded"].get("invalid_customer_id"))

    await wait_until(discarded, what="the deep event discarded")
    status, body = await bridge.get("/admin/discards", ADMIN)
    assert status == 200, body
    [record] = body["discards"]
    assert record["message_id"] == "deep-discard" and isinstance(record["payload"], str), record
    assert orjson.loads(record["payload"])["properties"] == nested(250)

    config_path = tmp_path / "ops.yaml"
    config_path.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
    capsys.readouterr()
    listed = ["discards", "list", "--json", "--config", str(config_path)]
    assert await asyncio.to_thread(cli_main, listed) == 0
    [record] = orjson.loads(capsys.readouterr().out)
    assert record["message_id"] == "deep-discard" and isinstance(record["payload"], str), record


@pytest.mark.parametrize("levels", [247, 250])  # 248 and 251 objects under traits.z
async def test_translate_answers_400_for_an_event_whose_translation_is_too_deep(bridge, levels):
    deep = {"type": "identify", "userId": "x1", "traits": {"id": "x1", "z": nested(levels)}}
    status, body = await bridge.post("/admin/translate?mapping=segment-to-moengage", deep, ADMIN)
    assert status == 400 and body["code"] == "event_too_deep", body
    fine = {"type": "identify", "userId": "x1", "traits": {"id": "x1", "z": nested(20)}}
    status, body = await bridge.post("/admin/translate?mapping=segment-to-moengage", fine, ADMIN)
    assert status == 200, body


async def test_a_destination_refusing_everything_with_400_pauses_without_dead_letters(bridge):
    """A 400 to every request (a bad deploy on either side) is bisected like a poison
    event, down to single events; the guard then pauses the destination. The events the
    bisect already judged belong to the same refusal: they stay queued with the rest,
    not in the DLQ, and a resume once it is fixed delivers every one of them."""
    bridge.moengage.refuse_all(400)
    assert (await bridge.post("/v1/batch", tracks(60, prefix="all400"), H))[0] == 200

    async def paused() -> bool:
        return bool((await _status_of(bridge))["paused"])

    await wait_until(paused, what="the guard to pause moengage-main")
    await asyncio.sleep(0.2)
    status = await _status_of(bridge)
    assert "400" in status["pause_reason"], status
    assert await dlq(bridge) == [] and status["queue_depth"] == 60, status

    bridge.moengage.refuse_all(None)
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 60, timeout=10)
    assert await dlq(bridge) == []


async def test_a_refusal_answered_after_the_destination_paused_stays_queued(bridge):
    """A batch on the wire while the destination pauses (here an operator's pause; in CI the
    guard, tripped by another loop's batch of the same bad deploy): its 400 is not judged
    now. Dead-lettered, a bad deploy's events reached the DLQ after the pause that was meant
    to keep them queued; held, the attempt after the resume judges them."""
    moengage = bridge.moengage
    moengage.hold()
    assert (await bridge.post("/v1/batch", tracks(1, prefix="onwire"), H))[0] == 200
    await moengage.wait_for(lambda: moengage.received == 1)
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    moengage.refuse_all(400)
    moengage.release()
    await moengage.wait_for(lambda: len(moengage.seen) == 1)
    await asyncio.sleep(0.3)  # the batch settles
    status = await _status_of(bridge)
    assert await dlq(bridge) == [] and status["queue_depth"] == 1, status
    moengage.refuse_all(None)
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await moengage.wait_for(lambda: seqs(moengage) == {"onwire-0"}, timeout=10)


async def test_the_guard_never_replaces_an_operators_pause_made_from_the_cli(make_bridge, tmp_path):
    """README: "The guard never replaces an operator's pause" and `bridge destinations
    pause NAME` works while the bridge runs. An operator pauses from the CLI (or on another
    node of a PostgreSQL store) while a batch the upstream refuses with 401 is on the wire.
    The server has not polled the states yet when the guard trips, and its unconditional
    upsert overwrites the operator's pause with the guard's, which a mapping change lifts."""

    def tweak(raw: dict[str, Any]) -> None:
        for d in raw["destinations"]:
            d["delivery"]["poll_interval"] = 3  # the server reads the states every 3 s

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(401)
    bridge.moengage.latency = 0.5
    batch = {
        "batch": [
            {"type": "track", "userId": f"user-{i % 3}", "event": "X", "messageId": f"op-{i}", "properties": {}}
            for i in range(60)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received > 0, timeout=10)
    cli = SqliteStore(str(tmp_path / "bridge.db"), upgrade=False)  # what `bridge destinations pause` opens
    await cli.open()
    try:
        await cli.set_destination_state(DestinationState("moengage-main", True, "paused from the CLI", time.time()))
    finally:
        await cli.close()
    await asyncio.sleep(1.0)  # the 401 is answered, the guard trips; the server has not polled yet
    assert bridge.runtime is not None
    state = (await bridge.runtime.store.get_destination_states())["moengage-main"]
    assert state.extra.get("by") != "guard" and state.reason == "paused from the CLI", state


async def test_status_says_what_the_upstream_last_answered_and_how_long_the_backoff_holds(bridge):
    # While MoEngage fails, the queue grows; /admin/status said only that, and on-call had
    # to read the logs for why. It now carries the last failed answer and the backoff.
    before = await _status_of(bridge)
    assert before["last_failure"] is None and before["last_delivered_at"] is None
    assert before["backing_off_seconds"] == 0
    bridge.moengage.plan(Planned(429, headers={"Retry-After": "3"}))
    assert (await bridge.post("/v1/batch", tracks(3, prefix="st"), H))[0] == 200

    async def failed() -> bool:
        return (await _status_of(bridge))["last_failure"] is not None

    await wait_until(failed, what="a failed attempt in /admin/status")
    status = await _status_of(bridge)
    failure = status["last_failure"]
    assert failure["status"] == 429 and failure["action"] == "retry" and failure["items"] == 3
    assert failure["at"].endswith("Z") and "accepted" not in failure["body"]
    assert 0 < status["backing_off_seconds"] <= 3  # the Retry-After holds the destination
    assert status["queue_depth"] == 3 and status["last_delivered_at"] is None
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 3, timeout=10)

    async def delivered() -> bool:
        return (await _status_of(bridge))["last_delivered_at"] is not None

    await wait_until(delivered, what="a delivery in /admin/status")
    after = await _status_of(bridge)
    assert after["backing_off_seconds"] == 0 and after["last_failure"]["status"] == 429  # kept: when it was


async def test_status_counts_the_events_a_mapping_discarded_by_reason(bridge):
    # A one-character user id is no MoEngage id: the event is acknowledged, discarded by
    # the mapping and never sent. Status showed nothing of it, so "accepted, nothing
    # delivered, nothing logged" looked like a stuck queue.
    assert (await _status_of(bridge))["discarded"] == {}
    batch = tracks(2, prefix="dc", user="u")
    batch["batch"].append({"type": "track", "anonymousId": "a-1", "event": "X", "messageId": "dc-anon"})
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200

    async def counted() -> bool:
        return bool(sum((await _status_of(bridge))["discarded"].values()) == 3)

    await wait_until(counted, what="three discards in /admin/status")
    assert (await _status_of(bridge))["discarded"] == {"invalid_customer_id": 2, "anonymous_user": 1}
