"""What an on-call operator sees of an incident: one log line per incident at warning, and
metrics a documented alert can fire on from the first event."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bridge.testing.standins import Planned
from tests.e2e.harness import ADMIN_TOKEN, WRITE_KEY, basic, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = basic(WRITE_KEY)
INCIDENT_LINES = ("ingest_refused", "ingest_resumed")


async def test_a_store_refusing_events_is_one_warning_per_incident_and_one_when_it_ends(make_bridge):
    def tweak(raw: dict[str, Any]) -> None:
        raw["store"]["max_bytes"] = 1

    bridge = await make_bridge(tweak)
    event = {"userId": "u-full", "event": "E"}
    with capture_logs() as logs:
        for _ in range(3):
            status, body = await bridge.post("/v1/track", event, H)
            assert (status, body["code"]) == (429, "store_full")
        assert bridge.runtime is not None
        bridge.runtime.store.max_bytes = None  # the operator made room

        async def accepted() -> bool:
            status, _ = await bridge.post("/v1/track", event, H)
            return bool(status == 200)

        await wait_until(accepted, what="ingest accepting events again")
        assert (await bridge.post("/v1/track", event, H))[0] == 200
    incident = [e for e in logs if e["event"] in INCIDENT_LINES]
    assert [(e["event"], e["log_level"]) for e in incident] == [
        ("ingest_refused", "warning"),
        ("ingest_resumed", "warning"),
    ]
    refused, resumed = incident
    assert refused["code"] == "store_full" and "over its limit of 1 bytes" in refused["reason"]
    assert "store.max_bytes" in refused["hint"]
    assert resumed["after"] == "store_full" and resumed["refused_requests"] >= 3
    # Each refused request still has its own line, at info.
    per_request = [e for e in logs if e["event"] == "request_rejected"]
    assert len(per_request) >= 3 and {e["log_level"] for e in per_request} == {"info"}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_the_dead_letter_queue_size_is_a_gauge_an_alert_sees_from_its_first_letter(bridge):
    """A dead-letter counter series appears with its first value, which Prometheus'
    increase() never counts: the bad deploy's burst before the guard pauses, or the first
    dead letter of a new reason or after a restart, did not fire the documented alert."""
    _, text = await bridge.get("/metrics")
    held = samples(text, "bridge_dead_letters")
    assert held[(("destination", "moengage-main"),)] == 0  # there before any dead letter
    assert held[(("destination", "segment-prod"),)] == 0
    assert not samples(text, "bridge_events_dead_lettered_total")  # the counter is not

    bridge.moengage.plan(Planned(422))
    assert (await bridge.post("/v1/track", {"userId": "u-dead", "event": "Refused"}, H))[0] == 200

    async def gauge(expected: float) -> bool:
        _, text = await bridge.get("/metrics")
        return samples(text, "bridge_dead_letters").get((("destination", "moengage-main"),)) == expected

    await wait_until(lambda: gauge(1), what="the dead letter in the gauge")
    status, body = await bridge.post("/admin/dlq/purge", {"destination": "moengage-main"}, ADMIN)
    assert (status, body["purged"]) == (200, 1)
    await wait_until(lambda: gauge(0), what="the purge in the gauge")
