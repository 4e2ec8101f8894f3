"""Operations end to end: metrics, health, the admin API, secrets in logs, mapping reload,
DLQ replay after a mapping fix, rate limits and per-user ordering."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import gzip
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bridge.cli import main as cli_main
from bridge.observability.logging import configure_logging, register_secret
from bridge.store.postgres import PostgresStore
from bridge.testing.standins import Planned
from tests.e2e.harness import (
    ADMIN_TOKEN,
    API_KEY,
    REPO,
    SEGMENT_OUT_KEY,
    STREAMS_PASSWORD,
    STREAMS_USER,
    WEBHOOK_SECRET,
    WRITE_KEY,
    basic,
    config_dict,
    raw_exchange,
    wait_until,
)
from tests.e2e.pgproxy import PgProxy
from tests.e2e.proc import BridgeProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_counters_move_with_traffic(bridge):
    _, before = await bridge.get("/metrics")
    batch = {
        "batch": [{"type": "track", "userId": "user-m", "event": "Counted"} for _ in range(3)]
        + [{"type": "track", "anonymousId": "anon", "event": "Anon"}, {"type": "track", "userId": "user-m"}]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 3)

    async def settled() -> bool:
        # The stand-in sees the request before the worker acks it and counts the delivery,
        # so wait for the counters themselves rather than for the upstream.
        _, text = await bridge.get("/metrics")
        discarded = metric(
            text,
            "bridge_events_discarded_total",
            source="web",
            destination="moengage-main",
            reason="anonymous_user",
        )
        delivered = metric(text, "bridge_events_delivered_total", destination="moengage-main")
        return discarded == 1 and delivered == 3

    await wait_until(settled, what="the discard and delivery counters")
    _, text = await bridge.get("/metrics")
    assert (
        metric(text, "bridge_events_received_total", source="web")
        - metric(before, "bridge_events_received_total", source="web")
        == 4
    )
    assert metric(text, "bridge_events_delivered_total", destination="moengage-main") == 3
    assert metric(text, "bridge_events_rejected_total", source="web", code="event_not_defined") == 1
    assert metric(text, "bridge_http_requests_total", route="/v1/batch", status="200") == 1
    assert metric(text, "bridge_queue_depth", destination="moengage-main") == 0
    assert (
        metric(text, "bridge_delivery_request_duration_seconds_count", destination="moengage-main", status="200") >= 1
    )
    assert metric(text, "bridge_destination_paused", destination="moengage-main") == 0


async def test_readyz_turns_503_when_the_store_is_not_writable(bridge):
    assert (await bridge.get("/readyz"))[0] == 200
    db = Path(bridge.raw["store"]["url"].removeprefix("sqlite:///"))
    frozen = [db, Path(f"{db}-wal")]
    try:
        for path in frozen:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        with capture_logs() as logs:
            status, body = await bridge.get("/readyz")
            assert (await bridge.get("/readyz"))[0] == 503
        # The probe is open to anyone who can reach the port: it names the problem, and the
        # store's own words (the file's path) go to the log, once for the two answers.
        assert status == 503 and body["message"] == "store not writable", body
        assert str(db.parent) not in orjson.dumps(body).decode()
        [logged] = [e for e in logs if e["event"] == "not_ready"]
        assert logged["problems"]["store not writable"]
        assert (await bridge.get("/healthz"))[0] == 200  # alive, just not ready
    finally:
        for path in frozen:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    with capture_logs() as logs:
        assert (await bridge.get("/readyz"))[0] == 200
    assert [e["event"] for e in logs] == ["ready"]


async def test_ingest_refused_by_an_unwritable_store_names_the_problem_not_the_store_words(bridge):
    """A write key is no secret (Analytics.js ships it to every browser): an ingest refusal
    names the refusal, as /readyz does, and the store's own words (the file's path, a database
    host) go to the log's ingest_refused line."""
    db = Path(bridge.raw["store"]["url"].removeprefix("sqlite:///"))
    frozen = [db, Path(f"{db}-wal")]
    try:
        for path in frozen:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        with capture_logs() as logs:
            status, body = await bridge.post("/v1/track", {"userId": "u-ro", "event": "E"}, H)
        assert (status, body["code"]) == (429, "store_unavailable"), body
        assert body["message"] == "the event store is unavailable", body
        [refused] = [e for e in logs if e["event"] == "ingest_refused"]
        assert refused["code"] == "store_unavailable" and refused["reason"]
    finally:
        for path in frozen:
            subprocess.run(["chattr", "-i", str(path)], check=False)


async def test_admin_api_requires_its_token(bridge):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        status, body = await bridge.get("/admin/status", headers)
        assert (status, body["code"]) == (401, "unauthorized")
        status, _ = await bridge.post("/admin/dlq/replay", {"destination": "moengage-main"}, headers)
        assert status == 401
    status, body = await bridge.get("/admin/status", ADMIN)
    assert status == 200 and body["destinations"][0]["name"] == "moengage-main"
    assert API_KEY not in str(body)
    # Without the token nothing under /admin says what is there: not a 405 for a wrong
    # method, nor a 404 for a path that does not exist.
    # (a newline in the path, sent as %0A, included: aiohttp matches the decoded path)
    for path in ("/admin/reload", "/admin/dlq/replay", "/admin/nothing-here", "/admin/destinations/a%0Ab/pause"):
        status, body = await bridge.get(path)
        assert (status, body["code"]) == (401, "unauthorized"), path
    status, body = await bridge.post("/admin/status", {})
    assert (status, body["code"]) == (401, "unauthorized")
    assert bridge.client is not None
    # A 401 says which scheme it takes (RFC 9110 15.5.2: a 401 must carry a challenge).
    resp = await bridge.client.get("/admin/status", headers={"Authorization": "Bearer wrong"})
    assert (resp.status, resp.headers.get("WWW-Authenticate")) == (401, 'Bearer realm="bridge-admin"')
    # With it, the operator gets the real answer.
    for path in ("/admin/reload", "/admin/dlq/replay", "/admin/dlq/purge"):
        resp = await bridge.client.get(path, headers=ADMIN)
        assert (resp.status, resp.headers["Allow"]) == (405, "POST"), path
        assert (await resp.json())["code"] == "method_not_allowed"
    status, body = await bridge.get("/admin/dlq/replays", ADMIN)  # a look-alike is still an id
    assert (status, body["code"]) == (400, "invalid_parameter")
    status, body = await bridge.get("/admin/nothing-here", ADMIN)
    assert (status, body["code"]) == (404, "not_found")


async def test_admin_ids_out_of_range_are_a_400_not_a_crash(bridge):
    # Record ids are signed 64-bit: a bigger one, a JSON true, or more ids than one
    # statement can carry are the operator's mistake, answered as such.
    too_big = 2**63
    status, body = await bridge.get(f"/admin/dlq/{too_big}", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    status, body = await bridge.get("/admin/dlq/0", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    for path in ("/admin/dlq/replay", "/admin/dlq/purge"):
        for ids in ([too_big], [True], [-1], ["7"]):
            status, body = await bridge.post(path, {"ids": ids}, ADMIN)
            assert (status, body["code"]) == (400, "invalid_parameter"), (path, ids, body)
        status, body = await bridge.post(path, {"ids": list(range(1, 300_001))}, ADMIN)
        assert (status, body["code"]) == (400, "too_many_ids"), body
        # The largest id that can exist is a fair question with an empty answer.
        status, body = await bridge.post(path, {"ids": [2**63 - 1, *range(1, 10_000)]}, ADMIN)
        assert status == 200, body
    status, body = await bridge.get(f"/admin/dlq/{2**63 - 1}", ADMIN)
    assert (status, body["code"]) == (404, "not_found")
    # A filter whose every value is null selects nothing, so it is refused like {}.
    for path in ("/admin/dlq/replay", "/admin/dlq/purge"):
        for empty in ({}, {"ids": None}, {"destination": None, "reason": None}):
            status, body = await bridge.post(path, empty, ADMIN)
            assert (status, body["code"]) == (400, "filter_required"), (path, empty, body)


async def test_admin_api_is_off_without_a_token(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["admin"] = {}

    bridge = await make_bridge(tweak)
    status, body = await bridge.get("/admin/status", ADMIN)
    assert (status, body["code"]) == (404, "not_found")


async def test_admin_translate_and_pause(bridge):
    event = {"type": "identify", "userId": "user-t", "traits": {"email": "t@example.com"}}
    status, body = await bridge.post("/admin/translate?mapping=segment-to-moengage", [event, {"type": "track"}], ADMIN)
    assert status == 200
    first, second = body["results"]
    assert first["outputs"][0]["body"]["customer_id"] == "user-t"
    # As the worker would see it: ingest refuses a call with no user before any mapping.
    assert second == {"rejected": "id_required", "detail": "track requires userId or anonymousId"}, second
    status, body = await bridge.post(
        "/admin/translate?mapping=segment-to-moengage", {"type": "track", "anonymousId": "a", "event": "E"}, ADMIN
    )
    assert status == 200 and body["results"][0]["discarded"] == "anonymous_user", body
    status, body = await bridge.post("/admin/translate?mapping=nope", event, ADMIN)
    assert (status, body["code"]) == (400, "unknown_mapping")
    status, body = await bridge.post("/admin/translate?destination=moengage-mian", event, ADMIN)
    assert (status, body["code"]) == (400, "unknown_destination") and "moengage-main" in body["message"]
    status, body = await bridge.post("/admin/translate?mapping=segment-to-moengage&source=wbe", event, ADMIN)
    assert (status, body["code"]) == (400, "unknown_source") and "'web'" in body["message"]

    # Against a destination, translate answers as its worker would: with the store's links.
    linked = {"type": "identify", "userId": "user-l", "traits": {"id": "crm-l", "email": "l@example.com"}}
    assert (await bridge.post("/v1/identify", linked, H))[0] == 200
    later = {"type": "track", "userId": "user-l", "event": "Later"}

    async def customer_of(query: str) -> str:
        status, body = await bridge.post(f"/admin/translate?{query}", later, ADMIN)
        assert status == 200, body
        return str(body["results"][0]["outputs"][0]["body"]["customer_id"])

    async def link_learned() -> bool:
        return await customer_of("destination=moengage-main") == "crm-l"

    await wait_until(link_learned, what="translate to use the stored identity link")
    assert await customer_of("mapping=segment-to-moengage") == "user-l"  # no destination: no store links
    assert await customer_of("destination=moengage-main&linked_id=crm-x") == "crm-x"  # an explicit link wins

    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    assert (await bridge.post("/v1/track", {"userId": "user-p", "event": "While Paused"}, H))[0] == 200
    await asyncio.sleep(0.3)
    assert bridge.moengage.events() == []
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)


SECRETS = [WRITE_KEY, WEBHOOK_SECRET, API_KEY, SEGMENT_OUT_KEY, STREAMS_PASSWORD, ADMIN_TOKEN]


async def test_secrets_never_reach_the_logs(make_bridge):
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    for s in SECRETS:
        register_secret(s)
    try:
        bridge = await make_bridge()
        bridge.moengage.refuse_all(401)  # the upstream rejects our API key
        # every inbound auth failure, with the real secrets (or near misses) in play
        await bridge.post("/v1/track", {"userId": "user-s", "event": "E", "writeKey": WRITE_KEY + "x"})
        await bridge.post("/v1/track", {"userId": "user-s", "event": "E"}, basic(WRITE_KEY[:-1]))
        await bridge.post("/moengage/streams/streams-main", {"events": []}, basic(STREAMS_USER, STREAMS_PASSWORD + "!"))
        await bridge.post("/segment/webhook", {"type": "track"}, {**H, "X-Signature": "00"})
        await bridge.get("/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}x"})
        await bridge.post("/v1/track", {"userId": "user-s", "event": "Upstream 401"}, H)

        async def paused() -> bool:
            _, body = await bridge.get("/admin/status", ADMIN)
            return bool(body["destinations"][0]["paused"])

        await wait_until(paused, what="the pause for the upstream's 401")
    finally:
        configure_logging("warning", "console")
    logged = stream.getvalue()
    assert "delivery_attempt_failed" in logged and "request_rejected" in logged
    for secret in SECRETS:
        for form in (
            secret,
            base64.b64encode(f"{secret}:".encode()).decode(),
            base64.b64encode(f"{STREAMS_USER}:{secret}".encode()).decode(),
        ):
            assert form not in logged, f"a secret leaked into the logs: {secret[:4]}…"


async def test_malformed_http_is_an_info_line_not_an_error_traceback(bridge):
    # aiohttp rejects these before the bridge sees them, or fails on the body while it
    # drains a request the bridge already answered; left alone it logs each as an ERROR
    # with a traceback, which any client could use to flood the error log.
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    register_secret(WRITE_KEY)
    auth = basic(WRITE_KEY)["Authorization"].encode()
    corrupt = gzip.compress(b'{"userId": "u", "event": "E", "pad": "' + b"x" * 20_000 + b'"}')
    corrupt = corrupt[:20] + b"\x00" * 64 + corrupt[84:]
    gz_head = b"Host: x\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n" % len(corrupt)
    bad_key = basic("not-a-key")["Authorization"].encode()
    try:
        for request, status in (
            (b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", b"400"),
            (
                b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: "
                + auth
                + b"\r\nX-Pad: "
                + b"a" * 9000
                + b"\r\n\r\n",
                b"400",
            ),
            (b"GARBAGE\r\n\r\n", b"400"),
            # answered (401, 404) without reading the body, which then fails to inflate
            (b"POST /v1/track HTTP/1.1\r\nAuthorization: " + bad_key + b"\r\n" + gz_head + b"\r\n" + corrupt, b"401"),
            (b"POST /nothing-here HTTP/1.1\r\n" + gz_head + b"\r\n" + corrupt, b"404"),
        ):
            answer = await raw_exchange(bridge, request)
            assert answer.split(b" ", 2)[1] == status, answer[:60]
        await asyncio.sleep(0.05)
    finally:
        configure_logging("warning", "console")
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    server = [line for line in lines if line.get("logger") == "aiohttp.server"]
    assert len(server) == 4, lines  # (a request line aiohttp cannot read at all it does not log)
    assert {line["level"] for line in server} == {"info"}, server
    # One event name to filter on, as for every other line; what aiohttp said is a field.
    assert all(line["event"] == "bad_http_request" and line["status"] == 400 for line in server), server
    assert all(line["reason"] for line in server), server
    # What was wrong with the body, not the "400, message:" heading aiohttp wraps it under.
    assert [line["reason"] for line in server[2:]] == ["Can not decode content-encoding: gzip"] * 2, server
    assert "Traceback" not in stream.getvalue() and WRITE_KEY not in stream.getvalue()
    # At level warning these lines are not written at all.
    quiet = io.StringIO()
    configure_logging("warning", "json", stream=quiet)
    try:
        await raw_exchange(bridge, b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
        await asyncio.sleep(0.05)
    finally:
        configure_logging("warning", "console")
    assert quiet.getvalue() == ""


async def bad_request_reasons(bridge: Any, requests: tuple[bytes, ...]) -> tuple[list[str], str]:
    """Send each of ``requests`` (each refused with a 400 by aiohttp): the reasons of their
    bad_http_request lines, and the whole log."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        for request in requests:
            answer = await raw_exchange(bridge, request)
            assert answer.split(b" ", 2)[1] == b"400", answer[:60]
        await asyncio.sleep(0.05)
    finally:
        configure_logging("warning", "console")
    logged = stream.getvalue()
    lines = [orjson.loads(line) for line in logged.splitlines()]
    reasons = [line["reason"] for line in lines if line["event"] == "bad_http_request"]
    assert len(reasons) == len(requests) and all(reasons), lines
    return reasons, logged


async def test_a_refused_request_line_or_header_is_logged_without_the_bytes_aiohttp_quotes(bridge):
    """aiohttp's reasons quote up to 100 bytes of the line they refuse. A write key the
    bridge does not know, or a query string's secret, is not a registered secret, so
    redaction cannot find it there: the bad_http_request line says what was wrong without
    the bytes."""
    unknown_key = "wk-unknown-" + secrets.token_hex(4200)  # not the bridge's: never registered
    encoded = base64.b64encode(f"{unknown_key}:".encode())
    reasons, logged = await bad_request_reasons(
        bridge,
        (
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + encoded + b"\r\n\r\n",
            b"GET /v1/track?writeKey=" + unknown_key.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Write" + unknown_key[:40].encode() + b"\x01: 1\r\n\r\n",
        ),
    )
    assert unknown_key[:20] not in logged and encoded[:20].decode() not in logged, reasons
    assert any(reason.startswith("Got more than") for reason in reasons), reasons


async def test_a_refused_url_or_header_value_is_logged_without_any_of_it(bridge):
    """A request target yarl refuses is aiohttp's whole reason, unquoted; and what aiohttp
    quotes of an oversized or invalid header is its value alone, whose text before a colon
    is the id of an ``id:secret`` key, not the header's name. Neither reaches the log."""
    query_secret = "qs-" + secrets.token_hex(8)  # `key=` is no name redaction knows
    key_id = "kid_" + secrets.token_hex(8)
    reasons, logged = await bad_request_reasons(
        bridge,
        (
            b"GET http://bridge:99999/v1/track?key=" + query_secret.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET https://:8080/v1/track?key=" + query_secret.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key_id.encode() + b":" + b"s" * 9000 + b"\r\n\r\n",
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key_id.encode() + b":s\x00\r\n\r\n",
        ),
    )
    assert query_secret not in logged and key_id not in logged, reasons
    assert reasons[:2] == ["Invalid URL", "Invalid URL"], reasons


async def test_a_bad_method_logged_at_debug_is_logged_without_the_request_line_aiohttp_quotes(bridge):
    """aiohttp logs a bad method on a connection's first request at debug, with a traceback
    whose message quotes the request line: a query string's secret, which redaction does
    not know, reached the debug log."""
    query_secret = "qs-" + secrets.token_hex(8)  # `key=` is no name redaction knows
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        answer = await raw_exchange(
            bridge, b"G@T /v1/track?key=" + query_secret.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await asyncio.sleep(0.05)
    finally:
        configure_logging("warning", "console")
    assert answer.split(b" ", 2)[1] == b"400", answer[:60]
    logged = stream.getvalue()
    lines = [orjson.loads(line) for line in logged.splitlines()]
    refused = [line for line in lines if line["event"] == "bad_http_request"]
    assert query_secret not in logged, lines
    assert [line["level"] for line in refused] == ["debug"], lines  # aiohttp's level kept: no noise at info


async def test_a_client_gone_mid_body_is_logged_as_such_not_as_a_bad_encoding(bridge):
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        assert bridge.client is not None
        _, writer = await asyncio.open_connection(bridge.client.host, bridge.client.port)
        auth = basic(WRITE_KEY)["Authorization"].encode()
        writer.write(
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\nContent-Length: 900\r\n\r\n{"
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is waiting for the rest
        writer.close()

        def rejected() -> list[dict[str, Any]]:
            lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
            return [line for line in lines if line.get("event") == "request_rejected"]

        async def logged() -> bool:
            return bool(rejected())

        await wait_until(logged, what="the rejection's log line")
    finally:
        configure_logging("warning", "console")
    assert [line["code"] for line in rejected()] == ["incomplete_body"], stream.getvalue()


def copy_mappings(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(REPO / "mappings", target)
    return target


def break_track_action(mappings: Path) -> None:
    """A plausible bad edit: the track action reads a field that does not exist."""
    path = mappings / "segment-to-moengage.yaml"
    text = path.read_text()
    # the track action's else: every event name without moe_
    assert "else: {path: $.event, pipe: [{to: string}]}" in text
    path.write_text(
        text.replace("else: {path: $.event, pipe: [{to: string}]}", "else: {path: $.event_name, pipe: [{to: string}]}")
    )


async def test_dlq_replay_after_a_mapping_fix(make_bridge, tmp_path):
    mappings = copy_mappings(tmp_path)
    good = (mappings / "segment-to-moengage.yaml").read_text()
    break_track_action(mappings)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)
        raw["destinations"][0]["guard"] = {"enabled": False}

    bridge = await make_bridge(tweak)
    batch = {
        "batch": [
            {
                "type": "track",
                "userId": f"user-{i}",
                "event": "Purchase",
                "properties": {"n": i},
                "messageId": f"fix-{i}",
            }
            for i in range(5)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200

    async def all_dead() -> bool:
        _, body = await bridge.get("/admin/dlq", ADMIN)
        return len(body["dead_letters"]) == 5

    await wait_until(all_dead, what="5 dead letters from the broken mapping")
    _, body = await bridge.get("/admin/dlq", ADMIN)
    broken_version = body["dead_letters"][0]["mapping_version"]
    assert {d["event"] for d in body["dead_letters"]} == {"Purchase"}
    assert {d["outputs_delivered"] for d in body["dead_letters"]} == {0}  # none of them went out

    (mappings / "segment-to-moengage.yaml").write_text(good)
    status, reloaded = await bridge.post("/admin/reload", None, ADMIN)
    assert status == 200, reloaded
    fixed_version = reloaded["mappings"]["segment-to-moengage"]
    assert fixed_version != broken_version

    status, body = await bridge.post("/admin/dlq/replay", {"destination": "moengage-main"}, ADMIN)
    assert (status, body["replayed"]) == (200, 5)
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 5)
    assert {e["actions"][0]["action"] for e in bridge.moengage.events()} == {"Purchase"}
    assert bridge.runtime is not None
    store = bridge.runtime.store

    # Each delivered job records the mapping version that mapped it: the fixed one. The ack
    # lands just after the stand-in answers, so wait for it rather than racing it.
    async def recorded() -> bool:
        versions = [await store.delivered_version("moengage-main", f"fix-{i}") for i in range(5)]
        return versions == [fixed_version] * 5

    await wait_until(recorded, what="the fixed mapping version on every delivered job")


async def test_reload_keeps_the_old_mapping_when_the_new_one_is_broken(make_bridge, tmp_path):
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    path = mappings / "segment-to-moengage.yaml"
    good = path.read_text()
    path.write_text(good.replace("kind: event", "kind: evnt", 1))
    status, body = await bridge.post("/admin/reload", None, ADMIN)
    assert (status, body["code"]) == (400, "invalid_mappings")
    assert any("segment-to-moengage.yaml:" in p for p in body["problems"])
    # the old mapping is still in force
    assert (await bridge.post("/v1/track", {"userId": "user-r", "event": "Still Works"}, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    # a good change takes effect
    path.write_text(good.replace("action: Viewed Web Page", "action: Page Viewed"))
    assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
    assert (await bridge.post("/v1/page", {"userId": "user-r", "name": "Home"}, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)
    assert bridge.moengage.events()[1]["actions"][0]["action"] == "Page Viewed"


async def test_a_reload_answers_which_mappings_it_changed(make_bridge, tmp_path):
    """An operator tells a reload that deployed a fix from one that found nothing new: the
    answer names the changed mappings (none for a no-op), as the log line does."""
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    with capture_logs() as logs:
        status, nothing = await bridge.post("/admin/reload", None, ADMIN)
        assert status == 200, nothing
        assert (nothing["reloaded"], nothing["changed"]) == (True, [])
        path = mappings / "segment-to-moengage.yaml"
        path.write_text(path.read_text().replace("action: Viewed Web Page", "action: Page Viewed"))
        status, edited = await bridge.post("/admin/reload", None, ADMIN)
        assert status == 200, edited
        assert (edited["reloaded"], edited["changed"]) == (True, ["segment-to-moengage"])
        assert edited["mappings"]["segment-to-moengage"] != nothing["mappings"]["segment-to-moengage"]
        assert edited["mappings"]["moengage-to-segment"] == nothing["mappings"]["moengage-to-segment"]
        status, again = await bridge.post("/admin/reload", None, ADMIN)
        assert (status, again["changed"], again["mappings"]) == (200, [], edited["mappings"])
    logged = [e["changed"] for e in logs if e["event"] == "mappings_reloaded"]
    assert logged == [[], ["segment-to-moengage"], []]


async def post_page(url: str) -> None:
    """A page call for user-h, which the bridge must take (200)."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/page", json={"userId": "user-h", "name": "Home"}, headers=H) as r,
    ):
        assert r.status == 200


async def test_sighup_reloads_a_running_process(tmp_path):
    from aiohttp.test_utils import TestServer

    from bridge.testing.standins import MoEngageStandIn
    from tests.e2e.harness import WORKSPACE

    moengage = MoEngageStandIn(WORKSPACE, API_KEY)
    server = TestServer(moengage.app(), host="127.0.0.1")
    await server.start_server()
    mappings = copy_mappings(tmp_path)
    raw = config_dict(tmp_path, str(server.make_url("")).rstrip("/"), "http://127.0.0.1:9")
    raw["sources"] = raw["sources"][:1]
    raw["destinations"] = raw["destinations"][:1]
    raw["mappings"]["dir"] = str(mappings)
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        assert proc.proc is not None
        # The pid `kill -HUP <pid>` takes, as the README says, from the `listening` line.
        [listening] = [
            e
            for line in proc.log_path.read_text().splitlines()
            if line.startswith("{")
            if (e := orjson.loads(line)).get("event") == "listening"
        ]
        assert listening["pid"] == proc.proc.pid
        path = mappings / "segment-to-moengage.yaml"
        good = path.read_text()
        path.write_text("rules: [\n")  # broken YAML
        os.kill(listening["pid"], signal.SIGHUP)
        await wait_until(lambda: "mapping_reload_rejected" in proc.log_path.read_text(), what="rejection log")
        log = proc.log_path.read_text()
        assert "segment-to-moengage.yaml:" in log  # file and line of the problem
        # The old mappings stay in force: the process keeps accepting and delivering with them.
        await post_page(proc.url)
        await moengage.wait_for(lambda: len(moengage.events()) == 1, timeout=10)
        assert moengage.events()[0]["actions"][0]["action"] == "Viewed Web Page"
        path.write_text(good.replace("action: Viewed Web Page", "action: Page Seen"))
        proc.proc.send_signal(1)
        await wait_until(lambda: "mappings_reloaded" in proc.log_path.read_text(), what="reload log")
        # SIGHUP's reload logs what it changed, as the admin API answers it.
        lines = [orjson.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
        [reloaded] = [e for e in lines if e.get("event") == "mappings_reloaded"]
        assert reloaded["changed"] == ["segment-to-moengage"]
        await post_page(proc.url)
        await moengage.wait_for(lambda: len(moengage.events()) == 2, timeout=10)
        assert moengage.events()[1]["actions"][0]["action"] == "Page Seen"
    finally:
        await proc.ensure_stopped()
        moengage.stop()
        await server.close()


async def test_rate_limit_paces_deliveries(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["rate_limits"] = {"bulk_events": "600/min"}  # 10 events/s, burst 10
        raw["destinations"][0]["delivery"]["batch_size"] = 5

    bridge = await make_bridge(tweak)
    started = time.monotonic()
    batch = {"batch": [{"type": "track", "userId": "user-rl", "event": "Paced"} for _ in range(30)]}
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 30, timeout=15)
    assert time.monotonic() - started >= 1.5  # 30 events at 10/s after a burst of 10


@pytest.mark.parametrize("concurrency", [1, 3])  # 1: one loop that pipelines its batches
async def test_per_user_order_survives_a_retry(make_bridge, concurrency):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["delivery"]["batch_size"] = 4
        raw["destinations"][0]["delivery"]["concurrency"] = concurrency

    bridge = await make_bridge(tweak)
    bridge.moengage.plan(Planned(500), Planned(503))
    batch = {
        "batch": [
            {"type": "track", "userId": f"user-{i % 3}", "event": "Step", "properties": {"n": i}} for i in range(30)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 30, timeout=15)
    for user in ("user-0", "user-1", "user-2"):
        seen = [e["actions"][0]["attributes"]["n"] for e in bridge.moengage.events() if e["customer_id"] == user]
        assert seen == sorted(seen), f"{user} got events out of order: {seen}"


@pytest.mark.parametrize("missing", ["mappings"])
def test_bridge_check_reports_mapping_problems(tmp_path, missing, capsys):
    from bridge.cli import main

    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["destinations"][0]["mapping"] = "segment-to-moengag"
    import yaml

    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", "--config", str(path)]) == 1
    assert "no mapping named 'segment-to-moengag'" in capsys.readouterr().err


async def test_retry_budget_ends_in_the_dlq_with_the_last_response(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["destinations"][0]["retry"] = {"base_delay": 0.05, "max_delay": 0.1, "max_age": 0.5, "min_attempts": 3}

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(503)
    assert (await bridge.post("/v1/track", {"userId": "user-x", "event": "Never Lands"}, H))[0] == 200

    async def exhausted() -> bool:
        _, body = await bridge.get("/admin/dlq?reason=retries_exhausted", ADMIN)
        return len(body["dead_letters"]) == 1

    await wait_until(exhausted, what="retries_exhausted")
    _, body = await bridge.get("/admin/dlq", ADMIN)
    entry = body["dead_letters"][0]
    assert entry["status"] == 503 and entry["attempts"] >= 3 and entry["event"] == "Never Lands"
    assert bridge.moengage.received >= 3
    # README: a dead letter shows the request as mapped, as for a refused one; a retried
    # one out of budget kept none, so an operator could not see what MoEngage was sent.
    status, shown = await bridge.get(f"/admin/dlq/{entry['id']}", ADMIN)
    assert status == 200 and shown["reason"] == "retries_exhausted", shown
    element = shown["request"]["elements"][0]
    assert element["customer_id"] == "user-x" and element["actions"][0]["action"] == "Never Lands", shown
    assert API_KEY not in orjson.dumps(shown).decode()


async def test_a_paused_destination_resumes_when_its_mapping_changes(make_bridge, tmp_path):
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)
        raw["destinations"][0]["guard"] = {"window": 10, "min_events": 5, "threshold": 0.5}
        raw["destinations"][0]["delivery"]["batch_size"] = 5

    bridge = await make_bridge(tweak)
    bridge.moengage.refuse_all(400)
    batch = {"batch": [{"type": "track", "userId": f"user-{i}", "event": "Guarded"} for i in range(20)]}
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200

    async def paused(expected: bool) -> bool:
        _, status = await bridge.get("/admin/status", ADMIN)
        return bool(status["destinations"][0]["paused"]) is expected

    await wait_until(lambda: paused(True), what="the guard to pause")
    bridge.moengage.refuse_all(None)
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(path.read_text() + "\n# fixed\n")
    assert (await bridge.post("/admin/reload", None, ADMIN))[0] == 200
    await wait_until(lambda: paused(False), what="the destination to resume after the mapping change")
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) >= 10, timeout=10)


async def test_an_operator_pause_survives_a_mapping_change(make_bridge, tmp_path):
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"]["dir"] = str(mappings)

    bridge = await make_bridge(tweak)
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(path.read_text() + "\n# a change\n")
    status, body = await bridge.post("/admin/reload", None, ADMIN)
    assert status == 200 and body["mappings"]["segment-to-moengage"] != ""
    assert (await bridge.post("/v1/track", {"userId": "user-op", "event": "Waits"}, H))[0] == 200
    await asyncio.sleep(0.5)  # several delivery loop turns
    _, status_body = await bridge.get("/admin/status", ADMIN)
    assert status_body["destinations"][0]["paused"] is True
    assert bridge.moengage.events() == []


async def test_file_watch_reloads_changed_mappings(make_bridge, tmp_path):
    mappings = copy_mappings(tmp_path)

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"] = {"dir": str(mappings), "watch": True, "watch_interval": 0.1}

    bridge = await make_bridge(tweak)
    assert bridge.runtime is not None
    before = bridge.runtime.mappings()["segment-to-moengage"].version
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(path.read_text().replace("action: Viewed Screen", "action: Screen Seen"))
    await wait_until(lambda: bridge.runtime.mappings()["segment-to-moengage"].version != before, what="the reload")
    assert (await bridge.post("/v1/screen", {"userId": "user-w", "name": "Cart"}, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 1)
    assert bridge.moengage.events()[0]["actions"][0]["action"] == "Screen Seen"


async def test_file_watch_reloads_a_lookup_file_kept_anywhere(make_bridge, tmp_path):
    """A lookup file in a subdirectory of lookups/, and as .json: it is part of the
    mapping's version, so the watcher must see it change too."""
    mappings = copy_mappings(tmp_path)
    (mappings / "lookups" / "moengage").mkdir()
    moved = mappings / "lookups" / "moengage" / "platforms.json"
    table = yaml.safe_load((mappings / "lookups" / "moengage-platforms.yaml").read_text())
    moved.write_text(orjson.dumps(table).decode())
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(
        path.read_text().replace("{file: lookups/moengage-platforms.yaml}", "{file: lookups/moengage/platforms.json}")
    )

    def tweak(raw: dict[str, Any]) -> None:
        raw["mappings"] = {"dir": str(mappings), "watch": True, "watch_interval": 0.1}

    bridge = await make_bridge(tweak)
    assert bridge.runtime is not None
    before = bridge.runtime.mappings()["segment-to-moengage"].version
    table["table"]["web"] = "web-changed"
    moved.write_text(orjson.dumps(table).decode())
    await wait_until(
        lambda: bridge.runtime.mappings()["segment-to-moengage"].version != before, what="the lookup's reload"
    )


async def test_metrics_still_answer_while_the_store_is_down(bridge):
    from bridge.store.base import StoreError

    assert bridge.runtime is not None

    async def broken() -> Any:
        raise StoreError("database is locked")

    bridge.runtime.store.queue_stats = broken
    status, text = await bridge.get("/metrics")
    assert status == 200 and "bridge_http_requests_total" in text


# Every admin route that reads or writes the store, with a request it would otherwise take.
STORE_ROUTES: list[tuple[str, dict[str, Any] | None]] = [
    ("/admin/status", None),
    ("/admin/dlq", None),
    ("/admin/dlq/1", None),
    ("/admin/discards", None),
    ("/admin/dlq/replay", {"reason": "http_400"}),
    ("/admin/dlq/purge", {"reason": "http_400"}),
    ("/admin/discards/replay", {"reason": "anonymous_user"}),
    ("/admin/destinations/moengage-main/pause", {}),
    ("/admin/destinations/moengage-main/resume", {}),
    ("/admin/translate?destination=moengage-main", {"type": "track", "userId": "u-out", "event": "E"}),
]


async def test_the_admin_api_answers_a_store_outage_with_a_503_naming_it(make_bridge, pg_schema):
    """PostgreSQL away: the admin API, what an operator turns to then, answers each route
    that needs the store with a 503 naming the store's error, as ingest refuses events
    with one; not a 500 internal_error with a traceback logged per request."""
    proxy = PgProxy()
    await proxy.start()

    def through_proxy(raw: dict[str, Any]) -> None:
        raw["store"]["url"] = proxy.url()

    bridge = await make_bridge(through_proxy, start=False)
    bridge.store_factory = lambda: PostgresStore(proxy.url(), schema=pg_schema)
    try:
        await bridge.start()
        await proxy.close()
        with capture_logs() as logs:
            for path, body in STORE_ROUTES:
                status, answer = await (bridge.get(path, ADMIN) if body is None else bridge.post(path, body, ADMIN))
                assert (status, answer["code"]) == (503, "store_unavailable"), (path, answer)
                assert answer["message"].startswith("the store failed: postgres"), (path, answer)
        assert not [e for e in logs if e["event"] == "unhandled_error"]
    finally:
        await proxy.close()


async def test_queue_gauges_exist_for_every_destination_before_any_traffic(bridge):
    _, text = await bridge.get("/metrics")
    for name in ("moengage-main", "moengage-eu", "segment-prod"):
        assert f'bridge_queue_depth{{destination="{name}"}} 0.0' in text
        assert f'bridge_queue_oldest_age_seconds{{destination="{name}"}} 0.0' in text


async def test_readyz_is_503_while_the_store_refuses_events_for_space(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["store"]["max_bytes"] = 1

    bridge = await make_bridge(tweak)
    status, body = await bridge.post("/v1/track", {"userId": "u-full", "event": "E"}, H)
    assert (status, body["code"]) == (429, "store_full")
    # The refusal, not the store's own words (its size and limit go to ingest_refused).
    assert body["message"] == "the bridge is not accepting events right now: its event store is full", body
    status, body = await bridge.get("/readyz")
    assert status == 503 and "store full" in body["message"]


async def test_readyz_is_503_once_shutdown_begins(bridge):
    assert (await bridge.get("/readyz"))[0] == 200
    assert bridge.runtime is not None
    bridge.runtime.begin_stop()  # what SIGTERM does first; the listener is still open
    status, body = await bridge.get("/readyz")
    assert status == 503 and "shutting down" in body["message"]


async def test_an_upstream_echoing_our_key_does_not_put_it_in_the_dlq(bridge):
    # A refusal of the event (422, dead-lettered), quoting the request's credentials back.
    bridge.moengage.plan(Planned(422, {"error": f"bad attribute for key {API_KEY}", "auth": f"Basic {API_KEY}"}))
    assert (await bridge.post("/v1/track", {"userId": "u-echo", "event": "Echo"}, H))[0] == 200

    async def dead() -> bool:
        _, body = await bridge.get("/admin/dlq", ADMIN)
        return len(body["dead_letters"]) == 1

    await wait_until(dead, what="the 422 to be dead-lettered")
    _, listed = await bridge.get("/admin/dlq", ADMIN)
    status, shown = await bridge.get(f"/admin/dlq/{listed['dead_letters'][0]['id']}", ADMIN)
    assert status == 200 and shown["status"] == 422 and "bad attribute" in shown["response_body"]
    assert API_KEY not in str(shown)


def test_store_url_passwords_never_reach_the_terminal(tmp_path: Path) -> None:
    """Config and store errors are written before logging is set up: still redacted."""
    secret = "PGPASS-secret-4242"
    for url in (f"mysql://bridge:{secret}@127.0.0.1:1/bridge", f"postgresql://bridge:{secret}@127.0.0.1:1/bridge"):
        raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
        raw["store"]["url"] = url
        path = tmp_path / "bridge.yaml"
        path.write_text(yaml.safe_dump(raw))
        for args in (["check"], ["dlq", "list"], ["serve"]):
            done = subprocess.run(
                [str(Path(sys.executable).parent / "bridge"), *args, "--config", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            output = done.stdout + done.stderr
            # A PostgreSQL URL is valid config (check passes); connecting to it fails.
            assert done.returncode != 0 or (args == ["check"] and url.startswith("postgresql")), (args, output)
            assert secret not in output, (args, url, output)
            assert "Traceback" not in output, (args, url, output)


def seq_batch(n: int, prefix: str) -> dict[str, Any]:
    """n tracks of three users, each ~0.8 KB, so a 1 KB request limit sends one a request."""
    return {
        "batch": [
            {
                "type": "track",
                "userId": f"user-{i % 3}",
                "event": "Delivered",
                "messageId": f"{prefix}-{i}",
                "properties": {"seq": f"{prefix}-{i}", "pad": "x" * 700},
            }
            for i in range(n)
        ]
    }


def sent_seqs(bridge: Any) -> list[str]:
    return [e["actions"][0]["attributes"]["seq"] for e in bridge.moengage.events()]


async def test_unordered_requests_in_flight_are_not_resent_when_a_sibling_fails(make_bridge):
    # One request of an unordered batch fails inside the bridge (a destination bug, say)
    # while its siblings are on the wire: they must finish and be acked, not recovered for
    # a retry while in flight and so sent twice.
    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["max_request_bytes"] = 1024
        d["delivery"].update(ordered=False, concurrency=1, batch_size=10)
        d["retry"].update(base_delay=0.05, max_delay=0.2)

    bridge = await make_bridge(tweak)
    bridge.moengage.latency = 0.3
    assert bridge.runtime is not None
    client = bridge.runtime.delivery.workers["moengage-main"].client
    real_send, calls = client.send, []

    async def send(request: Any) -> Any:
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a destination bug: send raised")
        return await real_send(request)

    client.send = send
    assert (await bridge.post("/v1/batch", seq_batch(10, "g"), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(set(sent_seqs(bridge))) == 10, timeout=20)
    await asyncio.sleep(1.0)  # time for any resend to arrive
    counts = collections.Counter(sent_seqs(bridge))
    assert [seq for seq, n in counts.items() if n > 1] == []


async def test_an_operator_pause_stops_the_batch_already_being_sent(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        d = raw["destinations"][0]
        d["max_request_bytes"] = 1024
        d["delivery"].update(batch_size=50, concurrency=1)

    bridge = await make_bridge(tweak)
    bridge.moengage.latency = 0.1
    assert (await bridge.post("/v1/batch", seq_batch(50, "pm"), H))[0] == 200
    await bridge.moengage.wait_for(lambda: bridge.moengage.received >= 3, timeout=10)
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    at_pause = bridge.moengage.received
    await asyncio.sleep(1.0)
    # (the one request on the wire when the pause came may still complete)
    assert bridge.moengage.received - at_pause <= 1
    assert (await bridge.post("/admin/destinations/moengage-main/resume", None, ADMIN))[0] == 200
    await bridge.moengage.wait_for(lambda: len(set(sent_seqs(bridge))) == 50, timeout=30)
    assert [seq for seq, n in collections.Counter(sent_seqs(bridge)).items() if n > 1] == []


async def test_an_item_that_cannot_be_rendered_is_dead_lettered_alone_not_retried(make_bridge):
    # A request the destination cannot even build (a bug, or a value it cannot encode)
    # was retried as a network failure for the whole retry budget, its good items too.
    bridge = await make_bridge()
    assert bridge.runtime is not None
    client = bridge.runtime.delivery.workers["moengage-main"].client
    real_render = client.render

    def render(request: Any) -> bytes:
        if any(b"poison" in item.encoded for item in request.items):
            raise TypeError("cannot encode this value")
        rendered: bytes = real_render(request)
        return rendered

    client.render = render
    batch = seq_batch(4, "r")
    batch["batch"][2]["properties"]["seq"] = "poison"
    assert (await bridge.post("/v1/batch", batch, H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(sent_seqs(bridge)) == 3, timeout=10)
    assert sorted(sent_seqs(bridge)) == ["r-0", "r-1", "r-3"]

    async def dead() -> bool:
        _, body = await bridge.get("/admin/dlq", ADMIN)
        return len(body["dead_letters"]) == 1

    await wait_until(dead, what="the one dead letter")
    _, body = await bridge.get("/admin/dlq", ADMIN)
    (letter,) = body["dead_letters"]
    assert (letter["message_id"], letter["reason"]) == ("r-2", "render_error")
    _, shown = await bridge.get(f"/admin/dlq/{letter['id']}", ADMIN)
    assert "poison" in str(shown["request"]) and "cannot encode" in shown["response_body"], shown


def local_tcp_ports(pid: int) -> set[int]:
    """The local ports of process ``pid``'s TCP sockets (its fds' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_a_sighup_while_the_store_opens_does_not_kill_the_process(tmp_path):
    """A deploy tool may send SIGHUP (reload the mappings) while a bridge is still starting:
    on PostgreSQL it can wait minutes for another node's schema lock. SIGHUP's default
    action ends the process, so its handler must be in place before the store opens."""
    import asyncpg

    from bridge.store.postgres_schema import DDL_LOCK

    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        holder = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    schema = f"bridge_e2e_{time.time_ns() % 10**10}"
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["store"]["url"] = f"{dsn}?schema={schema}"
    proc = BridgeProcess(raw, tmp_path)
    await holder.execute("SELECT pg_advisory_lock($1)", DDL_LOCK)  # another node migrating
    starting = asyncio.create_task(proc.start(timeout=60))
    try:

        async def waiting_for_the_lock() -> bool:
            # This bridge's own wait: other bridges on the same database (other test runs
            # on this machine) may wait for the same lock.
            if proc.proc is None:
                return False  # not spawned yet
            ports = local_tcp_ports(proc.proc.pid)
            waiting = await holder.fetch(
                "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND NOT l.granted"
            )
            return any(row["client_port"] in ports for row in waiting)

        await wait_until(waiting_for_the_lock, timeout=30, what="the bridge to wait for the schema lock")
        assert proc.proc is not None
        proc.proc.send_signal(1)  # SIGHUP
        await asyncio.sleep(0.5)
        await holder.execute("SELECT pg_advisory_unlock($1)", DDL_LOCK)
        await starting  # raised "bridge exited early (-1)" when SIGHUP killed it
        proc.terminate()
        assert await proc.wait() == 0
    finally:
        if not starting.done():
            starting.cancel()  # it may not have spawned the bridge yet: it must not after this
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        await proc.ensure_stopped()
        await holder.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await holder.close()


async def test_a_destination_removed_with_work_left_is_named_at_start_and_replays_for_it_are_refused(make_bridge):
    """Renamed in the config, a destination's queue and DLQ are served by no worker: the
    bridge says so when it starts, and will not queue more for it by a replay."""
    bridge = await make_bridge()
    anonymous = {"type": "track", "anonymousId": "a-gone", "event": "Anonymous"}
    assert (await bridge.post("/v1/track", anonymous, H))[0] == 200

    async def discarded() -> bool:
        _, body = await bridge.get("/admin/discards?destination=moengage-main", ADMIN)
        return len(body["discards"]) == 1

    await wait_until(discarded, what="the anonymous call's discard")
    assert (await bridge.post("/admin/destinations/moengage-main/pause", None, ADMIN))[0] == 200
    track = {"type": "track", "userId": "u-gone", "event": "Left Behind"}
    assert (await bridge.post("/v1/track", track, H))[0] == 200
    await bridge.stop()
    bridge.destination("moengage-main")["name"] = "moengage-renamed"
    for source in bridge.raw["sources"]:
        source["to"] = ["moengage-renamed" if t == "moengage-main" else t for t in source.get("to", [])]
    with capture_logs() as logs:
        await bridge.start()
        await wait_until(
            lambda: any(e["event"] == "unconfigured_destination_has_work" for e in logs), what="the warning"
        )
    [warned] = [e for e in logs if e["event"] == "unconfigured_destination_has_work"]
    assert (warned["destination"], warned["queued"], warned["dead_letters"]) == ("moengage-main", 1, 0)
    status, body = await bridge.post("/admin/dlq/replay", {"destination": "moengage-main"}, ADMIN)
    assert (status, body["code"]) == (400, "unknown_destination") and "'moengage-main' is" in body["message"]
    status, body = await bridge.post("/admin/discards/replay", {"destination": "moengage-renamed"}, ADMIN)
    assert (status, body["replayed"]) == (200, 0)
    # Nor by reason: the removed destination's discard stays a discard, which ages out,
    # rather than becoming a job nothing leases or purges.
    status, body = await bridge.post("/admin/discards/replay", {"reason": "anonymous_user"}, ADMIN)
    assert (status, body["replayed"]) == (200, 0)
    _, listed = await bridge.get("/admin/discards?destination=moengage-main", ADMIN)
    assert len(listed["discards"]) == 1
    # The CLI, reading the same config, refuses and filters alike.
    config_path = bridge.tmp_path / "renamed.yaml"
    config_path.write_text(yaml.safe_dump(bridge.raw))
    args = ["discards", "replay", "--config", str(config_path)]
    assert await asyncio.to_thread(cli_main, [*args, "--destination", "moengage-main"]) == 2
    assert await asyncio.to_thread(cli_main, [*args, "--reason", "anonymous_user"]) == 0
    assert (await bridge.runtime.store.queue_stats())["moengage-main"].depth == 1  # only the queued track
    _, listed = await bridge.get("/admin/discards?destination=moengage-main", ADMIN)
    assert len(listed["discards"]) == 1


async def test_metrics_can_require_a_token(make_bridge):
    """They name every source and destination: with admin.metrics_token they are not
    public, while the probes stay open."""
    token = "metrics-token-0123456789"

    def tweak(raw: dict[str, Any]) -> None:
        raw["admin"]["metrics_token"] = token

    bridge = await make_bridge(tweak)
    status, body = await bridge.get("/metrics")
    assert (status, body["code"]) == (401, "unauthorized") and token not in str(body)
    status, _ = await bridge.get("/metrics", {"Authorization": f"Bearer {token}x"})
    assert status == 401
    assert bridge.client is not None
    resp = await bridge.client.get("/metrics")  # with the challenge a 401 must carry
    assert (resp.status, resp.headers.get("WWW-Authenticate")) == (401, 'Bearer realm="bridge-metrics"')
    status, text = await bridge.get("/metrics", {"Authorization": f"Bearer {token}"})
    assert status == 200 and "bridge_http_requests_total" in text
    assert (await bridge.get("/healthz"))[0] == 200
    # Without the key, as by default, a scraper needs nothing.
    await bridge.stop()
    del bridge.raw["admin"]["metrics_token"]
    await bridge.start()
    assert (await bridge.get("/metrics"))[0] == 200


async def test_an_edit_made_while_the_store_opens_is_loaded_by_the_watcher(tmp_path):
    """`bridge serve` loads the mappings, then opens the store (minutes on PostgreSQL behind
    another node's schema lock), then starts watching: an edit in between is a change."""
    from bridge.config.model import build_config
    from bridge.runtime import Runtime

    mappings = copy_mappings(tmp_path)
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["mappings"] = {"dir": str(mappings), "watch": True, "watch_interval": 0.1}
    runtime = Runtime(build_config(raw))
    runtime.load_mappings()
    before = runtime.mappings()["segment-to-moengage"].version
    path = mappings / "segment-to-moengage.yaml"
    path.write_text(path.read_text().replace("action: Viewed Screen", "action: Screen Seen"))
    await runtime.start()
    try:
        await wait_until(
            lambda: runtime.mappings()["segment-to-moengage"].version != before, what="the edit to be loaded"
        )
    finally:
        await runtime.stop()


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=abc",
        "application/openmetrics-text;version=1.a.0",
        "text/plain; version=x",
    ],
)
async def test_metrics_with_an_accept_version_that_is_not_a_number_get_the_default_format(bridge, accept):
    """Anyone may send the header (the endpoint is open to scrapers by default): content
    negotiation falls back to the default format rather than failing with a 500."""
    resp = await bridge.client.get("/metrics", headers={"Accept": accept})
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    assert "bridge_http_requests_total" in text


async def test_requests_no_route_takes_are_counted_under_the_labels_the_readme_names(bridge):
    """Bounded labels, and documented ones: alerts are written against these values."""
    for method, path, headers in [
        ("GET", "/no/such/path", {}),
        ("PUT", "/v1/track", {}),
        ("GET", "/admin/no-such-path", {}),  # refused for the token first: a 401
        ("DELETE", "/admin/dlq", ADMIN),
    ]:
        async with bridge.client.request(method, path, headers=headers) as resp:
            assert 400 <= resp.status < 500
    _, text = await bridge.get("/metrics")
    assert metric(text, "bridge_http_requests_total", route="unmatched", status="404") == 1
    assert metric(text, "bridge_http_requests_total", route="unmatched", status="405") == 1
    assert metric(text, "bridge_http_requests_total", route="/admin/{rest}", status="401") == 1
    assert metric(text, "bridge_http_requests_total", route="/admin/{rest}", status="405") == 1
    for doc in ("README.md", "docs/operations.md"):
        row = next(
            line for line in (REPO / doc).read_text().splitlines() if line.startswith("| `bridge_http_requests_total`")
        )
        assert "`unmatched`" in row and "`/admin/{rest}`" in row, (doc, row)


async def test_a_request_refused_for_its_key_is_not_an_event_rejected_as_the_metric_says(bridge):
    """README: requests refused as a whole (a bad key among them) are not counted in
    bridge_events_rejected_total; the metric's own HELP line said "validation or auth"."""
    status, _ = await bridge.post("/v1/track", {"type": "track", "userId": "u-1", "event": "E"}, basic("wrong-key"))
    assert status == 401
    _, text = await bridge.get("/metrics")
    family = next(f for f in text_string_to_metric_families(text) if f.name == "bridge_events_rejected")
    assert not family.samples
    assert "auth" not in family.documentation, family.documentation
