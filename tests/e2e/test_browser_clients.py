"""analytics.js, Segment's browser SDK, pointed at the bridge (the Segment.io integration's
apiHost "<bridge>/v1"): each call goes to /v1/<first letter of its type>, or batched to
/v1/b, as text/plain with the writeKey in the body, from a page on another origin.

The bodies below are what analytics-next builds (its segmentio plugin's ``normalize``):
the writeKey, ``_metadata``, ``sentAt`` per call, a null userId before identify."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from tests.e2e.harness import WRITE_KEY, Bridge

ORIGIN = "https://shop.example"
BROWSER = {"Content-Type": "text/plain", "Origin": ORIGIN}


def ajs(kind: str, user: str | None, **fields: Any) -> dict[str, Any]:
    """One call as analytics.js posts it in its standard (one call a request) mode."""
    return {
        "type": kind,
        "userId": user,
        "anonymousId": "5bc1d9a2-8a07-4d5e-9c53-2f0c4f3a11aa",
        "messageId": f"ajs-next-{uuid.uuid4().hex}",
        "timestamp": "2026-12-06T19:00:00.000Z",
        "sentAt": "2026-12-06T19:00:00.120Z",
        "integrations": {},
        "context": {
            "page": {"path": "/cart", "url": f"{ORIGIN}/cart", "title": "Cart", "referrer": "", "search": ""},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
            "locale": "en-US",
            "library": {"name": "analytics.js", "version": "next-1.72.0"},
        },
        "writeKey": WRITE_KEY,
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
        **fields,
    }


async def post_text(bridge: Bridge, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    assert bridge.client is not None
    return await bridge.client.post(path, data=orjson.dumps(body), headers=BROWSER if headers is None else headers)


async def test_a_preflight_lets_any_site_post_with_the_headers_it_asks_for(bridge: Bridge) -> None:
    assert bridge.client is not None
    for path in ("/v1/t", "/v1/b", "/v1/batch", "/v1/track"):
        resp = await bridge.client.options(
            path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-custom-header",
            },
        )
        assert resp.status == 204, (path, resp.status, await resp.text())
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "content-type, x-custom-header"
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
    # A header list that is not one falls back to what the SDKs send.
    resp = await bridge.client.options(
        "/v1/t", headers={"Origin": ORIGIN, "Access-Control-Request-Headers": "content type; x=1"}
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization"


async def test_standard_mode_calls_reach_moengage_and_the_page_can_read_each_answer(bridge: Bridge) -> None:
    identify = ajs("identify", "shopper-1", traits={"id": "shopper-1", "email": "s1@shop.example"})
    track = ajs("track", "shopper-1", event="Added To Cart", properties={"sku": "A-1", "price": 12.5})
    page = ajs("page", "shopper-1", name="Cart", properties={"path": "/cart"})
    for path, body in (("/v1/i", identify), ("/v1/t", track), ("/v1/p", page)):
        resp = await post_text(bridge, path, body)
        assert resp.status == 200, (path, await resp.text())
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 2)
    actions = {e["actions"][0]["action"]: e for e in bridge.moengage.events()}
    assert set(actions) == {"Added To Cart", "Viewed Web Page"}
    assert actions["Added To Cart"]["customer_id"] == "shopper-1"
    assert actions["Added To Cart"]["actions"][0]["attributes"]["sku"] == "A-1"
    assert actions["Viewed Web Page"]["actions"][0]["attributes"]["url"] == f"{ORIGIN}/cart"
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.customers()) >= 1)
    assert bridge.moengage.customers()[0]["customer_id"] == "shopper-1"


async def test_the_short_path_names_the_type_as_segments_does(bridge: Bridge) -> None:
    # analytics.js sends the type in the body too; the path decides, as for /v1/track.
    body = ajs("track", "shopper-2", event="Checkout Started")
    for short, call in (("s", "screen"), ("g", "group"), ("a", "alias")):
        resp = await post_text(bridge, f"/v1/{short}", {**body, "type": "track"})
        data = await resp.json()
        # Each is judged as its own type: a group without groupId, an alias without previousId.
        if call == "screen":
            assert resp.status == 200, data
        else:
            assert resp.status == 400 and call in data["message"], (call, data)
            assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_batching_mode_posts_to_v1_b(bridge: Bridge) -> None:
    """analytics.js with deliveryStrategy "batching": one writeKey for the batch, no sentAt per item."""
    items = []
    for n in range(3):
        item = ajs("track", "shopper-3", event="Viewed Product", properties={"n": n})
        del item["sentAt"], item["writeKey"]
        items.append(item)
    resp = await post_text(bridge, "/v1/b", {"writeKey": WRITE_KEY, "batch": items, "sentAt": "2026-12-06T19:00:01Z"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 3)
    assert sorted(e["actions"][0]["attributes"]["n"] for e in bridge.moengage.events()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (ajs("track", "u", event="E", writeKey="wk_not_ours"), 401, "invalid_write_key"),
        (ajs("track", "u", event="E", writeKey=None), 401, "write_key_required"),
        (b"{not json", 400, "invalid_json"),
    ],
)
async def test_a_refusal_is_readable_by_the_page_so_analytics_js_does_not_resend_it(
    bridge: Bridge, body: Any, status: int, code: str
) -> None:
    assert bridge.client is not None
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await bridge.client.post("/v1/t", data=raw, headers=BROWSER)
    assert resp.status == status
    assert (await resp.json())["code"] == code
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]


async def test_server_clients_get_no_cors_headers(bridge: Bridge) -> None:
    body = ajs("track", "shopper-4", event="E")
    resp = await post_text(bridge, "/v1/track", body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert bridge.client is not None
    # Other routes take no browser calls at all.
    resp = await bridge.client.options("/segment/webhook", headers={"Origin": ORIGIN})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("method", [b"OPTIONS", b"POST"])
async def test_an_expectation_the_bridge_does_not_meet_gets_its_json_417_with_cors(
    bridge: Bridge, method: bytes
) -> None:
    """Answered on the headers alone, as every route's are: JSON, counted, and readable by
    the page that sent it (the preflight got aiohttp's text/plain 417 before)."""
    from tests.e2e.test_parse_bounds import head_and_json

    request = (
        method
        + b" /v1/t HTTP/1.1\r\nHost: b\r\nOrigin: "
        + ORIGIN.encode()
        + b"\r\nAccess-Control-Request-Method: POST\r\nExpect: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, headers, body = await head_and_json(bridge, request)
    assert (status, body["code"]) == (417, "expectation_failed"), body
    assert headers["content-type"].startswith("application/json")
    assert headers["access-control-allow-origin"] == "*"
