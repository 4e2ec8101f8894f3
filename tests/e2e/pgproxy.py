"""A TCP proxy in front of the test PostgreSQL, as deployments have one (PgBouncer, a cloud
SQL proxy, HAProxy, a service mesh's sidecar)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Coroutine
from typing import Any

from tests.e2e.proc import free_port

PG_HOST, PG_PORT = "127.0.0.1", 5432
# The requests a client may send before its startup message, to which the server answers
# one byte: this proxy answers 'N' itself (no TLS through it), and the client goes on in clear.
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class PgProxy:
    """Passes bytes both ways, each direction pumped on its own (a reply never waits for the
    other side's next request), in order, and an end of input passed on as a half close
    (``write_eof``) rather than a close of both directions. Each chunk is held ``delay``
    seconds first: a network hop, without reordering.

    ``startup`` rewrites the client's startup parameters: a value replaces one's, None
    drops it, as PgBouncer's ``ignore_startup_parameters`` does. ``parsed`` collects the
    names of the statements the clients prepare ('' for unnamed ones): named ones are what
    PgBouncer's transaction mode loses between transactions.

    ``close_delay``: the server's end of a connection reaches the client that much after
    what the server sent before it (a terminated backend's FATAL error), as a busy network
    or proxy may pass them on: the client holds a connection the server has ended."""

    def __init__(
        self, delay: float = 0.0, startup: dict[str, str | None] | None = None, close_delay: float = 0.0
    ) -> None:
        self.port = free_port()
        self.delay = delay
        self.close_delay = close_delay
        self.startup = startup or {}
        self.parsed: list[str] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, query: str = "") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test{query}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        db_w: asyncio.StreamWriter | None = None
        try:
            startup = await self._startup(client_r, client_w)
            db_r, db_w = await asyncio.open_connection(PG_HOST, PG_PORT)
            self._writers.add(db_w)
            db_w.write(startup)
            await _together(self._pump(client_r, db_w, watch=True), self._pump(db_r, client_w, watch=False))
        except (OSError, asyncio.IncompleteReadError):
            pass  # one side went away: both are closed below
        finally:
            for writer in (client_w, db_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()

    async def _startup(self, reader: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> bytes:
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            body = await reader.readexactly(length - 8)
            if code not in (SSL_REQUEST, GSSENC_REQUEST):
                return self._rewrite(head[4:] + body)
            client_w.write(b"N")
            await client_w.drain()

    def _rewrite(self, message: bytes) -> bytes:
        """A startup message (without its length) with ``startup`` applied."""
        fields = message[4:].split(b"\0")
        params: dict[str, str] = {}
        for i in range(0, len(fields) - 1, 2):
            if not fields[i]:
                break  # the list's terminator
            params[fields[i].decode()] = fields[i + 1].decode()
        for name, value in self.startup.items():
            if value is None:
                params.pop(name, None)
            else:
                params[name] = value
        body = message[:4] + b"".join(f"{k}\0{v}\0".encode() for k, v in params.items()) + b"\0"
        return struct.pack("!i", len(body) + 4) + body

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, watch: bool) -> None:
        """Copy ``src`` to ``dst``, each chunk ``delay`` late; ``src``'s end is ``dst``'s EOF."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        frames = bytearray()

        async def read() -> None:
            while data := await src.read(65536):
                if watch:
                    frames.extend(data)
                    self._watch(frames)
                queue.put_nowait((time.monotonic() + self.delay, data))
            queue.put_nowait((time.monotonic() + self.delay + (0.0 if watch else self.close_delay), b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        if dst.can_write_eof():
                            dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        await _together(read(), write())

    def _watch(self, frames: bytearray) -> None:
        """Note the statement name of each whole Parse message in ``frames`` (consumed)."""
        while len(frames) >= 5:
            kind = frames[0]
            (length,) = struct.unpack("!i", frames[1:5])
            if len(frames) < 1 + length:
                return
            if kind == ord("P"):
                self.parsed.append(bytes(frames[5 : frames.index(0, 5)]).decode())
            del frames[: 1 + length]


async def _together(*coros: Coroutine[Any, Any, None]) -> None:
    """Run all to their end; if one fails, the others are cancelled (none is left behind)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
