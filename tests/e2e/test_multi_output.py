"""An event a mapping gives several outputs: what one attempt delivered, no later one sends again.

The mapping here gives every track a MoEngage Track User and a Create Event (``continue:
true``), and the destination sends each alone (``api: single``), so they go out in two
requests to two endpoints. The stand-in fails only the Create Event endpoint; the Track
User it accepted must not reach it a second time, whether the job is retried, given back
at a shutdown, or dead-lettered and then replayed (MoEngage does not dedupe either call).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.cli import main as cli_main
from bridge.store.base import Store
from bridge.store.sqlite import SqliteStore
from bridge.testing.moengage_standin import MoEngageStandIn, Rejected
from tests.e2e.harness import ADMIN_TOKEN, API_KEY, WORKSPACE, WRITE_KEY, Bridge, basic, wait_until
from tests.e2e.test_operations import copy_mappings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

TWO_OUTPUTS = """\
source_format: segment
destination_kind: moengage
description: every track as a Track User (its last event) and a Create Event
rules:
  - name: user
    match: {type: track}
    kind: customer
    continue: true
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      attributes: {object: {last_event: $.event}}
  - name: event
    match: {type: track}
    kind: event
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      actions:
        - object: {action: $.event, attributes: {path: $.properties, default: {literal: {}}}}
  - name: other
    drop: unsupported_type
"""

# The fix that stops making the Create Event: the first rule alone decides. (The `event` rule
# left below it would never match, which a load refuses.)
TRACK_USER_ONLY = TWO_OUTPUTS.replace("    continue: true\n", "").replace(
    TWO_OUTPUTS[TWO_OUTPUTS.index("  - name: event\n") : TWO_OUTPUTS.index("  - name: other\n")], ""
)

HANG = -1  # an answer of EventsFail: hold the request past the bridge's shutdown, then 503


class EventsFail(MoEngageStandIn):
    """MoEngage whose Create Event endpoint gives its first answers from a script (a status,
    or HANG), then answers as MoEngage does. Every other endpoint answers as MoEngage does."""

    def __init__(self, *answers: int) -> None:
        super().__init__(WORKSPACE, API_KEY)
        self.answers = deque(answers)
        self.event_requests = 0

    async def _event(self, request: web.Request) -> web.Response:
        self.event_requests += 1
        if not self.answers:
            return await super()._event(request)
        answer = self.answers.popleft()
        if answer == HANG:
            await asyncio.sleep(3)  # the bridge gave up on it long before: nothing is recorded
            return self.error(503)
        return await self._handle(request, _refuse(answer), 128_000)


class TrackUserFails(EventsFail):
    """MoEngage whose Track User endpoint answers 503 for ``user`` every time (an outage of
    that user's shard, say), and as MoEngage does for everyone else."""

    def __init__(self, user: str) -> None:
        super().__init__()
        self.user = user

    async def _customer(self, request: web.Request) -> web.Response:
        def accept(body: dict[str, Any]) -> str:
            if body.get("customer_id") == self.user:
                raise Rejected(503, f"scripted 503 for {self.user}")
            return self._accept_customer_request(body)

        return await self._handle(request, accept, 128_000)


def _refuse(status: int) -> Callable[[dict[str, Any]], str]:
    def refuse(body: dict[str, Any]) -> str:
        raise Rejected(status, f"scripted {status} for {body.get('customer_id')}")

    return refuse


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The store the bridge runs on: its SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bridge.db"
        return
    schema = f"bridge_multi_{uuid.uuid4().hex[:10]}"
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    await conn.close()
    yield f"{PG_DSN}?schema={schema}"
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


@contextlib.asynccontextmanager
async def _bridge(
    make_bridge: Any,
    tmp_path: Path,
    upstream: EventsFail,
    store_url: str,
    store: Callable[[], Store] | None = None,
    guard: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    mapping: str = TWO_OUTPUTS,
    **delivery: Any,
) -> AsyncIterator[Bridge]:
    """A bridge whose moengage-main maps with ``mapping`` (TWO_OUTPUTS) and sends to
    ``upstream`` (on ``store`` when given); stopped on the way out, before the store (a
    PostgreSQL schema) is dropped."""
    mappings = copy_mappings(tmp_path)
    (mappings / "two-outputs.yaml").write_text(mapping)
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()

    def tweak(raw: dict[str, Any]) -> None:
        raw["store"]["url"] = store_url
        raw["mappings"]["dir"] = str(mappings)
        raw["server"]["shutdown_timeout"] = 1
        main = raw["destinations"][0]
        main.update(mapping="two-outputs", api="single", base_url=str(server.make_url("")).rstrip("/"))
        main["delivery"].update(delivery)
        main["retry"].update(retry or {})
        if guard is not None:
            main["guard"] = guard

    try:
        bridge = await make_bridge(tweak, start=False)
        bridge.store_factory = store
        await bridge.start()
        try:
            yield bridge
        finally:
            await bridge.stop()
    finally:
        upstream.stop()
        await server.close()


def _tracks(*users: str) -> dict[str, Any]:
    return {
        "batch": [
            {"type": "track", "userId": user, "event": "Ordered", "messageId": f"m-{user}", "properties": {"n": i}}
            for i, user in enumerate(users)
        ]
    }


def _customers(upstream: MoEngageStandIn) -> list[str]:
    return sorted(c["customer_id"] for c in upstream.customers())


def _events(upstream: MoEngageStandIn) -> list[str]:
    return sorted(e["customer_id"] for e in upstream.events())


async def _drained(bridge: Bridge) -> bool:
    _, status = await bridge.get("/admin/status", ADMIN)
    main = next(d for d in status["destinations"] if d["name"] == "moengage-main")
    return bool(main["queue_depth"] == 0)


async def _delivered_total(bridge: Bridge) -> float:
    _, metrics = await bridge.get("/metrics")
    for line in metrics.splitlines():
        if line.startswith('bridge_events_delivered_total{destination="moengage-main"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_retry_sends_only_the_output_that_failed(make_bridge, tmp_path, store_url, ordered):
    upstream = EventsFail(500)
    async with _bridge(make_bridge, tmp_path, upstream, store_url, ordered=ordered) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("alice", "bob"), H))[0] == 200
        await upstream.wait_for(lambda: len(upstream.events()) == 2, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        await asyncio.sleep(0.3)  # a second Track User would have gone out by now
        assert upstream.event_requests == 3  # the failed Create Event, once more, and bob's
        assert _events(upstream) == ["alice", "bob"]
        assert _customers(upstream) == ["alice", "bob"], "a Track User the upstream accepted was sent again"
        assert await _delivered_total(bridge) == 2  # each event counted once, when it was done


@pytest.mark.parametrize("replay_by", ["admin API", "CLI"])
async def test_a_replayed_dead_letter_sends_only_the_output_that_failed(make_bridge, tmp_path, store_url, replay_by):
    upstream = EventsFail(400)  # a bad Create Event: dead-lettered, its Track User delivered
    async with _bridge(make_bridge, tmp_path, upstream, store_url) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("carol"), H))[0] == 200

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            return len(body["dead_letters"]) == 1

        await wait_until(dead_lettered, what="the event in the DLQ")
        assert _customers(upstream) == ["carol"] and _events(upstream) == []
        # The operator sees that part of it went out, and so that a replay sends the rest.
        _, listed = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
        assert listed["dead_letters"][0]["outputs_delivered"] == 1
        if replay_by == "admin API":
            status, body = await bridge.post("/admin/dlq/replay", {"reason": "http_400"}, ADMIN)
            assert (status, body["replayed"]) == (200, 1), body
        else:
            config_path = tmp_path / "ops.yaml"
            config_path.write_text(f'store: {{url: "{bridge.raw["store"]["url"]}"}}\n')
            replay = [
                "dlq",
                "replay",
                "--reason",
                "http_400",
                "--destination",
                "moengage-main",
                "--config",
                str(config_path),
            ]
            assert await asyncio.to_thread(cli_main, replay) == 0
        await upstream.wait_for(lambda: len(upstream.events()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        await asyncio.sleep(0.3)
        assert _events(upstream) == ["carol"]
        assert _customers(upstream) == ["carol"], "the replay sent the Track User delivered before"


async def test_a_shutdown_gives_back_only_the_output_that_did_not_go_out(make_bridge, tmp_path):
    """The Create Event is still in flight when the shutdown's time runs out: cancelled, its
    outcome unknown, the job goes back to the queue. The Track User answered 200 before it
    is not sent again after the restart."""
    upstream = EventsFail(HANG)
    async with _bridge(make_bridge, tmp_path, upstream, f"sqlite:///{tmp_path}/bridge.db") as bridge:
        assert (await bridge.post("/v1/batch", _tracks("dave"), H))[0] == 200
        await upstream.wait_for(lambda: upstream.event_requests == 1, timeout=10)
        assert _customers(upstream) == ["dave"]
        await bridge.stop()
        await bridge.start()
        await upstream.wait_for(lambda: len(upstream.events()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        await asyncio.sleep(0.3)
        assert _customers(upstream) == ["dave"], "the Track User delivered before the shutdown was sent again"


async def test_an_event_whose_outputs_all_went_out_is_acked_without_a_request(make_bridge, tmp_path):
    """Dead-lettered with its Track User delivered; the mapping then stops making the Create
    Event (the fix was to drop it). Replayed, the event has nothing left to send: it is
    delivered, with no request at all."""
    upstream = EventsFail(400)
    async with _bridge(make_bridge, tmp_path, upstream, f"sqlite:///{tmp_path}/bridge.db") as bridge:
        assert (await bridge.post("/v1/batch", _tracks("erin"), H))[0] == 200

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            return len(body["dead_letters"]) == 1

        await wait_until(dead_lettered, what="the event in the DLQ")
        mapping = tmp_path / "mappings" / "two-outputs.yaml"
        mapping.write_text(TRACK_USER_ONLY)
        assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
        requests = upstream.received
        status, body = await bridge.post("/admin/dlq/replay", {"reason": "http_400"}, ADMIN)
        assert (status, body["replayed"]) == (200, 1), body
        await wait_until(lambda: _drained(bridge), what="the replayed job to settle")
        assert upstream.received == requests
        assert _customers(upstream) == ["erin"] and _events(upstream) == []
        assert await _delivered_total(bridge) == 1
        assert bridge.runtime is not None
        assert await bridge.runtime.store.delivered_version("moengage-main", "m-erin")


async def test_an_event_whose_outputs_all_went_out_counts_as_delivered_for_the_guard(make_bridge, tmp_path):
    """Acked without a request, such an event is as good an outcome as one acked after its
    request: the bad-deploy guard weighs it against the dead letters. Uncounted, the guard
    saw only the dead letters that came before it, and the next single refusal paused the
    destination as a bad deploy: 4 dead of the 5 outcomes it knew of (80%), where 4 of 8 (50%)
    is under the threshold."""
    upstream = EventsFail(400, 400, 400, 400)
    guard = {"window": 20, "min_events": 4, "threshold": 0.6}
    db = f"sqlite:///{tmp_path}/bridge.db"
    async with _bridge(make_bridge, tmp_path, upstream, db, guard=guard, ordered=True) as bridge:
        # One lease: each Track User delivered, each Create Event refused for good (3 of 6).
        assert (await bridge.post("/v1/batch", _tracks("ann", "ben", "cat"), H))[0] == 200

        async def dead_letters(n: int) -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            return len(body["dead_letters"]) == n

        await wait_until(lambda: dead_letters(3), what="three dead letters")
        # The fix drops the Create Event: replayed, the three have nothing left to send.
        mapping = tmp_path / "mappings" / "two-outputs.yaml"
        mapping.write_text(TRACK_USER_ONLY)
        assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
        requests = upstream.received
        status, body = await bridge.post("/admin/dlq/replay", {"reason": "http_400"}, ADMIN)
        assert (status, body["replayed"]) == (200, 3), body
        await wait_until(lambda: _drained(bridge), what="the replayed jobs to settle")
        assert upstream.received == requests and await _delivered_total(bridge) == 3
        assert bridge.runtime is not None
        guarded = bridge.runtime.delivery.workers["moengage-main"].guard
        assert (guarded.size, guarded.ratio) == (6, 0.5)

        # The Create Event is back, and one more is refused for good: a bad event among
        # good ones, dead-lettered, not a bad deploy to pause for.
        mapping.write_text(TWO_OUTPUTS)
        assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
        assert (await bridge.post("/v1/batch", _tracks("dan"), H))[0] == 200
        await wait_until(lambda: dead_letters(1), what="dan's dead letter")
        _, state = await bridge.get("/admin/status", ADMIN)
        main = next(d for d in state["destinations"] if d["name"] == "moengage-main")
        assert not main["paused"], main


async def test_a_pause_between_the_outputs_gives_back_only_the_one_not_sent(make_bridge, tmp_path):
    """An operator pauses while the Track User is on the wire: it is answered 200, and the
    Create Event after it is not sent (nothing new starts once paused). The job goes back to
    the queue unsent; after the resume only the Create Event goes out."""
    upstream = EventsFail()
    async with _bridge(make_bridge, tmp_path, upstream, f"sqlite:///{tmp_path}/bridge.db") as bridge:
        upstream.latency = 0.5
        assert (await bridge.post("/v1/batch", _tracks("frank"), H))[0] == 200
        await upstream.wait_for(lambda: upstream.received == 1, timeout=10)
        assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
        await upstream.wait_for(lambda: len(upstream.customers()) == 1, timeout=10)
        await asyncio.sleep(0.3)  # the batch settles: its job given back, unsent
        assert upstream.event_requests == 0
        upstream.latency = 0.0
        assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
        await upstream.wait_for(lambda: len(upstream.events()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        await asyncio.sleep(0.3)
        assert _customers(upstream) == ["frank"], "the Track User sent before the pause was sent again"


def _failing_once(method: str, db: str) -> tuple[SqliteStore, list[int]]:
    """A SQLite store on ``db`` whose ``method`` raises once (a fault of the bridge's own),
    and the count of faults still to come."""
    faults = [1]
    real = getattr(SqliteStore, method)

    async def once(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        if faults[0]:
            faults[0] -= 1
            raise RuntimeError("the disk hiccuped")
        return await real(self, *args, **kwargs)

    failing = type(f"{method.title()}FailsOnce", (SqliteStore,), {method: once})
    return failing(db), faults


async def test_the_retry_after_an_internal_fault_sends_only_the_output_that_failed(make_bridge, tmp_path):
    """The store fails to record the retry once (a fault of the bridge's own): the recovery
    retries the job instead, and that retry too keeps the Track User that went out."""
    db = f"{tmp_path}/bridge.db"
    store, faults = _failing_once("retry", db)
    upstream = EventsFail(500)
    async with _bridge(make_bridge, tmp_path, upstream, f"sqlite:///{db}", store=lambda: store) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("gina"), H))[0] == 200
        await upstream.wait_for(lambda: len(upstream.events()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        await asyncio.sleep(0.3)
        assert faults == [0] and upstream.event_requests == 2
        assert _customers(upstream) == ["gina"], "the retry after the fault sent the Track User again"


async def test_events_acked_by_the_recovery_from_an_internal_fault_count_for_the_guard(make_bridge, tmp_path):
    """Every output of the three events went out, then the store failed to record the ack
    (a fault of the bridge's own): the recovery acks them, as delivered. They are good
    outcomes for the bad-deploy guard too; uncounted, the guard's window missed them."""
    db = f"{tmp_path}/bridge.db"
    store, faults = _failing_once("ack", db)
    upstream = EventsFail()
    async with _bridge(make_bridge, tmp_path, upstream, f"sqlite:///{db}", store=lambda: store) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("hal", "ida", "joe"), H))[0] == 200
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        assert faults == [0] and await _delivered_total(bridge) == 3
        assert _customers(upstream) == ["hal", "ida", "joe"] and len(_events(upstream)) == 3
        assert bridge.runtime is not None
        guarded = bridge.runtime.delivery.workers["moengage-main"].guard
        assert (guarded.size, guarded.ratio) == (3, 0.0)


async def test_an_event_whose_first_output_keeps_failing_ends_in_the_dlq(make_bridge, tmp_path):
    """Ordered: alice's Track User keeps failing (503), so her Create Event, in the request
    after it, is never sent, nor is anything after it in that batch (bob's). Her attempts
    are counted all the same, and once the retry budget is spent she is dead-lettered.
    Given back uncounted (her Create Event "unsent"), she was retried for as long as the
    upstream failed, and never reached the DLQ. Bob, held back only behind her, is
    delivered, each output once."""
    attempts = 3
    upstream = TrackUserFails("alice")
    retry = {"min_attempts": attempts, "max_age": 0}
    db = f"sqlite:///{tmp_path}/bridge.db"
    async with _bridge(make_bridge, tmp_path, upstream, db, retry=retry, ordered=True) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("alice", "bob"), H))[0] == 200
        dead_letters: list[dict[str, Any]] = []

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=retries_exhausted", ADMIN)
            dead_letters[:] = body["dead_letters"]
            return len(dead_letters) == 1

        await wait_until(dead_lettered, what="alice's event in the DLQ")
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        [dead] = dead_letters
        assert (dead["message_id"], dead["attempts"], dead["status"]) == ("m-alice", attempts, 503), dead
        assert dead["outputs_delivered"] == 0
        refused = [s for s in upstream.seen if s.status == 503]
        assert len(refused) == attempts and all("/v1/customer/" in s.path for s in refused)
        assert upstream.event_requests == 1  # bob's: alice's Create Event never went out
        assert _customers(upstream) == ["bob"] and _events(upstream) == ["bob"]
    # Bob was given back once, untried: only the attempt that delivered him counts.
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        row = conn.execute("SELECT attempts FROM jobs WHERE message_id = 'm-bob'").fetchone()
    assert row == (1,)


# Every track as a Create Event ("Opened"), a Track User and a Create Event of its own name.
THREE_OUTPUTS = """\
source_format: segment
destination_kind: moengage
description: every track as an Opened event, a Track User and its own event
rules:
  - name: opened
    match: {type: track}
    kind: event
    continue: true
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      actions: [{object: {action: {literal: Opened}}}]
  - name: user
    match: {type: track}
    kind: customer
    continue: true
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      attributes: {object: {last_event: $.event}}
  - name: event
    match: {type: track}
    kind: event
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      actions: [{object: {action: $.event}}]
  - name: other
    drop: unsupported_type
"""


class OpenedRefusedTrackUserFails(EventsFail):
    """MoEngage that refuses every "Opened" Create Event for good (400) and whose Track User
    answers 503 every time; other Create Events are taken as MoEngage takes them."""

    async def _event(self, request: web.Request) -> web.Response:
        def accept(body: dict[str, Any]) -> str:
            if any(a.get("action") == "Opened" for a in body.get("actions") or []):
                raise Rejected(400, "scripted 400 for Opened")
            return self._accept_event_request(body)

        return await self._handle(request, accept, 128_000)

    async def _customer(self, request: web.Request) -> web.Response:
        return await self._handle(request, _refuse(503), 128_000)


async def test_an_event_refused_for_good_and_for_now_with_an_output_held_back_is_judged(make_bridge, tmp_path):
    """Ordered: alice's first output is refused for good (400), her second for now (503), and
    her third, behind it, is not sent. Her attempt is judged (dead-lettered, as any event with
    an output refused for good): given back uncounted for the unsent one, she went round for
    as long as the Track User failed, never counted, never dead-lettered."""
    upstream = OpenedRefusedTrackUserFails()
    db = f"sqlite:///{tmp_path}/bridge.db"
    async with _bridge(make_bridge, tmp_path, upstream, db, mapping=THREE_OUTPUTS, ordered=True) as bridge:
        assert (await bridge.post("/v1/batch", _tracks("alice"), H))[0] == 200
        dead_letters: list[dict[str, Any]] = []

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            dead_letters[:] = body["dead_letters"]
            return len(dead_letters) == 1

        await wait_until(dead_lettered, what="alice's event in the DLQ")
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        [dead] = dead_letters
        assert (dead["message_id"], dead["attempts"], dead["outputs_delivered"]) == ("m-alice", 1, 0), dead
        assert [(s.path.split("/")[2], s.status) for s in upstream.seen] == [("event", 400), ("customer", 503)]
        assert upstream.events() == [] and upstream.customers() == []


# Every alias as a Track User of the user it merges away and then a merge of that user into
# its userId; every track as a Track User. The merge is a delivery-order barrier
# (Destination.ORDER_BARRIER_KINDS); the Track User before it is not.
TRACK_USER_THEN_MERGE = """\
source_format: segment
destination_kind: moengage
description: every alias as a Track User of the merged user and a merge; every track as a Track User
rules:
  - name: merged-user
    match: {type: alias}
    kind: customer
    continue: true
    body:
      customer_id: {path: $.previousId, pipe: [{to: string}]}
      attributes: {object: {merged_into: $.userId}}
  - name: merge
    match: {type: alias}
    kind: merge
    body:
      merged_user: {path: $.previousId, pipe: [{to: string}]}
      retained_user: {path: $.userId, pipe: [{to: string}]}
  - name: track
    match: {type: track}
    kind: customer
    body:
      customer_id: {path: $.userId, pipe: [{to: string}]}
      attributes: {object: {last_event: $.event}}
  - name: other
    drop: unsupported_type
"""


class TrackUserFailsFirst(EventsFail):
    """MoEngage whose Track User answers 503 for ``user`` the first ``times`` times, 400 for
    ``refused`` every time, and as MoEngage does for everyone else (and for ``user`` after that)."""

    def __init__(self, user: str, times: int, refused: str = "") -> None:
        super().__init__()
        self.user = user
        self.times = times
        self.refused = refused

    async def _customer(self, request: web.Request) -> web.Response:
        def accept(body: dict[str, Any]) -> str:
            if body.get("customer_id") == self.user and self.times > 0:
                self.times -= 1
                raise Rejected(503, f"scripted 503 for {self.user}")
            if self.refused and body.get("customer_id") == self.refused:
                raise Rejected(400, f"scripted 400 for {self.refused}")
            return self._accept_customer_request(body)

        return await self._handle(request, accept, 128_000)


def _track_then_alias(previous_id: str) -> dict[str, Any]:
    return {
        "batch": [
            {"type": "track", "userId": "alice", "event": "Ordered", "messageId": "m-track"},
            {"type": "alias", "userId": "alice", "previousId": previous_id, "messageId": "m-alias"},
        ]
    }


async def test_a_deferred_merge_does_not_send_its_events_accepted_track_user_again(make_bridge, tmp_path, store_url):
    """Unordered: alice's track fails for now (503); her alias, after it, has its Track User
    of anon-1 accepted, and its merge held back behind the track (deferred). Its next attempt
    sends the merge only: deferred without the Track User's digest (Store.defer took none),
    it sent that Track User again, a second one at MoEngage."""
    upstream = TrackUserFailsFirst("alice", times=2)
    async with _bridge(
        make_bridge, tmp_path, upstream, store_url, mapping=TRACK_USER_THEN_MERGE, ordered=False
    ) as bridge:
        assert (await bridge.post("/v1/batch", _track_then_alias("anon-1"), H))[0] == 200
        await upstream.wait_for(lambda: len(upstream.merges()) == 1, timeout=10)
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        assert upstream.merges() == [{"merged_user": "anon-1", "retained_user": "alice"}]
        assert [s.status for s in upstream.seen if s.status != 200] == [503, 503]  # alice's track, twice
        assert _customers(upstream) == ["alice", "anon-1"], "a Track User the upstream accepted was sent again"
        assert await _delivered_total(bridge) == 2


async def test_an_event_refused_for_good_with_its_merge_held_back_is_dead_lettered(make_bridge, tmp_path, store_url):
    """Unordered: alice's track fails for now (503); her alias's Track User of anon-bad is
    refused for good (400), and its merge held back behind the track. The alias is judged:
    dead-lettered at once, its merge kept for the replay. Deferred instead (never judged), it
    sent the refused Track User again each time it came back, uncounted, then the merge, and
    reached the DLQ only once its user's earlier event was delivered."""
    upstream = TrackUserFailsFirst("alice", times=2, refused="anon-bad")
    async with _bridge(
        make_bridge, tmp_path, upstream, store_url, mapping=TRACK_USER_THEN_MERGE, ordered=False
    ) as bridge:
        assert (await bridge.post("/v1/batch", _track_then_alias("anon-bad"), H))[0] == 200
        dead_letters: list[dict[str, Any]] = []

        async def dead_lettered() -> bool:
            _, body = await bridge.get("/admin/dlq?reason=http_400", ADMIN)
            dead_letters[:] = body["dead_letters"]
            return len(dead_letters) == 1

        await wait_until(dead_lettered, what="the alias in the DLQ")
        await wait_until(lambda: _drained(bridge), what="the queue to drain")
        [dead] = dead_letters
        assert (dead["message_id"], dead["attempts"], dead["outputs_delivered"]) == ("m-alias", 1, 0), dead
        assert sorted(s.status for s in upstream.seen) == [200, 400, 503, 503]  # the Track User of anon-bad once
        assert _customers(upstream) == ["alice"] and upstream.merges() == []
