"""A SIGTERM stops `bridge serve` whenever it comes, start-up included, within
server.shutdown_timeout (real processes, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import aiohttp
import asyncpg

from bridge.store.postgres_schema import DDL_LOCK
from tests.e2e.harness import DSN, WRITE_KEY, basic, config_dict
from tests.e2e.proc import BridgeProcess, free_port
from tests.e2e.test_crash_safety import moengage_standin, proc_config


def log_events(proc: BridgeProcess) -> list[str]:
    return [
        json.loads(line)["event"]
        for line in proc.log_path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of process ``pid``'s sockets (its database connections' client
    ports), read from /proc: its socket inodes, looked up in the kernel's TCP tables."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def waiting_on_the_schema_lock(conn: asyncpg.Connection, proc: BridgeProcess) -> bool:
    """Whether ``proc`` has a connection waiting for the schema (DDL) advisory lock. Its own:
    another bridge's (a store of an earlier test still opening) would let the test signal a
    process that has not started yet, which Python's default action then kills."""
    if proc.proc is None or proc.proc.returncode is not None:
        return False
    waiting = await conn.fetch(
        "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = 'bridge'"
    )
    return bool({row[0] for row in waiting} & local_ports(proc.proc.pid))


async def test_a_sigterm_while_the_store_opens_stops_the_process(tmp_path: Path, pg_schema: str) -> None:
    """The store may wait minutes at start for another node's schema lock. A SIGTERM then
    killed the process outright (no drain, exit -15) or, as PID 1 in the image, was dropped by
    the kernel, and the bridge went on to serve once the lock came: it must stop, cleanly."""
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["store"]["url"] = f"{DSN}?schema={pg_schema}"
    raw["server"]["shutdown_timeout"] = 2
    proc = BridgeProcess(raw, tmp_path)
    holder = await asyncpg.connect(DSN)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", DDL_LOCK)  # as a node migrating the schema
        await proc.spawn()
        for _ in range(400):
            if await waiting_on_the_schema_lock(holder, proc) or proc.proc is None or proc.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert await waiting_on_the_schema_lock(holder, proc), proc.log_tail()
        proc.terminate()
        code = await proc.wait(timeout=30)  # the lock is still held: start-up is abandoned
        assert code == 0, f"exit {code}:\n{proc.log_tail()}"
        events = log_events(proc)
        assert "listening" not in events
        assert events[-2:] == ["shutting_down", "stopped"], proc.log_tail()
    finally:
        await holder.close()
        await proc.ensure_stopped()


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can stop passing bytes while keeping every connection
    open: a database behind a partition or a hung load balancer, which never answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.frozen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Every connection too, the database's side above all: a backend frozen mid-message
        # (a lease's SELECT, its locks held) is "active", which no idle timeout ends, and the
        # schema's DROP afterwards waited on its locks for ever.
        for writer in self._writers:
            writer.transport.abort()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.append(client_w)
        if self.frozen.is_set():
            await asyncio.Event().wait()  # accepted, never answered
        db_r, db_w = await asyncio.open_connection("127.0.0.1", 5432)
        self._writers.append(db_w)
        await asyncio.gather(self._pipe(client_r, db_w), self._pipe(db_r, client_w), return_exceptions=True)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if self.frozen.is_set():
                await asyncio.Event().wait()
            dst.write(data)
            await dst.drain()
        dst.close()  # one side closed: so does the other


async def test_a_sigterm_while_postgres_does_not_answer_still_ends_the_process(tmp_path: Path, pg_schema: str) -> None:
    """Cancelled queries, leases given back and the pool's close wait for a database that
    never answers: the stop hung past server.shutdown_timeout for good, and only a SIGKILL
    ended it. It must exit (status 1, saying why)."""
    moengage, server = await moengage_standin()
    proxy = FreezingProxy()
    await proxy.start()
    raw = proc_config(tmp_path, str(server.make_url("")).rstrip("/"))
    raw["store"]["url"] = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}"
    raw["server"]["shutdown_timeout"] = 2
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        batch = [{"type": "track", "userId": "u", "event": "E", "properties": {"seq": f"s{i}"}} for i in range(30)]
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{proc.url}/v1/batch", json={"batch": batch}, headers=basic(WRITE_KEY)) as r,
        ):
            assert r.status == 200
        proxy.frozen.set()
        await asyncio.sleep(0.5)  # the gauges, the state watcher and delivery now wait on it
        proc.terminate()
        code = await proc.wait(timeout=60)  # it hung for good (TimeoutError here)
        assert code == 1, proc.log_tail()
        assert log_events(proc)[-1] == "shutdown_timed_out", proc.log_tail()
    finally:
        await proc.ensure_stopped()
        await proxy.close()
        moengage.stop()
        await server.close()
