"""Sandbox mode: stand-ins served in the current loop, logging each request, and wired to
accept what the real upstreams would for every configured destination."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.app import build_app
from bridge.bindings import PrometheusBindings
from bridge.config.model import Config
from bridge.destinations.http import basic_auth
from bridge.runtime import Runtime
from bridge.sandbox import SandboxUpstreams, placeholder, sandbox_config, start_standins
from bridge.testing.standins import MoEngageStandIn, Planned, SegmentStandIn, start_sandbox_upstreams
from tests.e2e.proc import free_port

REPO = Path(__file__).resolve().parents[2]


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


# -- `bridge serve --sandbox`: every configured destination gets what its upstream accepts --


def sandbox_yaml(tmp_path: Path, sources: str, destinations: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A config file whose ${VARS} are unset, as when `make run` has no credentials."""
    text = (
        "server: {host: 127.0.0.1, port: 0, region: us}\n"
        f'store: {{url: "sqlite:///{tmp_path}/bridge.db"}}\n'
        f"mappings: {{dir: {REPO / 'mappings'}}}\n"
        f"sources:\n{sources}destinations:\n{destinations}"
    )
    for var in re.findall(r"\$\{(\w+)\}", text):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return str(path)


@contextlib.asynccontextmanager
async def sandbox(config_path: str) -> AsyncIterator[tuple[TestClient[Any, Any], SandboxUpstreams, Config]]:
    """The bridge and its stand-ins wired as `bridge serve --sandbox` wires them."""
    moengage_port, segment_ports = free_port(), {"us": free_port(), "eu": free_port()}
    cfg = sandbox_config(config_path, "127.0.0.1", moengage_port, segment_ports)
    upstreams = await start_standins(cfg, "127.0.0.1", moengage_port, segment_ports)
    bindings = PrometheusBindings()
    runtime = Runtime(cfg, ingest_metrics=bindings.ingest, delivery_metrics=bindings.delivery)
    client = TestClient(TestServer(build_app(runtime, bindings), host="127.0.0.1"))
    try:
        await client.start_server()
        yield client, upstreams, cfg
    finally:
        await client.close()
        await upstreams.stop()


def upstream_url(cfg: Config, destination: str) -> str:
    """Where the bridge sends ``destination``'s requests: its stand-in."""
    facts = next(d.client.describe() for d in cfg.destinations if d.name == destination)
    return str(facts.get("host") or facts["base_url"])


STREAMS = "auth: {type: basic, username: moe, password: '${SANDBOX_TEST_STREAMS_PASSWORD}'}"


def streams_event(uuid: str) -> dict[str, Any]:
    return {
        "app_name": "App",
        "moe_request_id": f"req-{uuid}",
        "events": [
            {
                "event_name": "Email Sent",
                "event_code": "MOE_EMAIL_SENT",
                "event_uuid": uuid,
                "event_time": 1580967474,
                "uid": "user-1",
                "event_attributes": {"campaign_id": "c1"},
            }
        ],
    }


async def test_sandbox_sends_each_segment_destination_to_a_standin_of_its_own_region(tmp_path, monkeypatch):
    # server.region governs inbound Tracking API calls only: an eu destination is still eu.
    path = sandbox_yaml(
        tmp_path,
        f"  - {{name: streams-eu, kind: moengage_streams, data_center: '02', {STREAMS}, to: [segment-eu]}}\n"
        f"  - {{name: streams-us, kind: moengage_streams, data_center: '01', {STREAMS}, to: [segment-us]}}\n",
        "  - {name: segment-eu, kind: segment, write_key: '${SANDBOX_TEST_SEGMENT_EU_KEY}', region: eu,"
        " mapping: moengage-to-segment, delivery: {poll_interval: 0.05}}\n"
        "  - {name: segment-us, kind: segment, write_key: '${SANDBOX_TEST_SEGMENT_US_KEY}', region: us,"
        " mapping: moengage-to-segment, delivery: {poll_interval: 0.05}}\n",
        monkeypatch,
    )
    eu_key, us_key = placeholder("SANDBOX_TEST_SEGMENT_EU_KEY"), placeholder("SANDBOX_TEST_SEGMENT_US_KEY")
    auth = {"Authorization": basic_auth("moe", placeholder("SANDBOX_TEST_STREAMS_PASSWORD"))}
    with capture_logs() as logs:
        async with sandbox(path) as (bridge, upstreams, cfg):
            eu, us = upstreams.segment["eu"], upstreams.segment["us"]
            for source in ("streams-eu", "streams-us"):
                resp = await bridge.post(f"/moengage/streams/{source}", json=streams_event(source), headers=auth)
                assert resp.status == 200
            await eu.wait_for(lambda: len(eu.accepted) == 1)
            await us.wait_for(lambda: len(us.accepted) == 1)
            # Keys that really are wrong are still dropped, as Segment drops them.
            async with aiohttp.ClientSession() as session:
                for key in (us_key, "not-a-key"):
                    batch = {"batch": [{"type": "track", "event": "E", "userId": "u"}], "writeKey": key}
                    async with session.post(f"{upstream_url(cfg, 'segment-eu')}/v1/batch", json=batch) as resp:
                        assert resp.status == 200
    assert [(e.write_key, e.event["messageId"]) for e in eu.accepted] == [(eu_key, "streams-eu")]
    assert [(e.write_key, e.event["messageId"]) for e in us.accepted] == [(us_key, "streams-us")]
    assert [(d.reason, d.write_key) for d in eu.dropped] == [
        ("wrong_region", us_key),
        ("unknown_write_key", "not-a-key"),
    ]
    assert us.dropped == []
    # What would be sent, or why it was dropped, is shown with the region of the stand-in.
    lines = [e for e in logs if e["event"] == "upstream_request"]
    assert sorted((e["region"], e["summary"]) for e in lines) == [
        ("eu", "accepted {'track': 1} dropped=0 auth=both"),
        ("eu", "dropped batch of 1: unknown_write_key"),
        ("eu", "dropped batch of 1: wrong_region"),
        ("us", "accepted {'track': 1} dropped=0 auth=both"),
    ]


async def test_sandbox_accepts_every_moengage_destinations_workspace_and_key(tmp_path, monkeypatch):
    path = sandbox_yaml(
        tmp_path,
        "  - {name: web, kind: segment, write_key: '${SANDBOX_TEST_WRITE_KEY}', region: us,"
        " allow_cross_region: true, to: [moe-us, moe-eu]}\n",
        "  - {name: moe-us, kind: moengage, workspace_id: '${SANDBOX_TEST_WS}', api_key: '${SANDBOX_TEST_KEY}',"
        " data_center: '01', mapping: segment-to-moengage, delivery: {poll_interval: 0.05}}\n"
        "  - {name: moe-eu, kind: moengage, workspace_id: '${SANDBOX_TEST_EU_WS}', api_key: '${SANDBOX_TEST_EU_KEY}',"
        " data_center: '02', mapping: segment-to-moengage, delivery: {poll_interval: 0.05}}\n",
        monkeypatch,
    )
    ws, eu_ws = placeholder("SANDBOX_TEST_WS"), placeholder("SANDBOX_TEST_EU_WS")
    auth = {"Authorization": basic_auth(placeholder("SANDBOX_TEST_WRITE_KEY"), "")}
    with capture_logs() as logs:
        async with sandbox(path) as (bridge, upstreams, cfg):
            moengage = upstreams.moengage
            resp = await bridge.post("/v1/identify", json={"userId": "user-1", "traits": {"plan": "pro"}}, headers=auth)
            assert resp.status == 200
            await moengage.wait_for(lambda: len(moengage.customers()) == 2)
            # A key that really is wrong is still refused: each key opens only its own workspace.
            wrong = {
                "Authorization": basic_auth(eu_ws, placeholder("SANDBOX_TEST_KEY")),
                "MOE-APPKEY": eu_ws,
                "Content-Type": "application/json",
            }
            body = {"type": "customer", "customer_id": "user-2"}
            async with aiohttp.ClientSession() as session:
                url = f"{upstream_url(cfg, 'moe-eu')}/v1/customer/{eu_ws}"
                async with session.post(url, data=orjson.dumps(body), headers=wrong) as resp:
                    assert resp.status == 401
    # Each request reached the stand-in under its data center's path (api-0N.moengage.com).
    assert sorted((seen.path, seen.status) for seen in moengage.seen) == [
        (f"/api-01/v1/transition/{ws}", 200),
        (f"/api-02/v1/customer/{eu_ws}", 401),
        (f"/api-02/v1/transition/{eu_ws}", 200),
    ]
    assert [c["customer_id"] for c in moengage.customers()] == ["user-1", "user-1"]
    # What would be sent is shown for both destinations, each line naming its workspace.
    lines = [e for e in logs if e["event"] == "upstream_request" and e["status"] == 200]
    assert sorted(e["path"] for e in lines) == [f"/api-01/v1/transition/{ws}", f"/api-02/v1/transition/{eu_ws}"]
    assert all("user-1" in e["body"] for e in lines)


async def test_sandbox_refuses_a_workspace_sent_to_another_data_center(tmp_path, monkeypatch):
    """A workspace lives in one data center. Configured twice, in two data centers, the
    first destination's is where it lives: the other's requests are refused as MoEngage's
    host of a data center that does not serve the workspace refuses them."""
    path = sandbox_yaml(
        tmp_path,
        "  - {name: web, kind: segment, write_key: '${SANDBOX_TEST_WRITE_KEY}', region: us,"
        " allow_cross_region: true, to: [moe-home, moe-elsewhere]}\n",
        "  - {name: moe-home, kind: moengage, workspace_id: '${SANDBOX_TEST_WS}', api_key: '${SANDBOX_TEST_KEY}',"
        " data_center: 1, mapping: segment-to-moengage, delivery: {poll_interval: 0.05}}\n"
        "  - {name: moe-elsewhere, kind: moengage, workspace_id: '${SANDBOX_TEST_WS}', api_key: '${SANDBOX_TEST_KEY}',"
        " data_center: '02', mapping: segment-to-moengage, delivery: {poll_interval: 0.05},"
        " guard: {enabled: false}, retry: {max_age: 0}}\n",
        monkeypatch,
    )
    ws = placeholder("SANDBOX_TEST_WS")
    auth = {"Authorization": basic_auth(placeholder("SANDBOX_TEST_WRITE_KEY"), "")}
    async with sandbox(path) as (bridge, upstreams, cfg):
        moengage = upstreams.moengage
        resp = await bridge.post("/v1/identify", json={"userId": "user-1", "traits": {"plan": "pro"}}, headers=auth)
        assert resp.status == 200
        await moengage.wait_for(lambda: len(moengage.seen) >= 2)
        seen = sorted((s.path, s.status) for s in moengage.seen)
        async with aiohttp.ClientSession() as session:
            url = f"{upstream_url(cfg, 'moe-elsewhere')}/v1/customer/{ws}"
            headers = {
                "Authorization": basic_auth(ws, placeholder("SANDBOX_TEST_KEY")),
                "MOE-APPKEY": ws,
                "Content-Type": "application/json",
            }
            async with session.post(url, json={"type": "customer", "customer_id": "user-2"}, headers=headers) as resp:
                status, answer = resp.status, await resp.json()
    assert seen == [(f"/api-01/v1/transition/{ws}", 200), (f"/api-02/v1/transition/{ws}", 400)]
    assert [c["customer_id"] for c in moengage.customers()] == ["user-1"]
    assert status == 400
    assert answer["status"] == "fail"
    assert (answer["error"]["type"], answer["error"]["message"]) == ("InvalidParams", "given app_id is invalid/blocked")


# What the bridge sends the sandbox's MoEngage (workspace SANDBOX_WS, key moe-secret).
SANDBOX_MOE_HEADERS = {
    "Authorization": basic_auth("SANDBOX_WS", "moe-secret"),
    "MOE-APPKEY": "SANDBOX_WS",
    "Content-Type": "application/json",
}


async def test_the_sandbox_moengage_serves_delete_user_and_logs_it():
    moengage = MoEngageStandIn("SANDBOX_WS", "moe-secret")
    runners = await start_sandbox_upstreams("127.0.0.1", 0, 0, moengage, SegmentStandIn({"seg-secret": "us"}))
    headers = SANDBOX_MOE_HEADERS
    try:
        base = f"http://127.0.0.1:{runners[0].addresses[0][1]}"
        user = {"type": "customer", "customer_id": "user-42", "attributes": {}}
        deletion = {"identity_type": "customer_id", "identity_value": "user-42"}
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{base}/v1/customer/SANDBOX_WS", data=orjson.dumps(user), headers=headers
                ) as r:
                    assert r.status == 200
                for expected in (200, 400):  # the second finds no such user
                    url = f"{base}/v1/customer/delete?app_id=SANDBOX_WS"
                    async with session.post(url, data=orjson.dumps(deletion), headers=headers) as resp:
                        assert resp.status == expected
    finally:
        for runner in runners:
            await runner.cleanup()
    lines = [entry for entry in logs if entry["event"] == "upstream_request"]
    assert [(e["path"], e["status"]) for e in lines][1:] == [
        ("/v1/customer/delete?app_id=SANDBOX_WS", 200),
        ("/v1/customer/delete?app_id=SANDBOX_WS", 400),
    ]
    assert lines[1]["summary"] == "delete 'user-42'"
    assert lines[2]["error"] == "User doesn't exists with customer id user-42"
    assert moengage.deletions() == [deletion]


async def test_the_sandbox_moengage_serves_track_device_and_logs_it():
    moengage = MoEngageStandIn("SANDBOX_WS", "moe-secret")
    runners = await start_sandbox_upstreams("127.0.0.1", 0, 0, moengage, SegmentStandIn({"seg-secret": "us"}))
    headers = SANDBOX_MOE_HEADERS
    user = {"type": "customer", "customer_id": "user-42", "attributes": {}}
    device = {"type": "device", "customer_id": "user-42", "attributes": {"platform": "iOS", "push_id": "apns-1"}}
    try:
        base = f"http://127.0.0.1:{runners[0].addresses[0][1]}"
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                bulk = {"type": "transition", "elements": [user, device]}
                async with session.post(
                    f"{base}/v1/transition/SANDBOX_WS", data=orjson.dumps(bulk), headers=headers
                ) as resp:
                    assert resp.status == 200
                async with session.post(
                    f"{base}/v1/device/SANDBOX_WS", data=orjson.dumps(device), headers=headers
                ) as resp:
                    assert resp.status == 200
    finally:
        for runner in runners:
            await runner.cleanup()
    lines = [entry for entry in logs if entry["event"] == "upstream_request"]
    assert [(e["path"], e["status"], e["summary"]) for e in lines] == [
        ("/v1/transition/SANDBOX_WS", 200, "bulk customers=1 events=0 devices=1"),
        ("/v1/device/SANDBOX_WS", 200, "device for 'user-42': iOS"),
    ]
    assert moengage.devices() == [device, device]
