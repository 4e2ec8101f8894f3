"""Segment destination against the Segment stand-in on loopback."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

import orjson
import pytest

from bridge.destinations.base import ConfigError, Item, Request, destination_kinds
from bridge.destinations.segment import SegmentDestination
from bridge.destinations.segment.destination import sent_at_now
from bridge.testing.standins import Planned, SegmentStandIn
from tests.destinations.helpers import make_item

KEY = "wk_us_123"
SENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def config(**overrides):
    cfg = {"name": "seg", "write_key": KEY, "region": "us"}
    cfg.update(overrides)
    return cfg


def build(**overrides) -> SegmentDestination:
    return SegmentDestination.from_config(config(**overrides), where="destinations[1]", timeout=5.0)


def track(n: int, pad: int = 0, **extra) -> Item:
    body = {
        "type": "track",
        "event": "Email Opened",
        "userId": f"user-{n}",
        "messageId": f"m-{n}",
        "properties": {"pad": "p" * pad},
        **extra,
    }
    return make_item("track", body, job_id=n)


@pytest.fixture
async def segment(aiohttp_server):
    standin = SegmentStandIn({KEY: "us", "wk_eu_9": "eu"}, region="us")
    server = await aiohttp_server(standin.app())
    return standin, str(server.make_url("")).rstrip("/")


# -- config -----------------------------------------------------------------------------


def test_registered_under_kind_segment():
    assert destination_kinds()["segment"] is SegmentDestination


@pytest.mark.parametrize(
    ("region", "host"), [("us", "https://api.segment.io"), ("eu", "https://events.eu1.segmentapis.com")]
)
def test_host_is_chosen_by_region(region, host):
    dest = build(region=region)
    assert dest.host == host
    assert dest.region == region
    assert dest.describe()["host"] == host


def test_base_url_overrides_the_host():
    assert build(base_url="http://127.0.0.1:9000/").host == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("region", "base_url"),
    [("eu", "https://events.eu1.segmentapis.com/v1"), ("us", "https://api.segment.io/v1/batch")],
)
def test_a_path_on_segments_own_host_is_refused(region, base_url):
    """Segment's docs give the HTTP API's host with /v1: as a base_url, every batch went
    to /v1/v1/batch. A proxy's path is the operator's own."""
    with pytest.raises(ConfigError, match=r"^destinations\[1\]\.base_url: .* without a path"):
        build(region=region, base_url=base_url)
    assert build(region=region, base_url=base_url.split("/v1")[0] + "/").host == base_url.split("/v1")[0]
    assert build(region=region, base_url="http://127.0.0.1:9000/segment").host == "http://127.0.0.1:9000/segment"


@pytest.mark.parametrize("region", ["ap", "US", "eu1", "", 1])
def test_other_regions_are_config_errors(region):
    with pytest.raises(ConfigError, match=r'^destinations\[1\]\.region: must be "us" or "eu"'):
        build(region=region)


@pytest.mark.parametrize("missing", ["write_key", "region"])
def test_missing_required_keys(missing):
    cfg = config()
    del cfg[missing]
    with pytest.raises(ConfigError, match=rf"^destinations\[1\]\.{missing}: required"):
        SegmentDestination.from_config(cfg, where="destinations[1]", timeout=5.0)


def test_unknown_key_and_bad_limits():
    with pytest.raises(ConfigError, match=r"unknown key 'writekey' \(did you mean 'write_key'\?\)"):
        build(writekey="x")
    with pytest.raises(ConfigError, match=r"max_batch_events: must be between 1 and 2500, got 5000"):
        build(max_batch_events=5000)
    with pytest.raises(ConfigError, match=r"max_batch_bytes: must be between 33792 and 500000, got 600000"):
        build(max_batch_bytes=600_000)


def test_describe_never_contains_the_write_key():
    dest = build()
    assert KEY not in repr(dest.describe())
    assert dest.rate_limits() == {"requests": 1000.0}
    assert dict(dest.rate_cost(Request("batch", [track(1)])).buckets) == {"requests": 1}


# -- packing ----------------------------------------------------------------------------


def test_batches_hold_at_most_500_events():
    dest = build()
    requests = dest.pack([track(n) for n in range(1201)])
    assert [len(r.items) for r in requests] == [500, 500, 201]
    assert [i.job_id for r in requests for i in r.items] == list(range(1201))


def test_batches_stay_under_475_kb():
    dest = build()
    items = [track(n, pad=20_000) for n in range(60)]
    requests = dest.pack(items)
    assert len(requests) == 3
    for request in requests:
        assert len(dest.render(request)) <= 475_000
    assert len(dest.render(requests[0])) + requests[1].items[0].size + 1 > 475_000


def test_configured_limits_are_honoured():
    dest = build(max_batch_events=7, max_batch_bytes=40_000)
    requests = dest.pack([track(n, pad=3_000) for n in range(30)])
    assert all(len(r.items) <= 7 for r in requests)
    assert all(len(dest.render(r)) <= 40_000 for r in requests)


def test_events_over_32_kb_are_rejected():
    dest = build()
    at_cap = track(1, pad=32 * 1024 - len(orjson.dumps(track(1).output.body)))
    assert at_cap.size == 32 * 1024
    assert dest.reject_reason(at_cap) is None
    over = track(2, pad=at_cap.size + 1 - len(orjson.dumps(track(2).output.body)))
    assert dest.reject_reason(over) == "event_too_large"
    assert dest.reject_reason(make_item("merge", {"a": 1})) == "unsupported_output_kind"


def test_missing_type_is_filled_from_the_output_kind_and_counted():
    dest = build()
    item = make_item("identify", {"userId": "u1", "traits": {}})
    body = orjson.loads(dest.render(Request("batch", [item])))
    assert body["batch"] == [{"type": "identify", "userId": "u1", "traits": {}}]
    # An empty body too: the type is spliced into the encoded bytes, not re-encoded.
    bare = make_item("track", {})
    typed = make_item("page", {"type": "screen", "name": "Home"})
    both = orjson.loads(dest.render(Request("batch", [bare, typed])))
    assert both["batch"] == [{"type": "track"}, {"type": "screen", "name": "Home"}]
    for one in (bare, item, typed):
        # the size it is packed by is the size it is sent at
        envelope = len(b'{"batch":[],"sentAt":""}') + len(sent_at_now())
        assert len(dest.render_for_record(Request("batch", [one]))) - envelope == dest._event_bytes(one)


def test_render_sets_sent_at_per_call():
    dest = build()
    request = Request("batch", [track(1)])
    body = orjson.loads(dest.render(request))
    assert set(body) == {"batch", "sentAt", "writeKey"}
    assert body["writeKey"] == KEY
    assert SENT_AT.match(body["sentAt"])
    sent = datetime.strptime(body["sentAt"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 60


# -- sending ----------------------------------------------------------------------------


async def test_batch_reaches_the_standin_with_auth_and_body_key(segment):
    standin, base = segment
    dest = build(base_url=base)
    items = [track(n) for n in range(3)]
    try:
        responses = [await dest.send(r) for r in dest.pack(items)]
    finally:
        await dest.close()
    assert [(r.status, r.body) for r in responses] == [(200, '{"success":true}')]
    recorded = standin.requests[0]
    assert recorded.path == "/v1/batch"
    assert recorded.headers["Authorization"] == "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    assert recorded.headers["Content-Type"] == "application/json"
    assert recorded.body["batch"] == [i.output.body for i in items]
    assert recorded.body["writeKey"] == KEY
    assert standin.events() == [i.output.body for i in items]
    assert {(e.auth, e.write_key) for e in standin.accepted} == {("both", KEY)}
    assert SENT_AT.match(standin.accepted[0].sent_at)


async def test_full_batches_are_accepted_by_the_standin(segment):
    standin, base = segment
    dest = build(base_url=base)
    items = [track(n, pad=9_000) for n in range(120)]
    try:
        responses = [await dest.send(r) for r in dest.pack(items)]
    finally:
        await dest.close()
    assert len(responses) == 3
    assert all(r.status == 200 for r in responses)
    assert [e["messageId"] for e in standin.events()] == [f"m-{n}" for n in range(120)]


async def test_eu_key_sent_to_us_standin_is_silently_dropped(segment):
    standin, base = segment
    dest = SegmentDestination.from_config(
        config(write_key="wk_eu_9", region="eu", base_url=base), where="d", timeout=5.0
    )
    try:
        response = await dest.send(Request("batch", [track(1)]))
    finally:
        await dest.close()
    assert response.status == 200
    assert standin.events() == []
    assert [(d.reason, d.write_key) for d in standin.dropped] == [("wrong_region", "wk_eu_9")]


async def test_429_retry_after_and_timeouts_are_reported(segment):
    standin, base = segment
    standin.plan(Planned(429, headers={"Retry-After": "2"}), Planned(hang=True))
    dest = SegmentDestination.from_config(config(base_url=base), where="d", timeout=0.3)
    try:
        limited = await dest.send(Request("batch", [track(1)]))
        hung = await dest.send(Request("batch", [track(1)]))
    finally:
        await dest.close()
        standin.stop()
    assert (limited.status, limited.retry_after) == (429, 2.0)
    assert orjson.loads(limited.body) == {"code": "rate_limited", "message": "Too Many Requests"}
    assert (hung.status, hung.error) == (0, "timeout")
