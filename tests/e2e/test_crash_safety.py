"""kill -9 under load and SIGTERM drain: every acknowledged event is delivered."""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from bridge.store.sqlite_dedupe import dedupe_key
from bridge.testing.standins import MoEngageStandIn
from tests.e2e.harness import API_KEY, WORKSPACE, WRITE_KEY, basic, config_dict
from tests.e2e.proc import BridgeProcess
from tests.store.helpers import stored_dedupe_keys


class Load:
    """Concurrent senders of 20-event batches; remembers which events were acknowledged."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.acked: set[str] = set()
        self.sent = 0
        self._seq = itertools.count()

    async def sender(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ids = [f"{self.prefix}-{next(self._seq)}" for _ in range(20)]
            batch = [
                {
                    "type": "track",
                    "userId": f"user-{i % 7}",
                    "event": "Crash Test",
                    "messageId": m,
                    "properties": {"seq": m},
                }
                for i, m in enumerate(ids)
            ]
            try:
                async with session.post(
                    f"{self.url}/v1/batch", json={"batch": batch}, headers=basic(WRITE_KEY)
                ) as resp:
                    if resp.status == 200:
                        self.acked.update(ids)
                    self.sent += 1
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)

    async def run_until_killed(self, proc: BridgeProcess, after: float) -> None:
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            senders = [asyncio.create_task(self.sender(session, stop)) for _ in range(6)]
            await asyncio.sleep(after)
            proc.kill()
            await proc.wait()
            stop.set()
            await asyncio.gather(*senders)


async def moengage_standin() -> tuple[MoEngageStandIn, TestServer]:
    moengage = MoEngageStandIn(WORKSPACE, API_KEY)
    server = TestServer(moengage.app(), host="127.0.0.1")
    await server.start_server()
    return moengage, server


def proc_config(tmp_path: Path, moengage_url: str) -> dict[str, Any]:
    raw = config_dict(tmp_path, moengage_url, "http://127.0.0.1:9")
    raw["sources"] = raw["sources"][:1]
    raw["destinations"] = raw["destinations"][:1]
    raw["destinations"][0]["delivery"] = {
        "poll_interval": 0.05,
        "batch_size": 200,
        "lease_seconds": 2,
        "request_timeout": 0.9,
    }
    return raw


def describe_jobs(db: Path, source: str, message_ids: list[str]) -> str:
    """Where the store has the given events, to tell a loss from a slow queue."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT message_id, state, attempts, available_at, lease_until, last_error FROM jobs "
            f"WHERE message_id IN ({','.join('?' * len(message_ids))})",
            message_ids,
        ).fetchall()
        keys = [dedupe_key(source, m) for m in message_ids]
        marks = ",".join("?" * len(keys))
        waiting = conn.execute(f"SELECT count(*) FROM dedupe_recent WHERE k IN ({marks})", keys).fetchone()[0]
        merged = len(set(stored_dedupe_keys(conn)).intersection(keys))
    return f"jobs={rows} dedupe_rows={waiting} waiting + {merged} merged now={time.time()}"


async def wait_delivered(moengage: MoEngageStandIn, acked: set[str], timeout: float) -> None:
    # Polled, not checked per request: rebuilding the set per request is quadratic.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not delivered_seqs(moengage) >= acked:
        await asyncio.sleep(0.5)


def delivered_seqs(moengage: MoEngageStandIn) -> set[str]:
    return {e["actions"][0]["attributes"]["seq"] for e in moengage.events()}


async def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path: Path):
    moengage, server = await moengage_standin()
    rng = random.Random(1234)
    # Slow answers keep deliveries in flight, so kills land mid-send as well as mid-ingest.
    moengage.latency = 0.02
    proc = BridgeProcess(proc_config(tmp_path, str(server.make_url("")).rstrip("/")), tmp_path)
    load = Load(proc.url, "k9")
    try:
        for _ in range(3):
            await proc.start()
            await load.run_until_killed(proc, after=rng.uniform(0.8, 1.6))
        assert len(load.acked) > 200, "the load generator got too few acknowledgements to prove anything"
        await proc.start()
        await wait_delivered(moengage, load.acked, timeout=120)
        missing = load.acked - delivered_seqs(moengage)
        assert not missing, f"{len(missing)} of {len(load.acked)} acknowledged events were not delivered: " + (
            describe_jobs(tmp_path / "bridge.db", proc_config(tmp_path, "")["sources"][0]["name"], sorted(missing)[:5])
        )
    finally:
        await proc.ensure_stopped()
        moengage.stop()
        await server.close()


async def test_sigterm_drains_in_flight_work_and_exits(tmp_path: Path):
    moengage, server = await moengage_standin()
    moengage.latency = 0.02
    proc = BridgeProcess(proc_config(tmp_path, str(server.make_url("")).rstrip("/")), tmp_path)
    load = Load(proc.url, "term")
    try:
        await proc.start()
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            senders = [asyncio.create_task(load.sender(session, stop)) for _ in range(6)]
            await asyncio.sleep(1.0)
            proc.terminate()
            code = await proc.wait(timeout=30)
            stop.set()
            await asyncio.gather(*senders)
        assert code == 0, proc.log_tail()
        assert '"event":"stopped"' in proc.log_path.read_text()
        assert load.acked
        await proc.start()
        await wait_delivered(moengage, load.acked, timeout=120)
        assert delivered_seqs(moengage) >= load.acked
    finally:
        await proc.ensure_stopped()
        moengage.stop()
        await server.close()


async def test_sigterm_releases_leases_of_a_hung_send(tmp_path: Path):
    """A send still hanging at the shutdown deadline is cancelled and its jobs released, not
    left leased: with a 600 s lease, only released jobs can be delivered right after a restart."""
    moengage, server = await moengage_standin()
    raw = proc_config(tmp_path, str(server.make_url("")).rstrip("/"))
    raw["destinations"][0]["delivery"]["lease_seconds"] = 600
    raw["server"]["shutdown_timeout"] = 1
    raw["server"]["log_level"] = "debug"
    proc = BridgeProcess(raw, tmp_path)
    try:
        await proc.start()
        moengage.hold()
        async with aiohttp.ClientSession() as session:
            batch = [
                {"type": "track", "userId": "user-a", "event": "E", "properties": {"seq": f"s{i}"}} for i in range(30)
            ]
            async with session.post(f"{proc.url}/v1/batch", json={"batch": batch}, headers=basic(WRITE_KEY)) as r:
                assert r.status == 200
        await moengage.wait_for(lambda: moengage.received > 0)
        proc.terminate()
        assert await proc.wait(timeout=30) == 0, proc.log_tail()
        moengage.release()
        await proc.start()
        await moengage.wait_for(lambda: len(delivered_seqs(moengage)) == 30, timeout=20)
    finally:
        await proc.ensure_stopped()
        moengage.stop()
        await server.close()


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_answers_a_batch_whose_body_is_still_arriving(tmp_path: Path):
    """aiohttp drops what arrives once it shuts down, the rest of a body being read too:
    the batch was never answered, and held the stop up for all of server.shutdown_timeout."""
    raw = proc_config(tmp_path, "http://127.0.0.1:9")
    raw["server"]["shutdown_timeout"] = 30
    proc = BridgeProcess(raw, tmp_path)
    batch = [{"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"big-{i}"} for i in range(500)]
    body = orjson.dumps({"batch": batch})
    auth = basic(WRITE_KEY)["Authorization"]
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        await proc.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler has the request and is reading its body
        proc.terminate()
        while not await _refused(proc.port):  # the listener is closed: the stop is under way
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        writer.write(body[len(body) // 2 :])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert await proc.wait(timeout=60) == 0, proc.log_tail()
    finally:
        await proc.ensure_stopped()
    with sqlite3.connect(tmp_path / "bridge.db") as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 500
