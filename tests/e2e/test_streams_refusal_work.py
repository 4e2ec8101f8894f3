"""A Streams request refused before its source's credentials could be compared (an unknown
name, an address outside allow_ips, a token asked of a source that is not oauth2) makes the
comparisons a known source's wrong-credential request makes: the answers were already the
same, but such a refusal was the quickest, and the time taken told which names exist.

Timing is not measured: the comparisons are recorded, with the credentials they were given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import bridge.sources.streams.oauth as oauth_module
import bridge.sources.streams.routes as routes_module
from tests.e2e.harness import STREAMS_USER, Bridge, basic
from tests.e2e.test_streams_oauth2 import (
    CLIENT_ID,
    Answer,
    ask_token,
    bearer,
    client_basic,
    oauth_sources,
    post_events,
    token_of,
    token_path,
)

Call = tuple[str, ...]


@pytest.fixture
def comparisons(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Each credential comparison the Streams routes make, with what the request gave (what
    it is compared with differs: a source's secret or the decoy)."""
    calls: list[Call] = []

    def recorded(module: Any, name: str, given: Callable[..., Call]) -> None:
        real = getattr(module, name)

        def wrapper(*args: Any) -> Any:
            calls.append(given(*args))
            return real(*args)

        monkeypatch.setattr(module, name, wrapper)

    for module in (routes_module, oauth_module):
        recorded(module, "same_secret", lambda got, _expected: ("same_secret", got))
    recorded(routes_module, "token_problem", lambda token, _source, _key: ("token_problem", token))
    return calls


@pytest.fixture
async def sources_of_each_kind(make_bridge: Callable[..., Any]) -> Bridge:
    """streams-main (Basic), the oauth2 sources, one of type header, and a walled Basic one."""

    def tweak(raw: dict[str, Any]) -> None:
        oauth_sources(raw)
        main = raw["sources"][2]
        raw["sources"] += [
            {**main, "name": "streams-key", "auth": {"type": "header", "header": "X-Api-Key", "value": "k-123456"}},
            {**main, "name": "streams-walled", "allow_ips": ["10.20.0.0/16"]},
        ]

    bridge: Bridge = await make_bridge(tweak)
    return bridge


async def calls_of(calls: list[Call], answer: Any) -> tuple[list[Call], Answer]:
    """The comparisons made while ``answer`` (a request) was answered, and its answer."""
    calls.clear()
    got: Answer = await answer
    return list(calls), got


@pytest.mark.parametrize(
    ("source", "headers"),
    [
        pytest.param("streams-main", basic(STREAMS_USER, "wrong"), id="basic"),
        pytest.param("streams-key", {"X-Api-Key": "k-wrong"}, id="header"),
        pytest.param("streams-key", {}, id="header-missing"),
    ],
)
async def test_an_unknown_name_makes_the_comparisons_a_known_source_makes(
    sources_of_each_kind: Bridge, comparisons: list[Call], source: str, headers: dict[str, str]
) -> None:
    bridge = sources_of_each_kind
    known = await calls_of(comparisons, post_events(bridge, headers, f"/moengage/streams/{source}"))
    assert known[0], "the known source compares the credentials given"
    for name in ("nope", "streams-walled"):
        assert await calls_of(comparisons, post_events(bridge, headers, f"/moengage/streams/{name}")) == known


async def test_an_unknown_name_checks_a_bearer_token_as_an_oauth2_source_does(
    sources_of_each_kind: Bridge, comparisons: list[Call]
) -> None:
    bridge = sources_of_each_kind
    # Signed by another source: a well-formed token, whose signature is checked.
    token = await token_of(bridge, "streams-other", "other-secret-123456")
    known = await calls_of(comparisons, post_events(bridge, bearer(token)))
    assert known[0] == [("token_problem", token)]
    for name in ("nope", "streams-walled"):
        assert await calls_of(comparisons, post_events(bridge, bearer(token), f"/moengage/streams/{name}")) == known


async def test_a_token_refused_for_the_name_costs_the_comparisons_of_a_wrong_secret(
    sources_of_each_kind: Bridge, comparisons: list[Call]
) -> None:
    bridge = sources_of_each_kind
    wrong = client_basic(CLIENT_ID, "wrong-secret")
    known = await calls_of(comparisons, ask_token(bridge, headers=wrong))
    assert known[0] == [("same_secret", CLIENT_ID), ("same_secret", "wrong-secret")]
    # An unknown name, a Basic source, a Segment source's name, an address outside allow_ips.
    for name in ("nope", "streams-main", "web", "streams-walled"):
        assert await calls_of(comparisons, ask_token(bridge, headers=wrong, path=token_path(name))) == known
