"""Fixtures: every contract test runs against SQLite (tmp_path) and PostgreSQL (fresh schema)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.store.base import Store

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - asyncpg is a dependency
        return f"asyncpg is not importable: {exc}"

    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"PostgreSQL at {PG_DSN} is unreachable: {exc}"
    return None


_PG_PROBLEM: list[str | None] = []


def pg_problem() -> str | None:
    if not _PG_PROBLEM:
        _PG_PROBLEM.append(postgres_unreachable())
    return _PG_PROBLEM[0]


class StoreFactory:
    """Makes stores of one kind over the same durable location, so tests can reopen it."""

    def __init__(self, kind: str, location: str) -> None:
        self.kind = kind
        self.location = location  # a file path (sqlite) or a schema name (postgres)
        self.opened: list[Store] = []

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return "sqlite:///" + self.location
        return PG_DSN

    def options(self, **opts: Any) -> dict[str, Any]:
        if self.kind == "sqlite":
            opts.setdefault("min_free_disk_bytes", 0)
            opts.setdefault("size_check_interval", 0.0)
        else:
            opts.setdefault("schema", self.location)
            opts.setdefault("size_check_interval", 0.0)
        return opts

    async def new(self, **opts: Any) -> Store:
        from bridge.store import open_store

        store = open_store(self.url, **self.options(**opts))
        await store.open()
        self.opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        problem = pg_problem()
        if problem:
            pytest.skip(problem)
    return str(request.param)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    name = "t_" + uuid.uuid4().hex[:12]
    yield name

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    if pg_problem() is None:
        asyncio.run(drop())


@pytest.fixture
async def pg_role(pg_schema: str) -> AsyncIterator[str]:
    """A login role of the test's own (trust auth) that may create ``pg_schema``: its
    settings can change, and its connections be ended, without touching anyone else's."""
    import asyncpg

    name = "r_" + pg_schema
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN")
        await conn.execute(f"GRANT CREATE ON DATABASE test TO {name}")
        yield name
        await end_connections(name)  # a store a failed test left open
        await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}" CASCADE')
        await conn.execute(f"DROP OWNED BY {name}")  # and its privileges
        await conn.execute(f"DROP ROLE {name}")
    finally:
        await conn.close()


async def end_connections(role: str) -> None:
    """End every connection of ``role`` from the server's side, as a restart or a failover does."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        # Until they are gone: each has sent its FATAL error by then.
        for _ in range(500):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the connections of {role} did not end")
    finally:
        await conn.close()


@pytest.fixture
async def factory(kind: str, tmp_path: Path, pg_schema: str) -> AsyncIterator[StoreFactory]:
    location = str(tmp_path / "bridge.db") if kind == "sqlite" else pg_schema
    made = StoreFactory(kind, location)
    yield made
    await made.close_all()


@pytest.fixture
async def store(factory: StoreFactory) -> Store:
    return await factory.new()
