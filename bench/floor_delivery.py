"""The delivery floor: the least a durable delivery can do on this machine.

Reads the floor's stored events in id order, 500 at a time, translates each by hand into
one MoEngage Bulk Import element, posts them in requests of at most 100 KB, and after
the upstream has answered 200 for a whole read moves one committed progress mark. That is
a log consumer's design (an offset, as Kafka's consumers keep): no per-event state, no
retries, ordering, dead letters, identity links or mapping language. Two reads are in
flight at once, as the bridge's default delivery concurrency, and a mark only moves past
reads that have all been answered.

The bridge pays for what this leaves out; the ratio of the two says what that costs.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import orjson

READ_SIZE = 500
IN_FLIGHT = 2
MAX_REQUEST_BYTES = 100_000  # MoEngage Bulk Import's cap
_HEAD = b'{"type":"transition","elements":['
_TAIL = b"]}"


def element(event: Any) -> dict[str, Any] | None:
    """One Bulk Import element for a Segment call: identify a customer, anything else an
    event named by the call. None for what has no user."""
    if not isinstance(event, dict):
        return None
    user = event.get("userId")
    if not isinstance(user, str) or not user:
        return None
    if event.get("type") == "identify":
        return {"type": "customer", "customer_id": user, "attributes": event.get("traits") or {}}
    name = event.get("event") or event.get("name") or event.get("type")
    action = {"action": str(name), "attributes": event.get("properties") or {}}
    return {"type": "event", "customer_id": user, "actions": [action]}


def requests_for(bodies: list[bytes]) -> list[bytes]:
    """The Bulk Import request bodies for the encoded elements, each within the cap."""
    out: list[bytes] = []
    current: list[bytes] = []
    used = len(_HEAD) + len(_TAIL)
    for body in bodies:
        if current and used + len(body) + 1 > MAX_REQUEST_BYTES:
            out.append(_HEAD + b",".join(current) + _TAIL)
            current, used = [], len(_HEAD) + len(_TAIL)
        current.append(body)
        used += len(body) + 1
    if current:
        out.append(_HEAD + b",".join(current) + _TAIL)
    return out


class FloorDelivery:
    """Delivers the floor's table ``events`` to a MoEngage-like upstream."""

    def __init__(self, db_path: str, base_url: str, workspace: str, api_key: str) -> None:
        self._db_path = db_path
        self._url = f"{base_url.rstrip('/')}/v1/transition/{workspace}"
        token = base64.b64encode(f"{workspace}:{api_key}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "MOE-APPKEY": workspace,
            "Content-Type": "application/json",
        }
        # One thread owns the connection: reads and marks are SQLite calls off the loop.
        self._sqlite = ThreadPoolExecutor(1, thread_name_prefix="floor-delivery")
        self._conn: sqlite3.Connection | None = None
        self.delivered = 0
        self.error = ""
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="floor-delivery")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self._call(self._close_db)
        self._sqlite.shutdown()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._sqlite, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._db_path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # As the bridge's settles: a lost mark after a power cut resends, it loses nothing.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS delivered (one INTEGER PRIMARY KEY CHECK (one = 1), last_id INTEGER)"
            )
            conn.execute("INSERT OR IGNORE INTO delivered (one, last_id) VALUES (1, 0)")
            self._conn = conn
        return self._conn

    def _close_db(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _mark(self) -> int:
        return int(self._db().execute("SELECT last_id FROM delivered").fetchone()[0])

    def _read(self, after: int) -> list[tuple[int, bytes]]:
        rows = self._db().execute("SELECT id, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, READ_SIZE))
        return rows.fetchall()

    def _move_mark(self, last_id: int) -> None:
        self._db().execute("UPDATE delivered SET last_id = ?", (last_id,))

    async def _send(self, session: aiohttp.ClientSession, rows: list[tuple[int, bytes]]) -> int:
        loads, dumps = orjson.loads, orjson.dumps
        bodies = [dumps(e) for e in (element(loads(body)) for _, body in rows) if e is not None]
        for request in requests_for(bodies):
            async with session.post(self._url, data=request, headers=self._headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"upstream answered {response.status}")
        return len(rows)

    async def _run(self) -> None:
        after = await self._call(self._mark)
        in_flight: deque[tuple[int, asyncio.Task[int]]] = deque()
        async with aiohttp.ClientSession() as session:
            while True:
                rows = await self._call(self._read, after)
                if rows:
                    after = rows[-1][0]
                    in_flight.append((after, asyncio.create_task(self._send(session, rows))))
                if not in_flight:
                    await asyncio.sleep(0.05)  # caught up: look again for new rows
                    continue
                if rows and len(in_flight) < IN_FLIGHT:
                    continue
                last_id, oldest = in_flight.popleft()
                try:
                    self.delivered += await oldest
                except (aiohttp.ClientError, RuntimeError) as exc:
                    # The floor has no retries: it stops, and the orchestrator reports why.
                    self.error = repr(exc)
                    for _, task in in_flight:
                        task.cancel()
                    return
                await self._call(self._move_mark, last_id)
