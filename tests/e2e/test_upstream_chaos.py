"""A misbehaving upstream on loopback against a real worker: a blip of failures across many
requests in flight, a redirect, and the like. What test_delivery.py covers (5xx, 429 with
Retry-After, timeouts, resets, 413, bisection, the guard) is not repeated here."""

from __future__ import annotations

from typing import Any

from bridge.testing.standins import Planned
from tests.e2e.harness import ADMIN_TOKEN, WRITE_KEY, basic
from tests.e2e.test_delivery import dlq, seqs, tracks

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)


async def _status_of(bridge: Any, name: str = "moengage-main") -> dict[str, Any]:
    _, status = await bridge.get("/admin/status", ADMIN)
    return next(d for d in status["destinations"] if d["name"] == name)


async def test_a_blip_that_fails_many_requests_in_flight_backs_off_once_not_once_each(make_bridge):
    """Unordered, one event a request (`api: single`): a batch's 20 requests are on the wire
    together, and a blip answers each 503. That is one failure of the upstream, so the
    destination waits a first backoff (at most base_delay), as the README's retry policy
    says. Counted once per request, the 20th doubled the backoff 19 times, up to max_delay:
    the destination stood still for minutes after a blip that lasted a few milliseconds."""

    def tweak(raw: dict[str, Any]) -> None:
        moengage = raw["destinations"][0]
        moengage["api"] = "single"
        moengage["delivery"]["ordered"] = False
        moengage["retry"] = {"base_delay": 0.05, "max_delay": 300}

    bridge = await make_bridge(tweak)
    bridge.moengage.plan(*[Planned(503)] * 20)
    assert (await bridge.post("/v1/batch", tracks(20), H))[0] == 200
    await bridge.moengage.wait_for(lambda: len(seqs(bridge.moengage)) == 20, timeout=15)
    assert [s.status for s in bridge.moengage.seen].count(503) == 20
    assert await dlq(bridge) == []
