"""MoEngage Streams with OAuth2 client credentials: the token endpoint, Bearer tokens on the
Streams route, and every refusal's answer, end to end on a real bridge."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, MutableMapping
from typing import Any
from urllib.parse import quote_plus, urlencode

import orjson
import pytest
from structlog.testing import capture_logs

from bridge.sources.streams.oauth import MAX_TOKEN_REQUEST_BODY
from bridge.sources.streams.oauth_tokens import issue_token, token_key
from tests.e2e.harness import STREAMS_PASSWORD, STREAMS_USER, Bridge, basic
from tests.e2e.test_streams_to_segment import seed_payload

CLIENT_ID = "moengage-streams"
# Characters that form-urlencoding changes (':' '+' '%' ' '), to show it is undone.
CLIENT_SECRET = "s3cr:et+with%20odd chars"
OTHER_SECRET = "other-secret-123456"
SOURCE = "streams-oauth"
TOKEN_PATH = f"/moengage/streams/{SOURCE}/oauth/token"
EVENTS_PATH = f"/moengage/streams/{SOURCE}"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
GRANT = {"grant_type": "client_credentials"}
# Answers compared byte for byte, but for the headers that differ on every answer.
_VARYING = {"Date"}

Answer = tuple[int, bytes, dict[str, str]]


def oauth_sources(raw: dict[str, Any]) -> None:
    """Three oauth2 sources beside the harness's Basic one (streams-main): another with
    its own secret, and a twin sharing this one's secret."""
    base = {"kind": "moengage_streams", "data_center": "01", "to": ["segment-prod"]}
    auth = {"type": "oauth2", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    raw["sources"] += [
        {**base, "name": SOURCE, "auth": {**auth, "token_ttl": 600}},
        {**base, "name": "streams-other", "auth": {**auth, "client_secret": OTHER_SECRET}},
        {**base, "name": "streams-twin", "auth": dict(auth)},
    ]


def client_basic(client_id: str, secret: str) -> dict[str, str]:
    """RFC 6749 §2.3.1: each part form-urlencoded, then HTTP Basic."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def send(bridge: Bridge, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    assert bridge.client is not None
    resp = await bridge.client.post(path, data=body, headers=headers)
    kept = {k: v for k, v in resp.headers.items() if k not in _VARYING}
    return resp.status, await resp.read(), kept


async def ask_token(
    bridge: Bridge, form: dict[str, str] | None = None, headers: dict[str, str] | None = None, path: str = TOKEN_PATH
) -> Answer:
    return await send(bridge, path, urlencode(GRANT if form is None else form).encode(), {**FORM, **(headers or {})})


async def post_events(bridge: Bridge, headers: dict[str, str], path: str = EVENTS_PATH) -> Answer:
    return await send(bridge, path, orjson.dumps(seed_payload()), {"Content-Type": "application/json", **headers})


async def token_of(bridge: Bridge, source: str = SOURCE, secret: str = CLIENT_SECRET) -> str:
    status, body, _ = await ask_token(bridge, headers=client_basic(CLIENT_ID, secret), path=token_path(source))
    assert status == 200, body
    token: str = orjson.loads(body)["access_token"]
    return token


def token_path(source: str) -> str:
    return f"/moengage/streams/{source}/oauth/token"


def refusal(answer: Answer) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(answer[1])
    return loaded


def reasons(logs: list[MutableMapping[str, Any]], event: str) -> list[tuple[str, str]]:
    return [(e["source"], e["reason"]) for e in logs if e["event"] == event]


@pytest.fixture
async def oauth_bridge(make_bridge: Callable[..., Any]) -> Bridge:
    bridge: Bridge = await make_bridge(oauth_sources)
    return bridge


# -- the token endpoint ---------------------------------------------------------------


async def test_a_token_by_basic_client_auth_lets_a_batch_through_to_segment(oauth_bridge: Bridge) -> None:
    status, body, headers = await ask_token(oauth_bridge, headers=client_basic(CLIENT_ID, CLIENT_SECRET))
    assert status == 200, body
    granted = orjson.loads(body)
    assert set(granted) == {"access_token", "token_type", "expires_in"}
    assert (granted["token_type"], granted["expires_in"]) == ("Bearer", 600)
    # RFC 6749 §5.1: a token must not be cached on the way.
    assert (headers["Cache-Control"], headers["Pragma"]) == ("no-store", "no-cache")
    assert headers["Content-Type"].startswith("application/json")

    status, body, _ = await post_events(oauth_bridge, bearer(granted["access_token"]))
    assert (status, orjson.loads(body)) == (200, {"success": True})
    seg = oauth_bridge.segment
    await seg.wait_for(lambda: len(seg.events()) == 3)
    assert {e["messageId"] for e in seg.events()} == {"uuid-push-1", "uuid-email-1", "uuid-sms-1"}


async def test_a_token_by_client_credentials_in_the_body_works_too(oauth_bridge: Bridge) -> None:
    form = {**GRANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "scope": "anything"}
    status, body, _ = await ask_token(oauth_bridge, form)
    assert status == 200, body
    token = orjson.loads(body)["access_token"]
    # "bearer" in any case, as HTTP auth schemes are case-insensitive.
    status, _, _ = await post_events(oauth_bridge, {"Authorization": f"bearer {token}"})
    assert status == 200
    await oauth_bridge.segment.wait_for(lambda: len(oauth_bridge.segment.events()) == 3)


async def test_basic_with_the_same_client_id_repeated_in_the_body_works(oauth_bridge: Bridge) -> None:
    """Many client libraries send HTTP Basic and repeat client_id in the body: refused as two
    methods at once (400), such a client never got a token. The secret stays in Basic only."""
    form = {**GRANT, "client_id": CLIENT_ID}
    status, body, _ = await ask_token(oauth_bridge, form, client_basic(CLIENT_ID, CLIENT_SECRET))
    assert status == 200, body
    assert (await post_events(oauth_bridge, bearer(orjson.loads(body)["access_token"])))[0] == 200
    # The Basic secret is still checked, and the answer is the one every refused client gets.
    wrong = await ask_token(oauth_bridge, form, client_basic(CLIENT_ID, "wrong-secret"))
    assert wrong == await ask_token(oauth_bridge, headers=client_basic(CLIENT_ID, "wrong-secret"))
    assert (wrong[0], refusal(wrong)["code"]) == (401, "invalid_client")
    mismatch = await ask_token(
        oauth_bridge, {**GRANT, "client_id": "someone-else"}, client_basic(CLIENT_ID, CLIENT_SECRET)
    )
    assert (mismatch[0], refusal(mismatch)["error"]) == (400, "invalid_request")
    assert "not the HTTP Basic client id" in refusal(mismatch)["error_description"]


async def test_the_token_path_with_a_trailing_slash_is_the_same_endpoint(oauth_bridge: Bridge) -> None:
    """A token URL pasted with a slash at its end got a 404 and MoEngage no token; a redirect
    would not do (many clients do not follow one on a POST)."""
    slash = TOKEN_PATH + "/"
    status, body, _ = await ask_token(oauth_bridge, headers=client_basic(CLIENT_ID, CLIENT_SECRET), path=slash)
    assert status == 200, body
    token = orjson.loads(body)["access_token"]
    assert (await post_events(oauth_bridge, bearer(token), path=EVENTS_PATH + "/"))[0] == 200
    for form, headers in (
        (None, client_basic(CLIENT_ID, "wrong-secret")),
        ({"scope": "x"}, client_basic(CLIENT_ID, CLIENT_SECRET)),
        ({**GRANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, client_basic(CLIENT_ID, CLIENT_SECRET)),
    ):
        refused = await ask_token(oauth_bridge, form, headers, path=slash)
        assert refused[0] in (400, 401) and refused == await ask_token(oauth_bridge, form, headers), refused
    unknown = token_path("nope")
    right = client_basic(CLIENT_ID, CLIENT_SECRET)
    assert await ask_token(oauth_bridge, headers=right, path=unknown + "/") == await ask_token(
        oauth_bridge, headers=right, path=unknown
    )
    status, data = await oauth_bridge.get(slash)
    assert (status, data["code"]) == (405, "method_not_allowed")


async def test_the_default_token_lifetime_is_an_hour(oauth_bridge: Bridge) -> None:
    status, body, _ = await ask_token(
        oauth_bridge, headers=client_basic(CLIENT_ID, CLIENT_SECRET), path=token_path("streams-twin")
    )
    assert (status, orjson.loads(body)["expires_in"]) == (200, 3600)


async def test_a_token_outlives_a_restart_as_any_node_would_take_it(oauth_bridge: Bridge) -> None:
    """Nothing about a token is kept: a restarted bridge (or another node with the same
    config) takes it, and one made from the config alone is taken too."""
    token = await token_of(oauth_bridge)
    await oauth_bridge.restart()
    assert (await post_events(oauth_bridge, bearer(token)))[0] == 200
    made_elsewhere = issue_token(SOURCE, token_key(CLIENT_SECRET), 60)
    assert (await post_events(oauth_bridge, bearer(made_elsewhere)))[0] == 200


async def test_every_client_not_let_in_gets_one_invalid_client_answer(make_bridge: Callable[..., Any]) -> None:
    """A wrong secret or id, no credentials, a malformed Basic header, an unknown source, a
    source that is not oauth2 and an address outside allow_ips: one answer, byte for byte.
    The log says which it was, never with the secret."""

    def tweak(raw: dict[str, Any]) -> None:
        oauth_sources(raw)
        raw["sources"].append({**raw["sources"][-1], "name": "streams-walled", "allow_ips": ["10.20.0.0/16"]})

    bridge: Bridge = await make_bridge(tweak)
    right = client_basic(CLIENT_ID, CLIENT_SECRET)
    with capture_logs() as logs:
        first = await ask_token(bridge, headers=client_basic(CLIENT_ID, "wrong-secret"))
        others = [
            await ask_token(bridge, headers=client_basic("someone-else", CLIENT_SECRET)),
            await ask_token(bridge, {**GRANT, "client_id": CLIENT_ID, "client_secret": "wrong-secret"}),
            await ask_token(bridge, {**GRANT, "client_id": CLIENT_ID}),  # no secret
            await ask_token(bridge),  # no client authentication at all
            await ask_token(bridge, headers={"Authorization": "Basic !!not-base64!!"}),
            await ask_token(bridge, headers=right, path=token_path("nope")),
            await ask_token(bridge, headers=right, path=token_path("streams-main")),  # a Basic source
            await ask_token(bridge, headers=right, path=token_path("web")),  # a Segment source
            await ask_token(bridge, headers=right, path=token_path("streams-walled")),  # outside allow_ips
        ]
    status, body, headers = first
    assert status == 401
    assert orjson.loads(body) == {
        "code": "invalid_client",
        "message": "unknown source, or the client's credentials or address are not accepted",
        "error": "invalid_client",
        "error_description": "unknown source, or the client's credentials or address are not accepted",
    }
    assert headers["WWW-Authenticate"].startswith("Basic ")
    assert (headers["Cache-Control"], headers["Pragma"]) == ("no-store", "no-cache")
    assert others == [first] * len(others)
    assert reasons(logs, "streams_token_refused") == [
        (SOURCE, "wrong_credentials"),
        (SOURCE, "wrong_credentials"),
        (SOURCE, "wrong_credentials"),
        (SOURCE, "missing_credentials"),
        (SOURCE, "missing_credentials"),
        (SOURCE, "malformed_authorization"),
        ("nope", "unknown_source"),
        ("streams-main", "not_an_oauth2_source"),
        ("web", "unknown_source"),
        ("streams-walled", "ip_not_allowed"),
    ]
    assert CLIENT_SECRET not in repr(logs) and "wrong-secret" not in repr(logs)
    assert not [e for e in logs if e["event"] == "streams_token_issued"]


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        pytest.param({**GRANT, "grant_type": "password"}, 400, "unsupported_grant_type", id="other-grant"),
        pytest.param({"scope": "x"}, 400, "invalid_request", id="no-grant"),
        pytest.param({**GRANT, "grant_type": ""}, 400, "invalid_request", id="empty-grant"),
        pytest.param(
            {**GRANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, 400, "invalid_request", id="both-methods"
        ),
        pytest.param({**GRANT, "client_secret": CLIENT_SECRET}, 400, "invalid_request", id="basic-and-a-body-secret"),
        # A body that names another client than the Basic header does.
        pytest.param({**GRANT, "client_id": "someone-else"}, 400, "invalid_request", id="basic-and-another-client-id"),
        pytest.param({**GRANT, "client_id": CLIENT_ID + " "}, 400, "invalid_request", id="basic-and-a-near-client-id"),
    ],
)
async def test_malformed_token_requests(oauth_bridge: Bridge, form: dict[str, str], status: int, code: str) -> None:
    answer = await ask_token(oauth_bridge, form, client_basic(CLIENT_ID, CLIENT_SECRET))
    body = refusal(answer)
    assert (answer[0], body["code"], body["error"]) == (status, code, code), body
    assert body["message"] == body["error_description"]
    assert answer[2]["Cache-Control"] == "no-store"
    # The same answer for a source that does not exist: these checks come first, for every
    # name alike, and tell nothing about the source.
    elsewhere = await ask_token(oauth_bridge, form, client_basic(CLIENT_ID, CLIENT_SECRET), path=token_path("nope"))
    assert elsewhere == answer


async def test_a_parameter_given_twice_is_refused(oauth_bridge: Bridge) -> None:
    body = b"grant_type=client_credentials&grant_type=client_credentials"
    status, raw, _ = await send(oauth_bridge, TOKEN_PATH, body, {**FORM, **client_basic(CLIENT_ID, CLIENT_SECRET)})
    assert (status, orjson.loads(raw)["code"]) == (400, "invalid_request")
    assert "grant_type is given more than once" in orjson.loads(raw)["message"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"grant_type": "client_credentials"}', "application/json"),
        (b"grant_type=client_credentials", "text/plain"),
        (b"grant_type=client_credentials", None),
    ],
)
async def test_a_body_that_is_not_a_form_is_refused(
    oauth_bridge: Bridge, body: bytes, content_type: str | None
) -> None:
    headers = client_basic(CLIENT_ID, CLIENT_SECRET)
    if content_type is not None:
        headers["Content-Type"] = content_type
    answer = await send(oauth_bridge, TOKEN_PATH, body, headers)
    got = refusal(answer)
    assert (answer[0], got["code"], got["error"]) == (400, "invalid_request", "invalid_request")
    assert "application/x-www-form-urlencoded" in got["error_description"]


async def test_a_form_that_is_not_utf8_is_refused(oauth_bridge: Bridge) -> None:
    body = b"grant_type=client_credentials&client_id=%ff&client_secret=x"
    answer = await send(oauth_bridge, TOKEN_PATH, body, FORM)
    assert (answer[0], refusal(answer)["code"]) == (400, "invalid_request")


async def test_an_oversize_token_request_is_refused(oauth_bridge: Bridge) -> None:
    form = {**GRANT, "padding": "x" * MAX_TOKEN_REQUEST_BODY}
    answer = await ask_token(oauth_bridge, form, client_basic(CLIENT_ID, CLIENT_SECRET))
    got = refusal(answer)
    assert (answer[0], got["code"], got["error"]) == (413, "payload_too_large", "invalid_request")
    assert f"exceeds {MAX_TOKEN_REQUEST_BODY} bytes" in got["error_description"]
    assert oauth_bridge.client is not None
    resp = await oauth_bridge.client.post(
        TOKEN_PATH,
        data=b"grant_type=client_credentials&" + b"x" * MAX_TOKEN_REQUEST_BODY,
        headers={**FORM, **client_basic(CLIENT_ID, CLIENT_SECRET)},
        chunked=True,
    )
    assert resp.status == 413 and (await resp.json())["error"] == "invalid_request"


async def test_the_token_endpoint_takes_only_post(oauth_bridge: Bridge) -> None:
    status, data = await oauth_bridge.get(TOKEN_PATH)
    assert (status, data["code"]) == (405, "method_not_allowed")


# -- Bearer tokens on the Streams route -----------------------------------------------------


async def test_every_token_not_taken_gets_the_routes_one_answer(oauth_bridge: Bridge) -> None:
    """Expired, tampered with, another source's (with its own secret or the same one), a
    token of the wrong kind, none at all: each is the route's one 401, the same as for an
    unknown source, and the log says which it was."""
    key = token_key(CLIENT_SECRET)
    token = await token_of(oauth_bridge)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    claims["exp"] += 10**6
    longer = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with capture_logs() as logs:
        unknown = await post_events(oauth_bridge, bearer(token), path="/moengage/streams/nope")
        refused = [
            await post_events(oauth_bridge, bearer(issue_token(SOURCE, key, 600, now=time.time() - 3600))),
            await post_events(oauth_bridge, bearer(f"{longer}.{token.split('.')[1]}")),
            await post_events(oauth_bridge, bearer(token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB"))),
            await post_events(oauth_bridge, bearer(await token_of(oauth_bridge, "streams-other", OTHER_SECRET))),
            await post_events(oauth_bridge, bearer(await token_of(oauth_bridge, "streams-twin"))),
            await post_events(oauth_bridge, bearer("not-a-token")),
            await post_events(oauth_bridge, bearer("")),
            await post_events(oauth_bridge, basic(CLIENT_ID, CLIENT_SECRET)),
            await post_events(oauth_bridge, {}),
            # A token for an oauth2 source lets no one into a Basic one either.
            await post_events(oauth_bridge, bearer(token), path="/moengage/streams/streams-main"),
        ]
    assert (unknown[0], refusal(unknown)["code"]) == (401, "unauthorized")
    assert refused == [unknown] * len(refused)
    assert reasons(logs, "streams_request_refused") == [
        ("nope", "unknown_source"),
        (SOURCE, "token_expired"),
        (SOURCE, "invalid_token_signature"),
        (SOURCE, "invalid_token_signature"),
        (SOURCE, "invalid_token_signature"),
        (SOURCE, "token_for_another_source"),
        (SOURCE, "malformed_token"),
        (SOURCE, "malformed_token"),
        (SOURCE, "malformed_authorization"),
        (SOURCE, "missing_credentials"),
        ("streams-main", "missing_credentials"),
    ]
    assert token not in repr(logs)
    # The token itself still works: nothing above spoilt it.
    assert (await post_events(oauth_bridge, bearer(token)))[0] == 200
    assert (await post_events(oauth_bridge, basic(STREAMS_USER, STREAMS_PASSWORD), "/moengage/streams/streams-main"))[
        0
    ] == 200


async def test_changing_the_secret_revokes_the_tokens_issued_under_it(oauth_bridge: Bridge) -> None:
    old_token = await token_of(oauth_bridge)
    await oauth_bridge.stop()
    source = next(s for s in oauth_bridge.raw["sources"] if s["name"] == SOURCE)
    source["auth"]["client_secret"] = "rotated-secret-987654"
    await oauth_bridge.start()
    with capture_logs() as logs:
        status, body, _ = await post_events(oauth_bridge, bearer(old_token))
        # The old secret gets no new token either.
        refused = await ask_token(oauth_bridge, headers=client_basic(CLIENT_ID, CLIENT_SECRET))
    assert (status, orjson.loads(body)["code"]) == (401, "unauthorized")
    assert (refused[0], refusal(refused)["code"]) == (401, "invalid_client")
    assert reasons(logs, "streams_request_refused") == [(SOURCE, "invalid_token_signature")]
    new_token = await token_of(oauth_bridge, secret="rotated-secret-987654")
    assert (await post_events(oauth_bridge, bearer(new_token)))[0] == 200
