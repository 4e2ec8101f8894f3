"""The admin API's parameters: every number in plain ASCII digits, and no parameter it
does not know, so that a typo is an answer rather than a different question."""

from __future__ import annotations

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
