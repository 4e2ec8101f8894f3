"""An upstream that gives up idle keep-alive connections, on loopback.

A TCP proxy in front of a stand-in: each client connection carries one request and its
answer, and the next request on it meets a socket the "upstream" closes at that moment,
as when an upstream or load balancer closes an idle connection just as the client reuses
it. Deterministic, unlike a short server keep-alive timeout: aiohttp notices a close that
arrives while the connection is idle and never reuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

# close: FIN without an answer; reset: RST ("Connection reset by peer"); partial: the
# request reaches the upstream, and the connection closes after the first bytes of its answer.
Drop = Literal["close", "reset", "partial"]
PARTIAL_BYTES = 12  # "HTTP/1.1 200": a status line begun, not finished


class StaleKeepAliveProxy:
    def __init__(self, target_port: int, drop: Drop = "close") -> None:
        self.target_port = target_port
        self.drop = drop
        self.connections = 0  # client connections accepted
        self.dropped = 0  # requests that met a "stale" connection
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Start listening; the proxy's base URL."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        answered = False  # some answer went back on this connection
        cut = False  # the request now being forwarded gets only part of its answer

        async def answers() -> None:
            nonlocal answered
            while data := await up_r.read(65536):
                if cut:
                    client_w.write(data[:PARTIAL_BYTES])
                    await client_w.drain()
                    client_w.close()
                    return
                client_w.write(data)
                await client_w.drain()
                answered = True
            client_w.close()

        relay = asyncio.create_task(answers())
        try:
            while data := await client_r.read(65536):
                if answered and not cut:  # the next request on a kept-alive connection
                    self.dropped += 1
                    if self.drop == "partial":
                        cut = True
                    else:
                        if self.drop == "reset":  # close with RST, not FIN
                            sock = client_w.get_extra_info("socket")
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        client_w.close()
                        return
                up_w.write(data)
                await up_w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await relay
            up_w.close()
            client_w.close()
            self._tasks.discard(task)
