"""Smoke test of the benchmark tools: the load generator against the floor server.

No timing assertions: only that requests are framed, answered, counted and stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import floor
from bench.httpload import LoadGenerator, latency_summary, percentile
from bench.payloads import batch_workload, single_workload, streams_workload
from bench.procs import quiet_disk

ROOT = Path(__file__).resolve().parents[2]


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        count: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return count


@pytest.fixture
async def floor_server(aiohttp_server: Any, tmp_path: Path) -> tuple[int, Path]:
    db = tmp_path / "floor.db"
    server: TestServer = await aiohttp_server(floor.build_app(str(db)))
    assert server.port is not None
    return server.port, db


async def test_closed_loop_batches_are_answered_counted_and_stored(floor_server: tuple[int, Path]) -> None:
    port, db = floor_server
    gen = LoadGenerator("127.0.0.1", port, batch_workload("wk", size=10), connections=4)
    await gen.connect()
    tally = await gen.closed_loop(duration=0.3, warmup=0.05)
    await gen.close()
    assert tally.requests > 0
    assert tally.statuses == {200: tally.requests}
    assert tally.events == 10 * tally.requests
    assert not tally.errors
    assert len(tally.latencies) == tally.requests
    # Every acknowledged event is a row: the floor acks only after its commit.
    assert _rows(db) == tally.all_events >= tally.events


async def test_fixed_count_sends_exactly_that_many_requests(floor_server: tuple[int, Path]) -> None:
    port, db = floor_server
    gen = LoadGenerator("127.0.0.1", port, streams_workload("src", "u", "p", size=5), connections=3)
    await gen.connect()
    tally = await gen.closed_loop(duration=1.0, max_requests=7)
    await gen.close()
    assert tally.sent == 7
    assert tally.requests == 7
    assert tally.all_events == 35 == _rows(db)


async def test_open_loop_offers_the_rate_and_measures_every_request(floor_server: tuple[int, Path]) -> None:
    port, _db = floor_server
    gen = LoadGenerator("127.0.0.1", port, single_workload("wk"), connections=8)
    await gen.connect()
    tally = await gen.open_loop(rate=200, duration=0.3, warmup=0.05)
    await gen.close()
    # 200/s over 0.3 s: 60 requests are due in the window (give or take the edges), all answered.
    assert 59 <= tally.requests <= 61
    assert tally.statuses == {200: tally.requests}
    assert not tally.errors
    out = tally.as_json("single", "open", 8, 200)
    assert out["latency_ms"]["count"] == tally.requests
    assert out["latency_ms"]["p50"] <= out["latency_ms"]["p99"] <= out["latency_ms"]["max"]


async def test_error_statuses_and_chunked_bodies_are_framed(aiohttp_server: Any) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=503)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"part":1}')
        await resp.write(b'{"part":2}')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/{call}", chunked)
    server: TestServer = await aiohttp_server(app)
    assert server.port is not None
    gen = LoadGenerator("127.0.0.1", server.port, single_workload("wk"), connections=2)
    await gen.connect()
    tally = await gen.closed_loop(duration=1.0, max_requests=6)
    await gen.close()
    assert tally.statuses == {503: 6}
    assert tally.requests == 0 and tally.events == 0
    assert not tally.errors


def test_bodies_are_json_about_1kb_per_event_with_fresh_ids() -> None:
    for workload, key, id_field in (
        (batch_workload("wk"), "batch", "messageId"),
        (streams_workload("s", "u", "p"), "events", "event_uuid"),
    ):
        sent: list[str] = []
        for _ in range(5):
            _path, body = workload.next_request()
            events = orjson.loads(body)[key]
            assert len(events) == 100
            assert 700 <= len(body) / len(events) <= 1400
            sent.extend(e[id_field] for e in events)
        assert len(set(sent)) == 500
        # Random UUID4s, as the SDKs send: ids in counting order would all land at the end
        # of the dedupe B-tree and flatter the bridge.
        assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in sent)
        assert sent != sorted(sent)
    single = single_workload("wk")
    paths = {single.next_request()[0] for _ in range(6)}
    assert paths == {b"/v1/identify", b"/v1/track", b"/v1/page"}


def test_floor_reads_events_by_endpoint_shape() -> None:
    assert floor.events_in("/v1/batch", {"batch": [{"a": 1}, {"b": 2}]}) == [{"a": 1}, {"b": 2}]
    assert floor.events_in("/v1/track", {"a": 1}) == [{"a": 1}]
    assert floor.events_in("/moengage/streams/x", {"events": [{"a": 1}]}) == [{"a": 1}]
    assert floor.events_in("/moengage/streams/x", {"event": {"a": 1}}) == [{"a": 1}]
    assert floor.events_in("/v1/batch", {"batch": "nope"}) is None
    assert floor.events_in("/v1/track", [1, 2]) is None


def test_floor_rows_are_the_raw_events_and_bad_bodies_get_none() -> None:
    rows = floor.rows_of("/v1/batch", b'{"batch": [{"a": 1}, {"b": [2]}]}')
    assert rows is not None and [body for _, body in rows] == [b'{"a":1}', b'{"b":[2]}']
    assert floor.rows_of("/v1/batch", b"{not json") is None
    assert floor.rows_of("/v1/batch", b'{"batch": 1}') is None


def test_percentiles_are_nearest_rank() -> None:
    values = [i / 1000 for i in range(1, 101)]
    assert percentile(values, 50) == 0.05
    assert percentile(values, 99) == 0.099
    assert latency_summary([]) == {"count": 0}
    assert latency_summary(values)["max"] == 100.0


async def test_loadgen_process_prints_its_tally(floor_server: tuple[int, Path]) -> None:
    port, _db = floor_server
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--mode",
        "batch",
        "--events",
        "300",
        "--connections",
        "2",
        "--cpu",
        "-1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    result = orjson.loads(out.splitlines()[-1])
    assert result["mode"] == "batch"
    assert result["all_events"] == 300
    assert result["statuses"] == {"200": 3}


def test_quiet_disk_removes_stopped_servers_stores_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr("bench.procs.os.sync", lambda: synced.append(True))
    stores = [tmp_path / n for n in ("floor-batch-0.db", "bridge-batch-0.db-wal", "bridge-batch-0.db-shm")]
    kept = [tmp_path / n for n in ("bridge-batch-0.yaml", "logs.txt")]
    for path in stores + kept:
        path.write_bytes(b"x" * 1000)
    quiet_disk(tmp_path)
    assert [p.name for p in stores if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert synced == [True]
