"""The admin API's parameters: every number in plain ASCII digits, and no parameter it
does not know, so that a typo is an answer rather than a different question."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.e2e.harness import ADMIN_TOKEN, Bridge

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# What int() and float() read that no caller means: an underscore (1_0 is 10), a sign, a
# space, other scripts' digits (Arabic-Indic five), and the like.
NOT_PLAIN = ["1_0", "+5", " 5", "5 ", "\u0665", "\uff15", "0x5", "5.0", "1e3", "-1", ""]


def _q(text: str) -> str:
    return quote(text, safe="")


@pytest.mark.parametrize("text", [t for t in NOT_PLAIN if t])
async def test_a_dead_letter_id_is_plain_digits(bridge: Bridge, text: str) -> None:
    status, body = await bridge.get(f"/admin/dlq/{_q(text)}", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), (text, body)
    assert body["message"].startswith("id must be an integer from 1 to "), body


async def test_a_plain_id_is_looked_up(bridge: Bridge) -> None:
    for text in ("10", "0010", str(2**63 - 1)):
        status, body = await bridge.get(f"/admin/dlq/{text}", ADMIN)
        assert (status, body["code"]) == (404, "not_found"), (text, body)
    status, body = await bridge.get(f"/admin/dlq/{2**63}", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    status, body = await bridge.get("/admin/dlq/" + "0" * 5000 + "1", ADMIN)  # past int()'s 4300 digits
    assert (status, body["code"]) == (404, "not_found"), body
    status, body = await bridge.get("/admin/dlq/" + "9" * 5000, ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body


@pytest.mark.parametrize("listing", ["dlq", "discards"])
@pytest.mark.parametrize("text", NOT_PLAIN)
async def test_a_limit_is_plain_digits(bridge: Bridge, listing: str, text: str) -> None:
    status, body = await bridge.get(f"/admin/{listing}?limit={_q(text)}", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), (text, body)
    assert body["message"].startswith("limit must be an integer from 1 to 10000"), body


@pytest.mark.parametrize("listing", ["dlq", "discards"])
async def test_a_plain_limit_lists(bridge: Bridge, listing: str) -> None:
    for text in ("1", "05", "10000"):
        status, body = await bridge.get(f"/admin/{listing}?limit={text}", ADMIN)
        assert status == 200, (text, body)
    for text in ("0", "10001"):
        status, body = await bridge.get(f"/admin/{listing}?limit={text}", ADMIN)
        assert (status, body["code"]) == (400, "invalid_parameter"), (text, body)


@pytest.mark.parametrize("bound", ["since", "until"])
@pytest.mark.parametrize("text", ["1_0", "+5", " 5", "5 ", "\u0665", "1e3", "0x5", ".5", "5.", "nan", "inf"])
async def test_a_time_bound_is_plain_digits_or_iso(bridge: Bridge, bound: str, text: str) -> None:
    status, body = await bridge.get(f"/admin/dlq?{bound}={_q(text)}", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), (text, body)
    assert body["message"].startswith(f"{bound} must be "), body
    for path in ("/admin/dlq/replay", "/admin/dlq/purge", "/admin/discards/replay"):
        status, body = await bridge.post(path, {bound: text}, ADMIN)
        assert (status, body["code"]) == (400, "invalid_parameter"), (path, text, body)


async def test_a_day_written_yyyymmdd_is_not_guessed(bridge: Bridge) -> None:
    """20260101 was read as epoch seconds (August 1970): a replay "since the new year" then
    replayed every dead letter. A day in eight digits is refused with the two ways to say it."""
    status, body = await bridge.get("/admin/dlq?since=20260101", ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    assert "write the date as 2026-01-01 (ISO-8601), or epoch seconds as 20260101.0" in body["message"], body
    status, body = await bridge.post("/admin/dlq/replay", {"until": "20261231"}, ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body
    for text in ("20260101.0", "20261399", "18991231"):  # epoch seconds: a fraction, or no such day
        status, body = await bridge.post("/admin/dlq/purge", {"since": text}, ADMIN)
        assert (status, body) == (200, {"purged": 0}), (text, body)
    # A JSON number is a number: the caller wrote epoch seconds.
    status, body = await bridge.post("/admin/dlq/purge", {"since": 20260101}, ADMIN)
    assert (status, body) == (200, {"purged": 0}), body


@pytest.mark.parametrize("bound", ["since", "until"])
async def test_plain_time_bounds_are_taken(bridge: Bridge, bound: str) -> None:
    for text in ("1700000000", "1700000000.25", "-5", "2026-01-01", "2026-01-01T00:00:00+02:00"):
        status, body = await bridge.get(f"/admin/dlq?{bound}={_q(text)}", ADMIN)
        assert status == 200, (text, body)
        status, body = await bridge.post("/admin/dlq/purge", {bound: text}, ADMIN)
        assert (status, body) == (200, {"purged": 0}), (text, body)
    for number in (1700000000, 1700000000.25):  # a JSON number is a number already
        status, body = await bridge.post("/admin/dlq/purge", {bound: number}, ADMIN)
        assert (status, body) == (200, {"purged": 0}), (number, body)
    status, body = await bridge.post("/admin/dlq/purge", {bound: True}, ADMIN)
    assert (status, body["code"]) == (400, "invalid_parameter"), body


# Every admin route, with a request it answers 200 (or 404 for an id no record has).
ROUTES = [
    ("GET", "/admin/status", None),
    ("GET", "/admin/dlq", None),
    ("GET", "/admin/dlq/7", None),
    ("POST", "/admin/dlq/replay", {"destination": "moengage-main"}),
    ("POST", "/admin/dlq/purge", {"reason": "nothing"}),
    ("GET", "/admin/discards", None),
    ("POST", "/admin/discards/replay", {"destination": "moengage-main"}),
    ("POST", "/admin/translate?mapping=segment-to-moengage", {"type": "track", "userId": "u1", "event": "E"}),
    ("POST", "/admin/destinations/moengage-main/pause", None),
    ("POST", "/admin/destinations/moengage-main/resume", None),
    ("POST", "/admin/reload", None),
]


async def _call(bridge: Bridge, method: str, path: str, body: object, headers: dict[str, str]) -> tuple[int, Any]:
    if method == "GET":
        return await bridge.get(path, headers)
    return await bridge.post(path, body, headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p.split('?')[0]}" for m, p, _ in ROUTES])
async def test_an_unknown_query_parameter_is_refused_on_every_route(
    bridge: Bridge, method: str, path: str, body: object
) -> None:
    status, answer = await _call(bridge, method, path, body, ADMIN)
    assert status in (200, 404), answer  # as it is, the request is fine
    joined = "&" if "?" in path else "?"
    status, answer = await _call(bridge, method, f"{path}{joined}bogus=1", body, ADMIN)
    assert (status, answer["code"]) == (400, "unknown_parameter"), answer
    assert "unknown query parameter 'bogus'" in answer["message"], answer
    # Only the operator learns that: without the token it is the same 401 as ever.
    status, answer = await _call(bridge, method, f"{path}{joined}bogus=1", body, {})
    assert (status, answer["code"]) == (401, "unauthorized"), answer


async def test_an_unknown_parameter_does_not_act(bridge: Bridge) -> None:
    status, answer = await bridge.post("/admin/destinations/moengage-main/pause?why=x", None, ADMIN)
    assert status == 400, answer
    _, state = await bridge.get("/admin/status", ADMIN)
    assert not state["destinations"][0]["paused"]


@pytest.mark.parametrize("listing", ["dlq", "discards"])
async def test_a_misspelt_listing_parameter_is_refused_with_the_right_one(bridge: Bridge, listing: str) -> None:
    """?destinaton= listed every destination's records, as if no filter were given."""
    for typo, meant in (("destinaton", "destination"), ("reasons", "reason"), ("sinc", "since"), ("limt", "limit")):
        status, answer = await bridge.get(f"/admin/{listing}?{typo}=x", ADMIN)
        assert (status, answer["code"]) == (400, "unknown_parameter"), answer
        assert f"unknown query parameter {typo!r} (did you mean {meant!r}?)" in answer["message"], answer
        assert "it takes destination, reason, since, until, limit" in answer["message"], answer
    status, answer = await bridge.get(f"/admin/{listing}?page=2", ADMIN)
    assert (status, answer["code"]) == (400, "unknown_parameter"), answer
    assert "(did you mean" not in answer["message"], answer
    status, answer = await bridge.get("/admin/status?verbose=1", ADMIN)
    assert answer["message"] == "unknown query parameter 'verbose'; it takes none", answer


@pytest.mark.parametrize("listing", ["dlq", "discards"])
async def test_every_documented_listing_parameter_is_taken(bridge: Bridge, listing: str) -> None:
    """README: GET /admin/dlq and /admin/discards take destination, reason, since, until, limit."""
    query = "destination=moengage-main&reason=http_400&since=1700000000&until=2099-01-01&limit=5"
    status, answer = await bridge.get(f"/admin/{listing}?{query}", ADMIN)
    assert status == 200, answer


async def test_every_documented_translate_parameter_is_taken(bridge: Bridge) -> None:
    """README: translate takes ?mapping= or ?destination=, &source= and &linked_id=."""
    event = {"type": "track", "userId": "u1", "event": "E"}
    for query in (
        "mapping=segment-to-moengage&source=web&linked_id=L1",
        "destination=moengage-main&source=web&linked_id=L1",
    ):
        status, answer = await bridge.post(f"/admin/translate?{query}", event, ADMIN)
        assert status == 200, (query, answer)
    status, answer = await bridge.post("/admin/translate?mapping=segment-to-moengage&linkedid=L1", event, ADMIN)
    assert (status, answer["code"]) == (400, "unknown_parameter"), answer
    assert "(did you mean 'linked_id'?)" in answer["message"], answer
