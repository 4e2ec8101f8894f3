"""Metrics: stable names, counters that move with real traffic, route-template HTTP counting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from bridge.bindings import PrometheusBindings
from bridge.observability.metrics import (
    MAX_LABEL_VALUES,
    OVERFLOW_LABEL,
    Metrics,
    TalliedCounter,
)
from bridge.routing import UNMATCHED_ROUTE, Routes
from bridge.runtime import Runtime
from bridge.store.base import QueueStats
from bridge.testing.standins import MoEngageStandIn, SegmentStandIn
from tests.observability.harness import API_KEY, SEGMENT_OUT_KEY, WORKSPACE, WRITE_KEY, basic, build_app, config, track

STABLE_NAMES = (
    "bridge_events_received_total",
    "bridge_events_delivered_total",
    "bridge_events_discarded_total",
    "bridge_events_dead_lettered_total",
    "bridge_queue_depth",
    "bridge_queue_oldest_age_seconds",
    "bridge_dead_letters",
    "bridge_delivery_request_duration_seconds_bucket",
    "bridge_delivery_request_duration_seconds_count",
    "bridge_delivery_request_duration_seconds_sum",
    "bridge_http_requests_total",
    "bridge_destination_paused",
    "bridge_events_rejected_total",
    "bridge_events_duplicate_total",
    "bridge_mapping_reloads_total",
    "bridge_build_info",
)


def value(m: Metrics, name: str, **labels: str) -> float:
    found = m.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def exercised() -> Metrics:
    m = Metrics()
    m.received("web", 3)
    m.rejected("web", "invalid_write_key")
    m.duplicates("web", 1)
    m.delivered("moengage-main", 2)
    m.discarded("web", "moengage-main", "anonymous_user", 1)
    m.discarded("", "moengage-main", "no_output", 1)
    m.dead_lettered("moengage-main", "http_400", 1)
    m.request("moengage-main", 200, 0.02)
    m.paused("moengage-main", True)
    m.queue("moengage-main", 5, 12.5)
    m.mapping_reload(True)
    m.http_request("/v1/{call}", 200)
    return m


def test_several_instances_coexist_in_one_process() -> None:
    a, b = Metrics(), Metrics()
    a.received("web", 2)
    assert value(a, "bridge_events_received_total", source="web") == 2
    assert value(b, "bridge_events_received_total", source="web") == 0


def test_helpers_move_the_right_series() -> None:
    m = exercised()
    m.received("web", 0)  # a no-op, never a new series
    assert value(m, "bridge_events_received_total", source="web") == 3
    assert value(m, "bridge_events_rejected_total", source="web", code="invalid_write_key") == 1
    assert value(m, "bridge_events_duplicate_total", source="web") == 1
    assert value(m, "bridge_events_delivered_total", destination="moengage-main") == 2
    assert (
        value(m, "bridge_events_discarded_total", source="web", destination="moengage-main", reason="anonymous_user")
        == 1
    )
    assert value(m, "bridge_events_discarded_total", source="", destination="moengage-main", reason="no_output") == 1
    assert value(m, "bridge_events_dead_lettered_total", destination="moengage-main", reason="http_400") == 1
    assert value(m, "bridge_delivery_request_duration_seconds_count", destination="moengage-main", status="200") == 1
    assert (
        value(
            m, "bridge_delivery_request_duration_seconds_bucket", destination="moengage-main", status="200", le="0.025"
        )
        == 1
    )
    assert value(m, "bridge_destination_paused", destination="moengage-main") == 1
    m.paused("moengage-main", False)
    assert value(m, "bridge_destination_paused", destination="moengage-main") == 0
    assert value(m, "bridge_queue_depth", destination="moengage-main") == 5
    assert value(m, "bridge_queue_oldest_age_seconds", destination="moengage-main") == 12.5
    assert value(m, "bridge_mapping_reloads_total", result="ok") == 1


def test_exposition_has_every_stable_name_and_parses() -> None:
    body, content_type = exercised().render()
    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    missing = [n for n in STABLE_NAMES if n not in samples]
    assert not missing, missing


def test_openmetrics_is_served_when_asked() -> None:
    body, content_type = exercised().render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_queue_stats_set_gauges_and_zero_vanished_destinations() -> None:
    m = Metrics()
    m.queue_stats({"a": QueueStats(depth=7, oldest_created_at=990.0), "b": QueueStats(0, None)}, now=1000.0)
    assert value(m, "bridge_queue_depth", destination="a") == 7
    assert value(m, "bridge_queue_oldest_age_seconds", destination="a") == 10.0
    assert value(m, "bridge_queue_oldest_age_seconds", destination="b") == 0.0
    m.queue_stats({"b": QueueStats(1, 999.0)}, now=1000.0)
    assert value(m, "bridge_queue_depth", destination="a") == 0
    assert value(m, "bridge_queue_depth", destination="b") == 1


def test_free_text_labels_cannot_explode_cardinality() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 50):
        m.dead_lettered("d", f"reason-{i}", 1)
    assert value(m, "bridge_events_dead_lettered_total", destination="d", reason=OVERFLOW_LABEL) == 50
    m.dead_lettered("d", "x" * 1000, 1)
    families = text_string_to_metric_families(m.render()[0].decode())
    reasons = {s.labels["reason"] for f in families if f.name == "bridge_events_dead_lettered" for s in f.samples}
    assert len(reasons) == MAX_LABEL_VALUES + 1
    assert max(len(r) for r in reasons) <= 80


def _exposed(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition but the creation times, which differ by instance."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.name.endswith("_created")
    }


def test_a_tallied_counter_exposes_what_a_prometheus_counter_does() -> None:
    plain, tallied = CollectorRegistry(), CollectorRegistry()
    counter = Counter("bridge_things", "Things, by kind and status.", ["kind", "status"], registry=plain)
    tally = TalliedCounter("bridge_things", "Things, by kind and status.", ["kind", "status"], registry=tallied)
    for kind, status, n in (("a", "200", 1), ("a", "200", 2), ("b", "404", 1), ("a", "500", 0.5)):
        counter.labels(kind, status).inc(n)
        tally.inc((kind, status), n)
    assert _exposed(tallied) == _exposed(plain)
    assert _exposed(tallied)[("bridge_things_total", (("kind", "a"), ("status", "200")))] == 3
    created = [s for f in tallied.collect() for s in f.samples if s.name == "bridge_things_created"]
    assert len(created) == 3 and all(abs(s.value - time.time()) < 60 for s in created)


def test_a_tallied_counter_bounds_its_labels_like_the_others() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 30):
        m.http_request(f"/route-{i}", 200)
    m.http_request("/" + "x" * 1000, 200)
    assert value(m, "bridge_http_requests_total", route=OVERFLOW_LABEL, status="200") == 31
    families = text_string_to_metric_families(m.render()[0].decode())
    routes = {s.labels["route"] for f in families if f.name == "bridge_http_requests" for s in f.samples}
    assert len(routes) == MAX_LABEL_VALUES + 1
    assert max(len(r) for r in routes) <= 80


def test_a_tallied_counter_loses_no_count_to_a_scrape_on_another_thread() -> None:
    m = Metrics()
    stop = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        while not stop.is_set():
            m.render()
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(200_000):
            m.received("web", 1)
            m.http_request("/v1/{call}", 200 if i % 10 else 400)
    finally:
        stop.set()
        scraper.join()
    assert scrapes > 0
    assert value(m, "bridge_events_received_total", source="web") == 200_000
    assert value(m, "bridge_http_requests_total", route="/v1/{call}", status="200") == 180_000
    assert value(m, "bridge_http_requests_total", route="/v1/{call}", status="400") == 20_000


# -- routes ------------------------------------------------------------------------------
async def test_routes_count_route_templates_and_error_statuses(
    aiohttp_client: AiohttpClient,
) -> None:
    m = Metrics()

    async def item(request: web.Request) -> web.Response:
        if request.match_info["id"] == "missing":
            raise web.HTTPNotFound()
        if request.match_info["id"] == "crash":
            raise RuntimeError("bug")
        return web.json_response({"id": request.match_info["id"]})

    app = web.Application()
    routes = Routes(app.router, m.http_request)
    routes.add_get("/items/{id}", item)
    routes.finish()
    client = await aiohttp_client(app)
    for path in ("/items/1", "/items/2", "/items/missing", "/items/crash", "/nowhere/at/all"):
        await client.get(path)
    await client.post("/items/1")  # 405
    assert value(m, "bridge_http_requests_total", route="/items/{id}", status="200") == 2
    assert value(m, "bridge_http_requests_total", route="/items/{id}", status="404") == 1
    assert value(m, "bridge_http_requests_total", route="/items/{id}", status="500") == 1
    assert value(m, "bridge_http_requests_total", route=UNMATCHED_ROUTE, status="404") == 1
    assert value(m, "bridge_http_requests_total", route=UNMATCHED_ROUTE, status="405") == 1
    text = m.render()[0].decode()
    assert "/items/1" not in text and "/nowhere" not in text


async def test_unmatched_requests_get_json_404_and_405_with_allow(aiohttp_client: AiohttpClient) -> None:
    async def item(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    routes = Routes(app.router)
    routes.add_get("/items/{id}", item)
    routes.add_post("/items/{id}/done", item)
    routes.finish()
    client = await aiohttp_client(app)
    resp = await client.delete("/items/1")
    assert (resp.status, resp.headers["Allow"]) == (405, "GET,HEAD")
    assert await resp.json() == {"code": "method_not_allowed", "message": "method not allowed on this endpoint"}
    resp = await client.get("/items/1/done")
    assert (resp.status, resp.headers["Allow"]) == (405, "POST")
    # aiohttp matches the decoded path: a newline sent as %0A must not slip past the catch-all
    resp = await client.delete("/items/a%0Ab")
    assert (resp.status, resp.headers["Allow"]) == (405, "GET,HEAD")
    assert (await resp.json())["code"] == "method_not_allowed"
    for method, path in (("GET", "/"), ("POST", "/items"), ("PUT", "/nowhere/at/all"), ("GET", "/no%0Awhere")):
        resp = await client.request(method, path)
        assert resp.status == 404
        assert await resp.json() == {"code": "not_found", "message": "no such endpoint"}
    assert (await client.head("/items/1")).status == 200
    with pytest.raises(RuntimeError, match=r"after Routes\.finish"):
        routes.add_get("/late", item)


async def test_routes_count_statuses_after_json_errors(aiohttp_client: AiohttpClient) -> None:
    m = Metrics()

    async def teapot(request: web.Request) -> web.Response:
        raise web.HTTPBadRequest()

    app = web.Application()
    routes = Routes(app.router, m.http_request)
    routes.add_post("/v1/{call}", teapot)
    routes.finish()
    client = await aiohttp_client(app)
    resp = await client.post("/v1/track")
    assert resp.status == 400
    assert value(m, "bridge_http_requests_total", route="/v1/{call}", status="400") == 1


# -- real traffic --------------------------------------------------------------------------
async def test_counters_move_with_real_traffic(tmp_path: Path) -> None:
    moengage = MoEngageStandIn(WORKSPACE, API_KEY)
    segment = SegmentStandIn({SEGMENT_OUT_KEY: "us"}, region="us")
    moe_server = TestServer(moengage.app(), host="127.0.0.1")
    seg_server = TestServer(segment.app(), host="127.0.0.1")
    await moe_server.start_server()
    await seg_server.start_server()
    m = Metrics()
    cfg = config(tmp_path, str(moe_server.make_url("")).rstrip("/"), str(seg_server.make_url("")).rstrip("/"))
    app, runtime = build_app(cfg, m)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        auth = basic(WRITE_KEY)
        batch = {"batch": [{**track(f"user-{i}"), "messageId": f"m-{i}"} for i in range(3)]}
        assert (await client.post("/v1/batch", json=batch, headers=auth)).status == 200
        assert (await client.post("/v1/batch", json=batch, headers=auth)).status == 200  # duplicates
        anonymous = {"type": "track", "anonymousId": "anon-1", "event": "Clicked", "messageId": "anon"}
        assert (await client.post("/v1/track", json=anonymous, headers=auth)).status == 200
        assert (await client.post("/v1/track", json=track("u"), headers=basic("wrong-key"))).status == 401
        assert (await client.post("/v1/track", json={"type": "track", "event": "x"}, headers=auth)).status == 400

        await _until(lambda: value(m, "bridge_events_delivered_total", destination="moengage-main") == 3)
        await _until(
            lambda: (
                value(
                    m,
                    "bridge_events_discarded_total",
                    source="web",
                    destination="moengage-main",
                    reason="anonymous_user",
                )
                == 1
            )
        )
        resp = await client.get("/metrics")
        text = await resp.text()
    finally:
        await client.close()
        moengage.stop()
        segment.stop()
        await moe_server.close()
        await seg_server.close()
    assert value(m, "bridge_events_received_total", source="web") == 4
    assert value(m, "bridge_events_duplicate_total", source="web") == 3
    assert value(m, "bridge_events_rejected_total", source="web", code="id_required") == 1
    assert value(m, "bridge_http_requests_total", route="/v1/batch", status="200") == 2
    assert value(m, "bridge_http_requests_total", route="/v1/track", status="401") == 1
    sent = value(m, "bridge_delivery_request_duration_seconds_count", destination="moengage-main", status="200")
    assert sent >= 1
    assert 'bridge_events_delivered_total{destination="moengage-main"} 3.0' in text
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert runtime.store is not None


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def test_the_gauge_refresh_backs_off_when_counting_the_queue_is_slow() -> None:
    """Counting a huge queue takes a while on the core that answers ingest: the background
    refresh then waits GAUGE_COST_FACTOR times as long as the count took, not the interval."""
    calls: list[float] = []

    class SlowStore:
        async def queue_stats(self) -> dict[str, QueueStats]:
            calls.append(time.monotonic())
            await asyncio.sleep(0.02)
            return {}

        def now(self) -> float:
            return time.time()

    fake = SimpleNamespace(
        store=SlowStore(), config=SimpleNamespace(destinations=[]), delivery=SimpleNamespace(workers={})
    )
    task = asyncio.create_task(PrometheusBindings().refresh_gauges_forever(cast(Runtime, fake), interval=0.001))
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # 0.02 s x 50 = 1 s before the second count; at the 1 ms interval there would be ~25.
    assert len(calls) == 1
