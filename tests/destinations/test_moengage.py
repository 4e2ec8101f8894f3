"""MoEngage destination against the MoEngage stand-in on loopback."""

from __future__ import annotations

import base64
import itertools

import orjson
import pytest

from bridge.destinations.base import ConfigError, Item, Request, destination_kinds
from bridge.destinations.moengage import MoEngageDestination
from bridge.destinations.packing import chunk
from bridge.testing.standins import MoEngageStandIn, Planned
from tests.destinations.helpers import customer, delete, device, event, make_item, merge

WS = "WS_TEST1"
KEY = "s3cret-api-key"


def config(**overrides):
    cfg = {"name": "moe", "workspace_id": WS, "api_key": KEY, "data_center": "01"}
    cfg.update(overrides)
    return cfg


def build(**overrides) -> MoEngageDestination:
    return MoEngageDestination.from_config(config(**overrides), where="destinations[0]", timeout=5.0)


@pytest.fixture
async def moengage(aiohttp_server):
    standin = MoEngageStandIn(WS, KEY)
    server = await aiohttp_server(standin.app())
    return standin, str(server.make_url("")).rstrip("/")


async def send_all(dest: MoEngageDestination, items):
    try:
        return [(request, await dest.send(request)) for request in dest.pack(items)]
    finally:
        await dest.close()


# -- config ---------------------------------------------------------------------------


def test_registered_under_kind_moengage():
    assert destination_kinds()["moengage"] is MoEngageDestination


@pytest.mark.parametrize(
    ("dc", "code", "region"),
    [("01", "01", "us"), (1, "01", "us"), ("02", "02", "eu"), (3, "03", "in"), ("04", "04", "us"),
     ("05", "05", "sg"), (6, "06", "id"), (101, "101", None), ("101", "101", None)],
)  # fmt: skip
def test_data_center_host_and_region(dc, code, region):
    dest = build(data_center=dc)
    assert dest.data_center == code
    assert dest.region == region
    assert dest.base_url == f"https://api-{code}.moengage.com"
    assert dest.url("bulk") == f"https://api-{code}.moengage.com/v1/transition/{WS}"
    assert dest.url("merge") == f"https://api-{code}.moengage.com/v1/customer/merge?app_id={WS}"


@pytest.mark.parametrize("dc", ["07", 7, "00", "eu", "DC-01", True, 1.0, "001", ""])
def test_unknown_data_center_is_a_config_error_naming_valid_values(dc):
    with pytest.raises(ConfigError) as err:
        build(data_center=dc)
    message = str(err.value)
    assert message.startswith("destinations[0].data_center: ")
    assert '"01", "02", "03", "04", "05", "06", "101"' in message


@pytest.mark.parametrize("missing", ["workspace_id", "api_key", "data_center"])
def test_missing_required_key(missing):
    cfg = config()
    del cfg[missing]
    with pytest.raises(ConfigError, match=rf"^destinations\[0\]\.{missing}: required$"):
        MoEngageDestination.from_config(cfg, where="destinations[0]", timeout=5.0)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        build(api_kee="x")
    assert str(err.value) == "destinations[0]: unknown key 'api_kee' (did you mean 'api_key'?)"
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(valid keys: "):
        build(zzz=1)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("api", "batch", 'destinations[0].api: must be "bulk" or "single"'),
        ("api_key", "", "destinations[0].api_key: must not be empty (is its environment variable set?)"),
        ("workspace_id", True, "destinations[0].workspace_id: expected a string, got a boolean"),
        ("base_url", "api-01.moengage.com", "destinations[0].base_url: must start with http"),
        ("max_request_bytes", "100kb", "destinations[0].max_request_bytes: must be an integer"),
        ("max_request_bytes", 10, "destinations[0].max_request_bytes: must be between"),
    ],
)
def test_bad_values(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        build(**{key: value})
    assert fragment in str(err.value)


@pytest.mark.parametrize("api_key", [KEY + "\n", " " + KEY, KEY[:4] + "\r" + KEY[4:]])
def test_an_api_key_no_basic_auth_could_match_is_a_config_error_that_never_quotes_it(api_key):
    # A secret file's line break, kept by a quoted "${VAR}", went into the Basic credentials:
    # `bridge check` passed, and MoEngage answered every request 401 (the destination paused).
    with pytest.raises(ConfigError) as err:
        build(api_key=api_key)
    assert str(err.value).startswith("destinations[0].api_key: starts or ends with whitespace")
    assert KEY[:4] not in str(err.value)


def test_describe_never_contains_the_api_key():
    dest = build()
    facts = dest.describe()
    assert facts["name"] == "moe"
    assert facts["kind"] == "moengage"
    assert facts["region"] == "us"
    assert KEY not in repr(facts)
    assert KEY not in repr(dest)


# -- packing --------------------------------------------------------------------------


def test_bulk_packs_customers_and_events_together_and_merges_apart_in_order():
    dest = build()
    items = [
        customer("u1", 1),
        event("u1", "Signed Up", 2),
        merge("old", "u1", 3),
        merge("o2", "u2", 4),
        customer("u2", 5),
        event("u2", "Later", 6),
    ]
    requests = dest.pack(items)
    # a merge never overtakes earlier events, nor falls behind later ones
    assert [(r.endpoint, [i.job_id for i in r.items]) for r in requests] == [
        ("bulk", [1, 2]),
        ("merge", [3, 4]),
        ("bulk", [5, 6]),
    ]


def test_bulk_requests_stay_under_100_000_bytes_and_keep_order():
    dest = build()
    items = [customer(f"user-{n}", n, blob="x" * 900) for n in range(400)]
    requests = dest.pack(items)
    assert len(requests) > 3
    assert [i.job_id for r in requests for i in r.items] == list(range(400))
    for request in requests:
        assert len(dest.render(request)) <= 100_000
    # greedy: each request but the last is too full to take the next item
    for current, following in itertools.pairwise(requests):
        assert len(dest.render(current)) + following.items[0].size + 1 > 100_000


def test_configured_max_request_bytes_is_honoured_exactly():
    dest = build(max_request_bytes=2000)
    items = [customer(f"u{n}", n, pad="y" * 100) for n in range(60)]
    for request in dest.pack(items):
        rendered = dest.render(request)
        assert len(rendered) <= 2000
        assert sum(i.size for i in request.items) + len(request.items) - 1 + 35 == len(rendered)


def test_max_request_bytes_never_lets_a_request_past_moengages_own_caps():
    # Set to the 128 KB of the single endpoints, Bulk Import still stops at its 100 KB: every
    # request above it would get a 413 and be split, one wasted request each time.
    dest = build(max_request_bytes=128_000)
    requests = dest.pack([customer(f"user-{n}", n, blob="x" * 900) for n in range(400)])
    assert max(len(dest.render(r)) for r in requests) <= 100_000
    assert dest.describe()["max_request_bytes"] == {"bulk": 100_000, "merge": 128_000}
    # Past 128 KB no endpoint takes a request: a config error, not a 413 for every request.
    with pytest.raises(ConfigError, match=r"max_request_bytes: must be between 1024 and 128000, got 2000000"):
        build(max_request_bytes=2_000_000)


def test_an_item_larger_than_the_cap_goes_alone():
    dest = build()
    huge = customer("big", 2, blob="z" * 150_000)
    requests = dest.pack([customer("a", 1), huge, customer("b", 3)])
    assert [[i.job_id for i in r.items] for r in requests] == [[1], [2], [3]]


def test_merge_requests_hold_at_most_50_pairs():
    dest = build()
    requests = dest.pack([merge(f"old{n}", f"new{n}", n) for n in range(120)])
    assert [len(r.items) for r in requests] == [50, 50, 20]
    assert all(r.endpoint == "merge" for r in requests)
    assert orjson.loads(dest.render(requests[2]))["merge_data"][0] == {
        "merged_user": "old100",
        "retained_user": "new100",
    }


def test_single_api_sends_one_item_per_request_in_order():
    dest = build(api="single")
    items = [event("u1", "A", 1), customer("u1", 2), event("u1", "B", 3), merge("x1", "u1", 4)]
    requests = dest.pack(items)
    assert [(r.endpoint, [i.job_id for i in r.items]) for r in requests] == [
        ("event", [1]),
        ("customer", [2]),
        ("event", [3]),
        ("merge", [4]),
    ]
    assert orjson.loads(dest.render(requests[1])) == items[1].output.body


def test_unsupported_kinds_are_rejected_before_packing():
    dest = build()
    odd = make_item("track", {"event": "x"})
    assert dest.reject_reason(odd) == "unsupported_output_kind"
    assert dest.reject_reason(customer("u1")) is None
    with pytest.raises(ValueError, match="cannot send output kind 'track'"):
        dest.pack([odd])


def test_rate_limits_and_costs_follow_the_documented_caps():
    dest = build()
    limits = dest.rate_limits()
    assert limits == pytest.approx(
        {
            "users": 10_000 / 60,
            "events": 500.0,
            "bulk_users": 1000.0,
            "bulk_events": 1000.0,
            "merge": 1000 / 60,
            "delete": 5000 / 60,
            "devices": 10_000 / 60,
        }
    )
    two_actions = make_item(
        "event", {"type": "event", "customer_id": "u", "actions": [{"action": "a"}, {"action": "b"}]}
    )
    bulk = Request("bulk", [customer("u1"), two_actions, event("u2", "c")])
    assert dict(dest.rate_cost(bulk).buckets) == {"bulk_users": 1, "bulk_events": 3}
    assert dict(dest.rate_cost(Request("merge", [merge("a1", "b1")] * 7)).buckets) == {"merge": 7}
    assert dict(dest.rate_cost(Request("customer", [customer("u1")])).buckets) == {"users": 1}
    assert dict(dest.rate_cost(Request("event", [two_actions])).buckets) == {"events": 2}
    assert dict(dest.rate_cost(Request("delete", [delete("u1")])).buckets) == {"delete": 1}


def test_devices_take_from_their_own_bucket_alone_and_in_bulk_import():
    """Track Device's documented cap is 10,000 devices a minute; Bulk Import's caps name
    users and events only, so its devices are kept to the same bucket. A request without a
    device takes nothing from it."""
    dest = build()
    assert dest.rate_limits()["devices"] == pytest.approx(10_000 / 60)
    assert dict(dest.rate_cost(Request("device", [device("u1")])).buckets) == {"devices": 1}
    bulk = Request("bulk", [customer("u1"), device("u1"), event("u1", "a"), customer("u2"), device("u2")])
    assert dict(dest.rate_cost(bulk).buckets) == {"bulk_users": 2, "bulk_events": 1, "devices": 2}
    plain = Request("bulk", [customer("u1"), event("u1", "a")])
    assert dict(dest.rate_cost(plain).buckets) == {"bulk_users": 1, "bulk_events": 1}


def test_a_device_follows_its_user_in_bulk_import_or_goes_alone_to_track_device():
    bulk, single = build(), build(api="single")
    items = [customer("u1", 1), device("u1", 1), event("u1", "a", 2), customer("u2", 3), device("u2", 3)]
    assert bulk.reject_reason(items[1]) is None
    assert [(r.endpoint, [(i.job_id, i.output.kind) for i in r.items]) for r in bulk.pack(items)] == [
        ("bulk", [(1, "customer"), (1, "device"), (2, "event"), (3, "customer"), (3, "device")])
    ]
    requests = single.pack(items)
    assert [(r.endpoint, [i.job_id for i in r.items]) for r in requests] == [
        ("customer", [1]),
        ("device", [1]),
        ("event", [2]),
        ("customer", [3]),
        ("device", [3]),
    ]
    assert orjson.loads(single.render(requests[1])) == items[1].output.body
    assert single.url("device") == f"https://api-01.moengage.com/v1/device/{WS}"


def test_bulk_import_never_parts_a_device_from_its_users_customer_item_where_a_request_ends():
    """Where a Bulk Import fills up between a user's customer item and the device after
    it, the customer starts the next request with its device: MoEngage adds devices to
    existing users only. Order is kept, and every request stays under the cap."""
    dest = build()
    items: list[Item] = []
    for n in range(1000):
        items += [customer(f"user-{n}", n, blob="x" * (250 + n % 97)), device(f"user-{n}", n)]
    # Packed greedily item by item, some requests would end with a customer item.
    runs = chunk(items, envelope_bytes=35, max_bytes=100_000, max_count=len(items))
    assert len([run for run in runs[:-1] if run[-1].output.kind == "customer"]) >= 2
    requests = dest.pack(items)
    assert len(requests) > 1
    assert [i for r in requests for i in r.items] == items
    for request in requests:
        assert len(dest.render(request)) <= 100_000
        assert request.items[0].output.kind == "customer", "a request opens with a device of the request before"
        assert request.items[-1].output.kind == "device", "a customer's device went to the next request"


def test_only_a_device_of_the_customer_before_it_is_kept_with_it():
    """Another user's device, or a device after an event, starts the next request as any
    item would; so does a pair too large for one request."""
    dest = build(max_request_bytes=2000)
    filler = customer("u0", 1, pad="p" * 1700)
    other = [filler, customer("u1", 2, pad="q" * 50), device("u9", 3)]
    assert [[i.job_id for i in r.items] for r in dest.pack(other)] == [[1, 2], [3]]
    big = [customer("u1", 1, pad="p" * 1200), device("u1", 1, push_id="t" * 900)]
    assert [[i.output.kind for i in r.items] for r in dest.pack(big)] == [["customer"], ["device"]]


@pytest.mark.parametrize("api", ["bulk", "single"])
def test_a_deletion_goes_alone_to_delete_user_in_its_place_among_the_users_items(api):
    dest = build(api=api)
    items = [customer("u1", 1), event("u1", "a", 2), delete("u1", 3), delete("u2", 4), customer("u1", 5)]
    assert dest.reject_reason(items[2]) is None
    requests = dest.pack(items)
    endpoints = [(r.endpoint, [i.job_id for i in r.items]) for r in requests]
    before = [("bulk", [1, 2])] if api == "bulk" else [("customer", [1]), ("event", [2])]
    after = [("bulk", [5])] if api == "bulk" else [("customer", [5])]
    assert endpoints == [*before, ("delete", [3]), ("delete", [4]), *after]
    assert orjson.loads(dest.render(requests[len(before)])) == {"identity_type": "customer_id", "identity_value": "u1"}


# -- sending ----------------------------------------------------------------------------


async def test_bulk_send_reaches_the_standin_with_exact_headers(moengage):
    standin, base = moengage
    dest = build(base_url=base + "/")
    items = [customer("u1", 1, email="a@example.com"), event("u1", "Order Completed", 2, total=12)]
    results = await send_all(dest, items)
    assert [response.status for _, response in results] == [200]
    assert results[0][1].body == (
        '{"status":"success","message":"Your request has been accepted and will be processed soon."}'
    )
    recorded = standin.requests[0]
    assert recorded.path == f"/v1/transition/{WS}"
    assert recorded.headers["Authorization"] == "Basic " + base64.b64encode(f"{WS}:{KEY}".encode()).decode()
    assert recorded.headers["MOE-APPKEY"] == WS
    assert recorded.headers["Content-Type"] == "application/json"
    assert recorded.body == {"type": "transition", "elements": [i.output.body for i in items]}
    assert standin.customers() == [items[0].output.body]
    assert standin.events() == [items[1].output.body]


async def test_single_endpoints_and_merge_reach_their_paths(moengage):
    standin, base = moengage
    dest = build(base_url=base, api="single")
    items = [customer("u1", 1), event("u1", "Viewed", 2), merge("anon-1", "u1", 3)]
    results = await send_all(dest, items)
    assert [response.status for _, response in results] == [200, 200, 200]
    assert [(r.path, dict(r.query)) for r in standin.requests] == [
        (f"/v1/customer/{WS}", {}),
        (f"/v1/event/{WS}", {}),
        ("/v1/customer/merge", {"app_id": WS}),
    ]
    assert standin.merges() == [{"merged_user": "anon-1", "retained_user": "u1"}]
    assert orjson.loads(results[2][1].body) == {"status": "success", "operation": "created"}


async def test_a_deletion_reaches_delete_user_and_one_for_an_absent_user_counts_as_delivered(moengage):
    standin, base = moengage
    dest = build(base_url=base)
    results = await send_all(dest, [customer("u1", 1), delete("u1", 2), delete("never-seen", 3)])
    assert [(request.endpoint, response.status) for request, response in results] == [
        ("bulk", 200),
        ("delete", 200),
        ("delete", 200),
    ]
    assert [(r.path, dict(r.query)) for r in standin.requests] == [
        (f"/v1/transition/{WS}", {}),
        ("/v1/customer/delete", {"app_id": WS}),
    ]
    assert standin.requests[1].headers["MOE-APPKEY"] == WS
    assert standin.deletions() == [{"identity_type": "customer_id", "identity_value": "u1"}]
    # MoEngage's own 400, kept in the body for whoever looks.
    assert "User doesn't exists with customer id never-seen" in results[2][1].body
    assert [s.status for s in standin.seen] == [200, 200, 400]


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "fail", "error": {"message": "identity_value can not be empty", "type": "MissingAttributeError"}},
        # The absent user's words only in the echoed id, not as the message: still a failure.
        {"status": "fail", "error": {"message": "Invalid id: User doesn't exists with customer id", "type": "X"}},
        "User doesn't exists with customer id u1",
    ],
    ids=["other-400", "words-elsewhere", "not-json"],
)
async def test_any_other_400_from_delete_user_stays_a_failure(moengage, answer):
    standin, base = moengage
    standin.plan(Planned(400, answer))
    results = await send_all(build(base_url=base), [delete("u1")])
    assert [response.status for _, response in results] == [400]


async def test_a_suspended_account_is_refused_on_every_endpoint_and_reported_as_the_accounts(moengage):
    standin, base = moengage
    standin.suspended = True
    results = await send_all(build(base_url=base), [customer("u1", 1), merge("anon-1", "u1", 2), delete("u1", 3)])
    # Merge User answers with a 400, which alone would read as bad events.
    assert [(request.endpoint, response.status) for request, response in results] == [
        ("bulk", 403),
        ("merge", 400),
        ("delete", 403),
    ]
    assert orjson.loads(results[1][1].body)["error"]["type"] == "Account Suspended"
    assert results[1][1].refuses_account
    assert standin.customers() == [] and standin.merges() == [] and standin.deletions() == []


@pytest.mark.parametrize(
    "error",
    [
        {"message": "Your account is blacklisted, Please contact MoEngage.", "type": "Blacklisted"},
        {"message": "Account Suspended.", "type": "Account Suspended"},
        {"message": "Account Temporarily Suspended.", "type": "Account Temporarily Suspended."},
        {"message": "given app_id is invalid/blocked", "type": "InvalidParams"},
    ],
    ids=["blacklisted", "suspended", "temporarily-suspended", "invalid-app-id"],
)
async def test_moengages_400s_about_the_account_are_reported_as_refusing_it(moengage, error):
    standin, base = moengage
    standin.plan(Planned(400, {"status": "fail", "error": {**error, "request_id": "pIvbWnGT"}}))
    results = await send_all(build(base_url=base), [merge("anon-1", "u1")])
    assert [(response.status, response.refuses_account) for _, response in results] == [(400, True)]


@pytest.mark.parametrize(
    "error",
    [
        {"message": "merged_user is expected to be String or Unicode String.", "type": "MissingAttributeError"},
        {"message": "merge_data can have at most 50 entries", "type": "InvalidParams"},
        # The account's words only in an echoed value, not as the error: about the events.
        {"message": "customer_id Account Suspended is invalid", "type": "InvalidParams"},
    ],
    ids=["missing-attribute", "other-invalid-params", "words-elsewhere"],
)
async def test_other_400s_stay_about_the_events(moengage, error):
    standin, base = moengage
    standin.plan(Planned(400, {"status": "fail", "error": error}))
    results = await send_all(build(base_url=base), [merge("anon-1", "u1")])
    assert [(response.status, response.refuses_account) for _, response in results] == [(400, False)]


async def test_a_full_bulk_pack_is_accepted_by_the_100_kb_standin(moengage):
    standin, base = moengage
    dest = build(base_url=base)
    items = [customer(f"user-{n}", n, note="n" * 700) for n in range(500)]
    results = await send_all(dest, items)
    assert len(results) > 3
    assert all(response.status == 200 for _, response in results)
    assert [c["customer_id"] for c in standin.customers()] == [f"user-{n}" for n in range(500)]


async def test_oversize_single_item_gets_413_from_the_standin(moengage):
    standin, base = moengage
    dest = build(base_url=base)
    results = await send_all(dest, [customer("big", 1, blob="z" * 150_000)])
    assert results[0][1].status == 413
    assert "PayloadTooLarge" in results[0][1].body
    assert standin.customers() == []


async def test_wrong_api_key_is_a_401_with_moengage_envelope(moengage):
    _standin, base = moengage
    dest = MoEngageDestination.from_config(config(api_key="wrong", base_url=base), where="destinations[0]", timeout=5.0)
    results = await send_all(dest, [customer("u1")])
    response = results[0][1]
    assert response.status == 401
    body = orjson.loads(response.body)
    assert body["status"] == "fail"
    assert body["error"]["message"] == "App Secret key mismatch. Please login to the dashboard to verify key"
    assert "wrong" not in response.body


async def test_429_with_retry_after_and_5xx_are_reported(moengage):
    standin, base = moengage
    standin.plan(Planned(429, headers={"Retry-After": "30"}), Planned(502))
    dest = build(base_url=base)
    await dest.start()
    try:
        first = await dest.send(Request("bulk", [customer("u1")]))
        second = await dest.send(Request("bulk", [customer("u1")]))
        third = await dest.send(Request("bulk", [customer("u1")]))
    finally:
        await dest.close()
    assert (first.status, first.retry_after) == (429, 30.0)
    assert second.status == 502
    assert third.status == 200
    assert standin.received == 3
    assert len(standin.customers()) == 1


async def test_timeout_and_reset_are_reported_as_status_0(moengage):
    standin, base = moengage
    standin.plan(Planned(hang=True), Planned(reset=True))
    dest = MoEngageDestination.from_config(config(base_url=base), where="destinations[0]", timeout=0.3)
    try:
        timed_out = await dest.send(Request("bulk", [customer("u1")]))
        reset = await dest.send(Request("bulk", [customer("u1")]))
    finally:
        await dest.close()
        standin.stop()
    assert timed_out.status == 0
    assert timed_out.error == "timeout"
    assert reset.status == 0
    assert reset.error is not None
    assert reset.error.startswith("connection_error")


async def test_send_to_an_unknown_endpoint_is_reported():
    dest = build()
    response = await dest.send(Request("nope", [customer("u1")]))
    assert response.status == 0
    assert response.error == "unknown endpoint 'nope'"


@pytest.mark.parametrize(
    ("api", "paths"), [("bulk", [f"/v1/transition/{WS}"]), ("single", [f"/v1/customer/{WS}", f"/v1/device/{WS}"])]
)
async def test_a_device_reaches_moengage_after_its_user_in_bulk_import_or_track_device(moengage, api, paths):
    standin, base = moengage
    items = [customer("u1", 1), device("u1", 1)]
    results = await send_all(build(base_url=base, api=api), items)
    assert [response.status for _, response in results] == [200] * len(paths)
    assert [r.path for r in standin.requests] == paths
    assert standin.devices() == [items[1].output.body]
    assert standin.ignored == []


def test_packing_a_bulk_import_at_once_makes_the_requests_packing_item_by_item_makes(monkeypatch):
    """pack's shortcut for a lease of users, events and devices (one Bulk Import group)
    against its general item-by-item grouping, on the same items, with kinds and sizes
    that take the shortcut and some that do not; and rate_cost's counts by kind."""
    rng = __import__("random").Random(11)
    makers = [
        lambda n: customer(f"u{n % 7}", n, blob="x" * rng.choice((10, 2000, 99_990))),
        lambda n: event(f"u{n % 7}", "Played", n),
        lambda n: make_item("event", {"customer_id": "u", "actions": [{"action": "a"}] * rng.randrange(0, 4)}, n),
        lambda n: device(f"u{n % 7}", n),
        lambda n: merge(f"u{n}", "u0", n),
    ]
    taken = 0
    for _ in range(60):
        items = [rng.choice(makers[: rng.choice((4, 5))])(n) for n in range(rng.randrange(0, 300))]
        for api in ("bulk", "single"):
            dest = build(api=api, max_request_bytes=rng.choice((None, 20_000)))
            fast = dest.pack(items)
            taken += dest._one_bulk_import(items)
            monkeypatch.setattr(dest, "_one_bulk_import", lambda items: False)
            slow = dest.pack(items)
            assert [(r.endpoint, r.items) for r in fast] == [(r.endpoint, r.items) for r in slow]
            for request in fast:
                kinds = [it.output.kind for it in request.items]
                cost = dest.rate_cost(request).buckets
                actions = sum(
                    max(1, len(it.output.body["actions"])) for it in request.items if it.output.kind == "event"
                )
                if request.endpoint == "event":
                    assert cost == {"events": actions}
                if request.endpoint == "bulk":
                    expected = {
                        "bulk_users": kinds.count("customer"),
                        "bulk_events": actions,
                        "devices": kinds.count("device"),
                    }
                    assert cost == {bucket: n for bucket, n in expected.items() if n}
    assert taken > 0
