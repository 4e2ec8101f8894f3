from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from bridge.testing.standins import MoEngageStandIn, SegmentStandIn
from tests.e2e.harness import API_KEY, DSN, SEGMENT_OUT_KEY, WORKSPACE, Bridge, config_dict


@pytest.fixture
async def make_bridge(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Bridge] = []

    async def make(tweak: Callable[[dict[str, Any]], None] | None = None, start: bool = True) -> Bridge:
        moengage = MoEngageStandIn(WORKSPACE, API_KEY)
        segment = SegmentStandIn({SEGMENT_OUT_KEY: "us"}, region="us")
        moe_server = TestServer(moengage.app(), host="127.0.0.1")
        seg_server = TestServer(segment.app(), host="127.0.0.1")
        await moe_server.start_server()
        await seg_server.start_server()
        raw = config_dict(tmp_path, str(moe_server.make_url("")).rstrip("/"), str(seg_server.make_url("")).rstrip("/"))
        if tweak is not None:
            tweak(raw)
        bridge = Bridge(tmp_path, moengage, segment, moe_server, seg_server, raw)
        made.append(bridge)
        if start:
            await bridge.start()
        return bridge

    yield make
    for b in made:
        await b.stop()
        b.moengage.stop()
        b.segment.stop()
        await b.moengage_server.close()
        await b.segment_server.close()


@pytest.fixture
async def bridge(make_bridge: Callable[..., Any]) -> Bridge:
    b: Bridge = await make_bridge()
    return b


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A schema of its own on the test PostgreSQL (harness.DSN), dropped afterwards."""
    name = f"bridge_e2e_{uuid.uuid4().hex[:10]}"
    try:
        conn = await asyncpg.connect(DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    await conn.close()
    yield name
    conn = await asyncpg.connect(DSN)
    try:
        # Bounded: a connection a test left open in a transaction (a process killed mid-lease
        # behind a proxy) holds locks in the schema, and the DROP would wait for ever.
        await conn.execute("SET lock_timeout = '20s'")
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        except asyncpg.exceptions.LockNotAvailableError:
            # Tests run one at a time: a bridge connection still open is a finished test's.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'bridge' AND pid <> pg_backend_pid()"
            )
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()
