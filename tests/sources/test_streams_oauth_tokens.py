"""The signed, stateless access tokens of oauth2 Streams sources."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from bridge.sources.streams.oauth_tokens import (
    BAD_SIGNATURE,
    EXPIRED,
    MALFORMED,
    MAX_TOKEN_LENGTH,
    OTHER_SOURCE,
    issue_token,
    token_key,
    token_problem,
)

NOW = 1_767_225_600.0
KEY = token_key("client-secret-1")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _payload(token: str) -> dict[str, object]:
    part = token.split(".")[0]
    loaded: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def test_a_token_lets_its_source_in_until_it_expires() -> None:
    token = issue_token("streams-a", KEY, 3600, now=NOW)
    assert token_problem(token, "streams-a", KEY, now=NOW) is None
    assert token_problem(token, "streams-a", KEY, now=NOW + 3599) is None
    assert token_problem(token, "streams-a", KEY, now=NOW + 3600) == EXPIRED
    assert _payload(token)["exp"] == int(NOW) + 3600


def test_the_clock_is_the_default() -> None:
    assert token_problem(issue_token("s", KEY, 60), "s", KEY) is None
    assert token_problem(issue_token("s", KEY, 60, now=NOW - 120), "s", KEY) == EXPIRED


def test_tokens_are_url_safe_and_unique() -> None:
    tokens = {issue_token("streams-a", KEY, 3600, now=NOW) for _ in range(20)}
    assert len(tokens) == 20  # the nonce: the same source and second still give new tokens
    for token in tokens:
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_the_key_is_derived_from_the_secret_not_the_secret_itself() -> None:
    assert KEY != b"client-secret-1"
    assert token_key("client-secret-1") == KEY  # every node derives the same key
    assert token_key("client-secret-2") != KEY


def test_a_token_signed_under_another_secret_is_refused() -> None:
    """Changing a source's secret revokes its tokens; another source's tokens never fit."""
    token = issue_token("streams-a", token_key("old-secret"), 3600, now=NOW)
    assert token_problem(token, "streams-a", token_key("new-secret"), now=NOW) == BAD_SIGNATURE


def test_a_token_of_another_source_sharing_the_secret_is_refused() -> None:
    token = issue_token("streams-b", KEY, 3600, now=NOW)
    assert token_problem(token, "streams-a", KEY, now=NOW) == OTHER_SOURCE


def test_a_changed_payload_breaks_the_signature() -> None:
    token = issue_token("streams-a", KEY, 60, now=NOW)
    claims = _payload(token)
    claims["exp"] = int(NOW) + 10**9
    forged = _b64(json.dumps(claims, separators=(",", ":")).encode()) + "." + token.split(".")[1]
    assert token_problem(forged, "streams-a", KEY, now=NOW) == BAD_SIGNATURE
    # One character of the signature changed.
    last = token[-2]
    flipped = token[:-2] + ("A" if last != "A" else "B") + token[-1]
    assert token_problem(flipped, "streams-a", KEY, now=NOW) == BAD_SIGNATURE


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a b.c", "é.x", "a.", ".b", "abcde.fghij", "a" * (MAX_TOKEN_LENGTH + 1) + ".b"],
)
def test_malformed_tokens_are_refused_not_crashed_on(token: str) -> None:
    assert token_problem(token, "streams-a", KEY, now=NOW) in (MALFORMED, BAD_SIGNATURE)


def test_a_signed_payload_of_another_shape_is_malformed() -> None:
    """A payload we signed is read only after its signature: one of another shape (a later
    format) is refused, never a crash."""
    for payload in (b"[1]", b'{"src":"streams-a","exp":true}', b"not json", b'{"src":1,"exp":2}'):
        signature = hmac.new(KEY, payload, hashlib.sha256).digest()
        token = f"{_b64(payload)}.{_b64(signature)}"
        assert token_problem(token, "streams-a", KEY, now=NOW) == MALFORMED
