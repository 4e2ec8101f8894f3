"""The bridge end to end on the shared PostgreSQL store (the scale-out option)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from segment.analytics import Client

from tests.e2e.harness import WRITE_KEY, basic, on_postgres
from tests.e2e.pgproxy import PgProxy
from tests.e2e.proc import BridgeProcess
from tests.e2e.test_crash_safety import delivered_seqs, moengage_standin, proc_config


async def test_segment_to_moengage_on_postgres_survives_a_restart(make_bridge: Any, pg_schema: str) -> None:
    bridge = await on_postgres(make_bridge, pg_schema)
    client = Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0)
    await asyncio.to_thread(client.identify, "pg-user-1", {"email": "pg@example.com"})
    await asyncio.to_thread(client.track, "pg-user-1", "Stored In Postgres", {"n": 1})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.customers()) == 1 and len(bridge.moengage.events()) == 1)
    assert bridge.moengage.customers()[0]["attributes"] == {"email": "pg@example.com"}

    # Queue while the upstream refuses, restart, and deliver: durability on the shared store.
    bridge.moengage.refuse_all(503)
    batch = {
        "batch": [
            {"type": "track", "userId": "pg-user-2", "event": "Queued", "messageId": f"pg-{i}"} for i in range(10)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, basic(WRITE_KEY)))[0] == 200
    status, data = await bridge.post("/v1/batch", batch, basic(WRITE_KEY))
    assert status == 200 and data["duplicates"] == 10
    await bridge.stop()
    bridge.moengage.refuse_all(None)
    await bridge.start()
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 11, timeout=15)


async def test_a_user_id_too_long_for_a_postgres_index_still_learns_and_uses_its_link(
    make_bridge: Any, pg_schema: str
) -> None:
    """A userId of 3 KB is within Segment's 32 KB an event, but past what PostgreSQL can put
    in a B-tree key: its identity link failed the whole batch's enqueue with a 503, the good
    events with it. The link is stored under a digest and found again for the next call."""

    bridge = await on_postgres(make_bridge, pg_schema)
    long_user = secrets.token_hex(1600)  # random, so PostgreSQL cannot compress it to fit
    good = [{"type": "track", "userId": f"user-{i}", "event": "Fine", "messageId": f"ok-{i}"} for i in range(5)]
    identify = {"type": "identify", "userId": long_user, "traits": {"id": "cust-long"}, "messageId": "long-1"}
    status, data = await bridge.post("/v1/batch", {"batch": [*good, identify]}, basic(WRITE_KEY))
    assert (status, data) == (200, {"success": True})
    later = {"type": "track", "userId": long_user, "event": "After", "messageId": "long-2"}
    status, data = await bridge.post("/v1/batch", {"batch": [later]}, basic(WRITE_KEY))
    assert status == 200, data
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 6, timeout=15)
    after = [e for e in bridge.moengage.events() if e["actions"][0]["action"] == "After"]
    assert [e["customer_id"] for e in after] == ["cust-long"]
    assert [c["customer_id"] for c in bridge.moengage.customers()] == ["cust-long"]


async def test_bridge_serve_delivers_through_a_tcp_proxy_with_latency_to_postgres(
    tmp_path: Path, pg_schema: str
) -> None:
    """Deployments put a proxy between the bridge and PostgreSQL (a cloud SQL proxy, HAProxy,
    a mesh sidecar): a real `bridge serve` whose store is reached through one, 10 ms each
    way, delivers every acknowledged event (identities first, then each user's events)."""
    moengage, server = await moengage_standin()
    proxy = PgProxy(delay=0.01)
    await proxy.start()
    raw = proc_config(tmp_path, str(server.make_url("")).rstrip("/"))
    raw["store"]["url"] = proxy.url(f"?schema={pg_schema}")
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        async with aiohttp.ClientSession() as session:
            for n in range(3):
                batch: list[dict[str, Any]] = [
                    {"type": "identify", "userId": f"proxied-{u}", "traits": {"round": n}, "messageId": f"i{n}-{u}"}
                    for u in range(5)
                ]
                batch += [
                    {
                        "type": "track",
                        "userId": f"proxied-{i % 5}",
                        "event": "Through A Proxy",
                        "messageId": f"t{n}-{i}",
                        "properties": {"seq": f"t{n}-{i}"},
                    }
                    for i in range(20)
                ]
                async with session.post(f"{proc.url}/v1/batch", json={"batch": batch}, headers=basic(WRITE_KEY)) as r:
                    assert r.status == 200, await r.text()
        sent = {f"t{n}-{i}" for n in range(3) for i in range(20)}
        await moengage.wait_for(lambda: delivered_seqs(moengage) == sent and len(moengage.customers()) == 15, 30)
        assert proxy.connections  # the store's connections went through the proxy
    finally:
        await proc.ensure_stopped()
        await proxy.close()
        moengage.stop()
        await server.close()


async def test_a_store_outage_is_logged_once_per_task_not_once_per_poll(tmp_path: Path, pg_schema: str) -> None:
    """PostgreSQL away for a few seconds under a bridge polling every 50 ms: each periodic
    task logs its first failure with the traceback and one line when it works again, not a
    traceback per poll (336 lease_failed lines in 10 s, before), and delivery resumes."""
    moengage, server = await moengage_standin()
    proxy = PgProxy()
    await proxy.start()
    raw = proc_config(tmp_path, str(server.make_url("")).rstrip("/"))
    raw["store"]["url"] = proxy.url(f"?schema={pg_schema}")
    proc = BridgeProcess(raw, tmp_path)
    returned = PgProxy()
    returned.port = proxy.port  # the database comes back where it was
    try:
        await proc.start()
        await proxy.close()
        async with aiohttp.ClientSession() as session:
            track = {"userId": "outage-user", "event": "After The Outage", "properties": {"seq": "after"}}
            async with session.post(f"{proc.url}/v1/track", json=track, headers=basic(WRITE_KEY)) as r:
                assert r.status == 429  # refused while the store is away, never lost
            await asyncio.sleep(5)
            await returned.start()
            for _ in range(100):  # the pool reconnects within a few of its attempts
                async with session.post(f"{proc.url}/v1/track", json=track, headers=basic(WRITE_KEY)) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.2)
            assert r.status == 200
        await moengage.wait_for(lambda: delivered_seqs(moengage) == {"after"}, 30)
        await asyncio.sleep(1)  # the state refresh and the gauges run again too
    finally:
        await proc.ensure_stopped()
        await proxy.close()
        await returned.close()
        moengage.stop()
        await server.close()
    lines = [orjson.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
    events = Counter(line["event"] for line in lines)
    # One worker (its loops share the run), one state refresh: one traceback each.
    assert events["lease_failed"] == 1 and events["destination_state_refresh_failed"] == 1, events
    assert events["lease_recovered"] == 1 and events["destination_state_refresh_recovered"] == 1, events
    recovered = next(line for line in lines if line["event"] == "lease_recovered")
    assert recovered["destination"] == raw["destinations"][0]["name"] and recovered["failures"] > 1
