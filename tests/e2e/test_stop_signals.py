"""A SIGTERM stops `bridge serve` whenever it comes, start-up included, within
server.shutdown_timeout (real processes, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bridge.store.postgres_schema import DDL_LOCK
from tests.e2e.harness import config_dict
from tests.e2e.proc import BridgeProcess

DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"bridge_sig_{uuid.uuid4().hex[:10]}"
    try:
        conn = await asyncpg.connect(DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    await conn.close()
    yield name
    conn = await asyncpg.connect(DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


def log_events(proc: BridgeProcess) -> list[str]:
    return [
        json.loads(line)["event"]
        for line in proc.log_path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


async def waiting_on_the_schema_lock(conn: asyncpg.Connection) -> bool:
    """Whether a bridge process's connection waits for the schema (DDL) advisory lock."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = 'bridge'"
        )
    )


async def test_a_sigterm_while_the_store_opens_stops_the_process(tmp_path: Path, schema: str) -> None:
    """The store may wait minutes at start for another node's schema lock. A SIGTERM then
    killed the process outright (no drain, exit -15) or, as PID 1 in the image, was dropped by
    the kernel, and the bridge went on to serve once the lock came: it must stop, cleanly."""
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["store"]["url"] = f"{DSN}?schema={schema}"
    raw["server"]["shutdown_timeout"] = 2
    proc = BridgeProcess(raw, tmp_path)
    holder = await asyncpg.connect(DSN)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", DDL_LOCK)  # as a node migrating the schema
        await proc.spawn()
        for _ in range(400):
            if await waiting_on_the_schema_lock(holder) or proc.proc is None or proc.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert await waiting_on_the_schema_lock(holder), proc.log_tail()
        proc.terminate()
        code = await proc.wait(timeout=30)  # the lock is still held: start-up is abandoned
        assert code == 0, f"exit {code}:\n{proc.log_tail()}"
        events = log_events(proc)
        assert "listening" not in events
        assert events[-2:] == ["shutting_down", "stopped"], proc.log_tail()
    finally:
        await holder.close()
        await proc.ensure_stopped()
