"""The PostgreSQL store behind what deployments put in front of PostgreSQL: a pooler
(PgBouncer) that drops the connection's settings or its prepared statements, a network
that passes a connection's end on late."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bridge.store import open_store
from bridge.store.base import StoreError
from tests.e2e.pgproxy import PgProxy
from tests.store.conftest import PG_DSN, end_connections, pg_problem
from tests.store.helpers import event

pytestmark = pytest.mark.skipif(pg_problem() is not None, reason=str(pg_problem()))


@pytest.fixture
async def decoy() -> AsyncIterator[str]:
    """A schema standing for the server's default one (``public``, or a role's default)."""
    name = "t_decoy_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'CREATE SCHEMA "{name}"')
    yield name
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


async def test_a_pooler_that_drops_the_schema_setting_fails_the_open_instead_of_using_another_schema(
    pg_schema: str, decoy: str
) -> None:
    """PgBouncer refuses the search_path the store sets when it connects, and its usual
    cure (ignore_startup_parameters) leaves the server's default: the store was made and
    used in ``public`` (here the decoy), whatever ``?schema=`` said, where two deployments
    with their own schemas would share one queue. The open must fail, saying what to set."""
    proxy = PgProxy(startup={"search_path": decoy, "idle_in_transaction_session_timeout": None})
    await proxy.start()
    store = open_store(proxy.url(f"?schema={pg_schema}"))
    try:
        with pytest.raises(StoreError, match=rf"schema '{decoy}', not '{pg_schema}'.*ALTER ROLE"):
            await store.open()
    finally:
        await store.close()
        await proxy.close()
    assert proxy.connections  # it went through the proxy
    conn = await asyncpg.connect(PG_DSN)
    try:
        made = await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = ANY($1::text[])",
            [decoy, pg_schema],
        )
    finally:
        await conn.close()
    assert made == []  # nothing was made in either


async def test_statement_cache_size_in_the_url_turns_named_prepared_statements_off(pg_schema: str) -> None:
    """Behind PgBouncer in transaction mode asyncpg's named prepared statements are lost
    between transactions ("prepared statement ... does not exist"): asyncpg's cure is
    ``statement_cache_size=0``. In the store URL it went to the server as a setting, which
    refused to connect; it must reach asyncpg, and no statement is then named."""
    cached, uncached = PgProxy(), PgProxy()
    await cached.start()
    await uncached.start()
    try:
        for proxy, query in ((cached, ""), (uncached, "&statement_cache_size=0")):
            store = open_store(proxy.url(f"?schema={pg_schema}{query}"))
            try:
                await store.open()
                await store.enqueue("web", [event(f"m{proxy.port}-{i}", f"u{i % 3}") for i in range(6)])
                jobs = await store.lease("moe", 10, 30)
                await store.ack([j.id for j in jobs])
                assert len(jobs) == 6
            finally:
                await store.close()
    finally:
        await cached.close()
        await uncached.close()
    assert any(cached.parsed)  # by default asyncpg names (and caches) its statements
    assert uncached.parsed and not any(uncached.parsed), set(uncached.parsed)


def test_a_bad_statement_cache_size_is_a_config_error() -> None:
    from bridge.store import check_store_url

    for bad in ("-1", "none", ""):
        with pytest.raises(ValueError, match="statement_cache_size"):
            check_store_url(f"postgresql://u@h/db?statement_cache_size={bad}")
    store = open_store("postgresql://u@h/db?sslmode=disable&statement_cache_size=0&schema=s")
    assert store.dsn == "postgresql://u@h/db?sslmode=disable"  # type: ignore[attr-defined]


async def test_a_connection_the_server_ended_is_a_store_error_until_its_close_arrives(
    pg_schema: str, pg_role: str
) -> None:
    """A restart or failover ends every connection: the server sends a FATAL error, then
    closes. Between the two (here held apart by the proxy; on a busy host, for as long as
    the close takes to arrive) the driver holds a connection it cannot use, and the next
    statement on it failed with the driver's InternalClientError ("cannot switch to state
    ..."), which went past ingest's 429 store_unavailable, and the admin API's 503, as a
    500. Each must be a StoreError; once the close arrives, the store works again."""
    proxy = PgProxy(close_delay=1.0)
    await proxy.start()
    store = open_store(proxy.url(f"?schema={pg_schema}").replace("postgres@", f"{pg_role}@"), command_timeout=2)
    try:
        await store.open()
        for attempt, call in enumerate(
            [lambda: store.enqueue("web", [event("cut")]), store.queue_stats, store.check_writable]
        ):
            await asyncio.sleep(1.1)  # the last round's close has arrived
            await store.enqueue("web", [event(f"warm-{attempt}")])  # on a live connection
            await end_connections(pg_role)
            await asyncio.sleep(0.05)  # their FATAL errors have come through, their closes not yet
            with pytest.raises(StoreError, match=r"^postgres: "):
                await call()
        await asyncio.sleep(1.1)
        assert (await store.enqueue("web", [event("after")])).stored == 1
    finally:
        await store.close()
        await proxy.close()
