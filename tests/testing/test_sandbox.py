"""Sandbox upstreams: both stand-ins served in the current loop, logging each request."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from structlog.testing import capture_logs

from bridge.destinations.http import basic_auth
from bridge.testing.standins import MoEngageStandIn, Planned, SegmentStandIn, start_sandbox_upstreams


async def test_sandbox_serves_both_standins_and_logs_a_summary_without_secrets():
    moengage = MoEngageStandIn("SANDBOX_WS", "moe-secret")
    segment = SegmentStandIn({"seg-secret": "us"})
    runners = await start_sandbox_upstreams("127.0.0.1", 0, 0, moengage, segment)
    try:
        moe_port = runners[0].addresses[0][1]
        seg_port = runners[1].addresses[0][1]
        body = {
            "type": "transition",
            "elements": [{"type": "customer", "customer_id": "user-42", "attributes": {"plan": "pro"}}],
        }
        moe_headers = {
            "Authorization": basic_auth("SANDBOX_WS", "moe-secret"),
            "MOE-APPKEY": "SANDBOX_WS",
            "Content-Type": "application/json",
        }
        seg_body = {"batch": [{"type": "track", "event": "Paid", "userId": "u1"}], "writeKey": "seg-secret"}
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{moe_port}/v1/transition/SANDBOX_WS"
                async with session.post(url, data=orjson.dumps(body), headers=moe_headers) as resp:
                    assert resp.status == 200
                async with session.post(f"http://127.0.0.1:{seg_port}/v1/batch", data=orjson.dumps(seg_body)) as resp:
                    assert resp.status == 200
                async with session.post(url, data=b"{}", headers={}) as resp:
                    assert resp.status == 401
    finally:
        for runner in runners:
            await runner.cleanup()
    lines = [entry for entry in logs if entry["event"] == "upstream_request"]
    assert [(e["upstream"], e["status"]) for e in lines] == [("moengage", 200), ("segment", 200), ("moengage", 401)]
    assert lines[0]["summary"] == "bulk customers=1 events=0 devices=0"
    assert "user-42" in lines[0]["body"]
    assert lines[1]["summary"] == "accepted {'track': 1} dropped=0 auth=body"
    assert lines[2]["error"] == "Authentication Header Required"
    assert all(entry["log_level"] == "info" for entry in lines)
    text = repr(logs)
    assert "moe-secret" not in text
    assert "seg-secret" not in text
    assert moengage.customers() == body["elements"]


async def test_sandbox_shutdown_releases_hanging_requests():
    moengage = MoEngageStandIn("WS", "k")
    segment = SegmentStandIn({})
    runners = await start_sandbox_upstreams("127.0.0.1", 0, 0, moengage, segment)
    port = runners[0].addresses[0][1]
    moengage.plan(Planned(hang=True))
    session = aiohttp.ClientSession()
    try:
        pending = session.post(f"http://127.0.0.1:{port}/v1/event/WS", data=b"{}")
        task = asyncio.ensure_future(pending)
        await moengage.wait_for(lambda: moengage.received == 1, timeout=5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for runner in runners:
            await runner.cleanup()
        assert loop.time() - started < 5
        try:
            resp = await asyncio.wait_for(task, 5)
            assert resp.status == 503
            resp.release()
        except aiohttp.ClientError:
            pass  # the server may close the connection first; either way nothing hangs
    finally:
        await session.close()
