"""Secrets never reach a log line: through the configured pipeline, and around real auth failures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.observability.logging import (
    clear_secrets,
    configure_logging,
    fingerprint,
    redact_text,
    register_secret,
    reset_logging,
)
from bridge.observability.metrics import Metrics
from bridge.observability.redaction import is_secret_key, mask_value
from tests.observability.harness import (
    API_KEY,
    SECRETS,
    SEGMENT_OUT_KEY,
    STREAMS_PASSWORD,
    WORKSPACE,
    WRITE_KEY,
    basic,
    build_app,
    config,
    track,
)

SECRET = "sk_live_Vh3J9qW2eR5tY8uI"
OTHER = "pass-Word_77a1b2c3d4"
FP_RE = re.compile(r"^.{4}…[0-9a-f]{8}$")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def forms(secret: str) -> list[str]:
    """Every way a secret can travel: raw, percent-encoded, and base64 as in Basic auth headers."""
    out = [secret, urllib.parse.quote(secret, safe=""), b64(secret + ":"), b64(":" + secret)]
    for user in ("u", "us", "usr", "user", WORKSPACE, "moe", "a-longer-user-name"):
        out.append(b64(f"{user}:{secret}"))
        out.append(base64.urlsafe_b64encode(f"{user}:{secret}".encode()).decode())
    return out


def leaks(output: str, secrets: tuple[str, ...] | list[str]) -> list[str]:
    return [f"{s!r} as {f!r}" for s in secrets for f in forms(s) if f in output]


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    clear_secrets()
    configure_logging("debug", "json", stream=stream)
    yield stream
    clear_secrets()
    reset_logging()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


# -- fingerprint ---------------------------------------------------------------------------
def test_fingerprint_is_prefix_ellipsis_and_sha256() -> None:
    fp = fingerprint(SECRET)
    assert FP_RE.match(fp), fp
    assert fp == SECRET[:4] + "…" + hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    assert fingerprint(SECRET) == fp  # stable, so operators can match keys across lines
    assert fingerprint(OTHER) != fp


def test_short_secret_fingerprint_shows_no_prefix() -> None:
    fp = fingerprint("abc12")
    assert fp == "…" + hashlib.sha256(b"abc12").hexdigest()[:8]
    assert "abc" not in fp


# -- the configured pipeline ---------------------------------------------------------------
def test_registered_secret_is_replaced_everywhere(captured: io.StringIO) -> None:
    register_secret(SECRET)
    register_secret(OTHER)
    log = structlog.get_logger("bridge.test")
    log.error(f"upstream refused key {SECRET}")
    log.warning(
        "delivery_attempt_failed",
        destination="moengage-main",
        status=401,
        body=f'{{"error": "bad key", "key": "{SECRET}"}}',
        request={"headers": {"X-Forwarded": f"k={SECRET}", "Authorization": "Basic " + b64(f"ws:{OTHER}")}},
        attempts=[("note", f"tried {OTHER}"), {"deep": [{"deeper": (SECRET,)}]}],
        raw=f"write key {SECRET}".encode(),
        url=f"https://example.test/x?k={urllib.parse.quote(OTHER, safe='')}",
    )
    try:
        raise PermissionError(f"401 for api key {SECRET} and {OTHER}")
    except PermissionError:
        log.exception("send_failed", destination="moengage-main")
    out = captured.getvalue()
    assert not leaks(out, [SECRET, OTHER]), leaks(out, [SECRET, OTHER])
    entries = lines(captured)
    assert [e["event"] for e in entries[1:]] == ["delivery_attempt_failed", "send_failed"]
    assert fingerprint(SECRET) in out and fingerprint(OTHER) in out
    assert "PermissionError" in str(entries[2]["exception"])  # the traceback is kept, only redacted
    assert entries[1]["status"] == 401 and entries[1]["destination"] == "moengage-main"


@pytest.mark.parametrize("user", ["", "a", "ab", "abc", "abcd", "workspace-01"])
def test_base64_forms_are_caught_at_every_alignment(captured: io.StringIO, user: str) -> None:
    register_secret(SECRET)
    header = "Basic " + b64(f"{user}:{SECRET}")
    structlog.get_logger().info("upstream_echo", text=f"received Authorization: {header}", also=b64(SECRET + ":"))
    out = captured.getvalue()
    assert not leaks(out, [SECRET]), out
    assert b64(f"{user}:{SECRET}")[:-4] not in out
    # The whole base64 word goes, not only the secret's core: no bits of it are left around it.
    assert f"Authorization: Basic b64({fingerprint(SECRET)})" in out, out


def test_stdlib_loggers_go_through_the_same_redaction(captured: io.StringIO) -> None:
    register_secret(SECRET)
    try:
        raise ConnectionError(f"handshake with token {SECRET}")
    except ConnectionError:
        logging.getLogger("aiohttp.server").exception("Error handling request with %s", "Bearer " + SECRET)
    logging.getLogger("aiohttp.client").warning("headers %r", {"Authorization": "Basic " + b64(f"{SECRET}:")})
    out = captured.getvalue()
    assert not leaks(out, [SECRET]), out
    entries = lines(captured)
    assert [e["logger"] for e in entries] == ["aiohttp.server", "aiohttp.client"]
    assert "ConnectionError" in str(entries[0]["exception"])


def test_secret_registered_after_logger_creation_is_caught(captured: io.StringIO) -> None:
    log = structlog.get_logger("early")
    log.info("before", note="nothing secret yet")
    register_secret(SECRET)
    log.info("after", note=SECRET)
    assert SECRET not in captured.getvalue()
    assert lines(captured)[1]["note"] == fingerprint(SECRET)


def test_credential_keys_are_masked_even_when_unregistered(captured: io.StringIO) -> None:
    unknown = "client-sent-wrong-key-123456"
    structlog.get_logger().warning(
        "auth_failed",
        authorization=f"Bearer {unknown}",
        headers={"X-API-Key": unknown, "Proxy-Authorization": "Basic " + b64(f"me:{unknown}")},
        header_pairs=[
            ("authorization", f"Basic {b64(unknown + ':')}"),
            ("X-API-Key", unknown),  # no scheme: only the pair's key says it is a credential
            ("accept", "*/*"),
        ],
        password=unknown,
        writeKey=unknown,
        webhook_secret=unknown,
        admin_token=unknown,
        query=f"api_key={unknown}&page=2",
    )
    out = captured.getvalue()
    assert not leaks(out, [unknown]), out
    entry = lines(captured)[0]
    assert entry["authorization"] == "Bearer " + fingerprint(unknown)
    assert entry["password"] == fingerprint(unknown)
    assert entry["header_pairs"] == [
        ["authorization", "Basic " + fingerprint(b64(unknown + ":"))],
        ["X-API-Key", fingerprint(unknown)],
        ["accept", "*/*"],
    ]
    assert entry["query"] == f"api_key={fingerprint(unknown)}&page=2"


def test_url_passwords_are_masked_keeping_user_and_host(captured: io.StringIO) -> None:
    structlog.get_logger().error("store_unreachable", error="connect postgresql://bridge:s3cr3t-pw-99@db:5432/bridge")
    error = str(lines(captured)[0]["error"])
    assert "s3cr3t-pw-99" not in error
    assert error == f"connect postgresql://bridge:{fingerprint('s3cr3t-pw-99')}@db:5432/bridge"


def test_ordinary_text_is_left_alone(captured: io.StringIO) -> None:
    register_secret(SECRET)
    text = "Basic authentication failed; use Bearer tokens; retry=3 status=401 path=/v1/track"
    structlog.get_logger().info("plain", text=text, tokens_per_second=10.0, ordering_key="user-1")
    entry = lines(captured)[0]
    assert entry["text"] == text
    assert entry["tokens_per_second"] == 10.0 and entry["ordering_key"] == "user-1"


def test_fingerprints_are_not_fingerprinted_again() -> None:
    fp = fingerprint(SECRET)
    assert mask_value(fp) == fp
    assert redact_text(f"token={fp}") == f"token={fp}"


def test_secret_keys_are_matched_case_insensitively() -> None:
    for key in ("Authorization", "PASSWORD", "api-key", "x-api-key", "WriteKey", "moengage_api_key", "client_secret"):
        assert is_secret_key(key), key
    for key in ("event", "reason", "tokens", "ordering_key", "destination", "status"):
        assert not is_secret_key(key), key


def test_debug_is_filtered_at_info_and_lines_are_json_with_iso_timestamps() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)  # StringIO is not a TTY: JSON lines
    log = structlog.get_logger()
    log.debug("hidden", n=1)
    log.info("shown", n=2)
    logging.getLogger("some.lib").debug("hidden too")
    reset_logging()
    entries = lines(stream)
    assert [e["event"] for e in entries] == ["shown"]
    assert entries[0]["level"] == "info"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$", str(entries[0]["timestamp"]))


def test_console_format_is_redacted_too() -> None:
    stream = io.StringIO()
    clear_secrets()
    configure_logging("info", "console", stream=stream)
    register_secret(SECRET)
    try:
        raise ValueError(SECRET)
    except ValueError:
        structlog.get_logger().exception("oops", key=SECRET)
    out = stream.getvalue()
    assert "oops" in out and "ValueError" in out
    assert not leaks(out, [SECRET]), out
    clear_secrets()
    reset_logging()


def test_bad_level_and_format_are_refused_precisely() -> None:
    with pytest.raises(ValueError, match=r"log level must be one of .*got 'loud'"):
        configure_logging("loud")
    with pytest.raises(ValueError, match=r"log format must be one of auto, json, console; got 'xml'"):
        configure_logging("info", "xml")
    with pytest.raises(TypeError, match="expects a str"):
        register_secret(123)  # type: ignore[arg-type]


# -- real auth failures through the real bridge ----------------------------------------------
def leaky_upstream() -> web.Application:
    """An upstream answering 401 and echoing the credentials it got, as misbehaving proxies do."""

    async def refuse(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        decoded = base64.b64decode(header.partition(" ")[2] or "").decode(errors="replace")
        body = {"error": "invalid credentials", "password": decoded.partition(":")[2], "received": header}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


async def test_auth_failures_end_to_end_leak_no_secret(captured: io.StringIO, tmp_path: Path) -> None:
    upstream = TestServer(leaky_upstream(), host="127.0.0.1")
    await upstream.start_server()
    url = str(upstream.make_url("")).rstrip("/")
    cfg = config(tmp_path, url, url)
    for secret in cfg.secrets():
        register_secret(secret)
    assert set(SECRETS) <= set(cfg.secrets())
    app, runtime = build_app(cfg, Metrics())
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        # A client with a wrong key, with the key in the body, with a bad signature, with a wrong password.
        wrong = "wk_live_WRONG0000000000"
        assert (await client.post("/v1/track", json=track("u-1"), headers=basic(wrong))).status == 401
        resp = await client.post("/v1/track", json={**track("u-1"), "writeKey": wrong})
        assert resp.status == 401
        resp = await client.post(
            "/segment/webhook", json=track("u-2"), headers={**basic(WRITE_KEY), "X-Signature": "00" * 20}
        )
        assert resp.status == 401
        resp = await client.post("/moengage/streams/streams-main", json={"events": []}, headers=basic("moe", "nope"))
        assert resp.status == 401
        # Accepted traffic whose delivery meets an upstream 401 that echoes the credentials.
        body = {**track("user-42", secret_note=f"pasted {API_KEY}"), "writeKey": WRITE_KEY}
        assert (await client.post("/v1/track", json=body, headers=basic(WRITE_KEY))).status == 200
        event = {
            "event_name": "Email Sent",
            "event_code": "MOE_EMAIL_SENT",
            "event_uuid": "uuid-1",
            "event_time": 1580967474,
            "uid": "user-42",
        }
        resp = await client.post(
            "/moengage/streams/streams-main", json={"events": [event]}, headers=basic("moe", STREAMS_PASSWORD)
        )
        assert resp.status == 200
        # A 401 refuses the account: each destination pauses, its pause reason redacted too.
        await _wait_for_pauses(runtime, {"moengage-main", "segment-prod"})
    finally:
        await client.close()
        await upstream.close()
    out = captured.getvalue()
    assert not leaks(out, list(SECRETS)), leaks(out, list(SECRETS))
    failures = [e for e in lines(captured) if e["event"] in ("delivery_attempt_failed", "dead_lettered")]
    assert {e.get("destination") for e in failures} == {"moengage-main", "segment-prod"}
    # The echoed credentials did reach the log pipeline, and were replaced there.
    assert fingerprint(API_KEY) in out or f"b64({fingerprint(API_KEY)})" in out
    assert fingerprint(SEGMENT_OUT_KEY) in out or f"b64({fingerprint(SEGMENT_OUT_KEY)})" in out


async def _wait_for_pauses(runtime: object, destinations: set[str], timeout: float = 20.0) -> None:
    store = runtime.store  # type: ignore[attr-defined]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        states = await store.get_destination_states()
        paused = {name: s.reason for name, s in states.items() if s.paused}
        if set(paused) >= destinations:
            assert not leaks(str(paused), list(SECRETS)), paused
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{destinations} not paused within {timeout}s: {states}")
        await asyncio.sleep(0.05)
