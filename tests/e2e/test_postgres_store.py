"""The bridge end to end on the shared PostgreSQL store (the scale-out option)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from segment.analytics import Client

from bridge.store.postgres import PostgresStore
from tests.e2e.harness import WRITE_KEY, basic

DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"bridge_e2e_{uuid.uuid4().hex[:10]}"
    try:
        conn = await asyncpg.connect(DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    await conn.close()
    yield name
    conn = await asyncpg.connect(DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


async def test_segment_to_moengage_on_postgres_survives_a_restart(make_bridge: Any, schema: str) -> None:
    def tweak(raw: dict[str, Any]) -> None:
        raw["store"]["url"] = DSN

    bridge = await make_bridge(tweak, start=False)
    bridge.store_factory = lambda: PostgresStore(DSN, schema=schema)
    await bridge.start()
    client = Client(WRITE_KEY, host=bridge.url, sync_mode=True, max_retries=0)
    await asyncio.to_thread(client.identify, "pg-user-1", {"email": "pg@example.com"})
    await asyncio.to_thread(client.track, "pg-user-1", "Stored In Postgres", {"n": 1})
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.customers()) == 1 and len(bridge.moengage.events()) == 1)
    assert bridge.moengage.customers()[0]["attributes"] == {"email": "pg@example.com"}

    # Queue while the upstream refuses, restart, and deliver: durability on the shared store.
    bridge.moengage.refuse_all(503)
    batch = {
        "batch": [
            {"type": "track", "userId": "pg-user-2", "event": "Queued", "messageId": f"pg-{i}"} for i in range(10)
        ]
    }
    assert (await bridge.post("/v1/batch", batch, basic(WRITE_KEY)))[0] == 200
    status, data = await bridge.post("/v1/batch", batch, basic(WRITE_KEY))
    assert status == 200 and data["duplicates"] == 10
    await bridge.stop()
    bridge.moengage.refuse_all(None)
    await bridge.start()
    await bridge.moengage.wait_for(lambda: len(bridge.moengage.events()) == 11, timeout=15)
