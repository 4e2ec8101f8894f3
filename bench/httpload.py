"""Raw HTTP/1.1 keep-alive load over loopback: closed loop and open (fixed-rate) loop.

Requests are hand-written bytes; responses are parsed only as far as the status line,
Content-Length (or chunked end) and the body length, so the generator costs little per
request and the server under test is what saturates.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from bench.payloads import Workload

_HEADER_END = b"\r\n\r\n"


class ProtocolFailure(Exception):
    """The server answered something that is not an HTTP/1.1 response we can frame."""


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0
        self._need = -1  # total bytes of the current response once the head is parsed
        self._chunked = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc or 'closed by server'}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[int]:
        """Write ``request``; the future resolves to the response status."""
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._buf:
            if self._need < 0 and not self._parse_head():
                return
            if self._chunked:
                end = self._buf.find(b"0\r\n\r\n", self._body_start)
                if end < 0:
                    return
                self._need = end + 5
            if len(self._buf) < self._need:
                return
            del self._buf[: self._need]
            self._need = -1
            self._chunked = False
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._status)

    def _parse_head(self) -> bool:
        end = self._buf.find(_HEADER_END)
        if end < 0:
            return False
        head = bytes(self._buf[:end])
        if not head.startswith(b"HTTP/1."):
            self._fail(f"not an HTTP response: {head[:40]!r}")
            return False
        self._status = int(head[9:12])
        self._body_start = end + 4
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value.strip())
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        if length is None and not self._chunked:
            self._fail("response has neither Content-Length nor chunked encoding")
            return False
        self._need = self._body_start + (length or 0)
        return True

    def _fail(self, message: str) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProtocolFailure(message))
        if self.transport is not None:
            self.transport.close()


@dataclass
class Tally:
    """What a run produced."""

    requests: int = 0  # answered 2xx inside the measured window
    answered_in_window: int = 0  # open loop: 2xx answers that arrived inside the window
    answered_events_in_window: int = 0
    events: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    seconds: float = 0.0
    sent: int = 0
    all_events: int = 0  # answered 2xx over the whole run, warm-up included (for CPU per event)
    wall_seconds: float = 0.0  # the whole run, warm-up and drain included

    def as_json(self, mode: str, loop_kind: str, connections: int, offered: float | None) -> dict[str, Any]:
        lat = sorted(self.latencies)
        # Closed loop: answers inside the window. Open loop: the requests due in the window
        # are all waited for, so their count is the offered rate whatever the server did;
        # the rate it sustained is the answers that arrived inside the window.
        open_loop = loop_kind == "open"
        answered = self.answered_in_window if open_loop else self.requests
        answered_events = self.answered_events_in_window if open_loop else self.events
        return {
            "mode": mode,
            "loop": loop_kind,
            "connections": connections,
            "offered_rps": offered,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "events": self.events,
            "sent": self.sent,
            "all_events": self.all_events,
            "wall_seconds": round(self.wall_seconds, 3),
            "req_per_s": round(answered / self.seconds, 1) if self.seconds else 0.0,
            "events_per_s": round(answered_events / self.seconds, 1) if self.seconds else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "latency_ms": latency_summary(lat),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def latency_summary(sorted_seconds: list[float]) -> dict[str, float | int]:
    if not sorted_seconds:
        return {"count": 0}
    ms = 1000.0
    return {
        "count": len(sorted_seconds),
        "p50": round(percentile(sorted_seconds, 50) * ms, 3),
        "p90": round(percentile(sorted_seconds, 90) * ms, 3),
        "p99": round(percentile(sorted_seconds, 99) * ms, 3),
        "p999": round(percentile(sorted_seconds, 99.9) * ms, 3),
        "max": round(sorted_seconds[-1] * ms, 3),
    }


class LoadGenerator:
    def __init__(self, host: str, port: int, workload: Workload, connections: int) -> None:
        self.host = host
        self.port = port
        self.workload = workload
        self.connections = connections
        self._head = (
            f"Host: {host}:{port}\r\nContent-Type: application/json\r\nUser-Agent: bridge-bench\r\n".encode()
            + workload.headers
        )
        self._conns: list[Connection] = []

    def request_bytes(self) -> bytes:
        path, body = self.workload.next_request()
        return b"".join(
            (
                b"POST ",
                path,
                b" HTTP/1.1\r\n",
                self._head,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _transport, conn = await loop.create_connection(Connection, self.host, self.port)
            self._conns.append(conn)

    async def close(self) -> None:
        for conn in self._conns:
            if conn.transport is not None:
                conn.transport.close()
        for conn in self._conns:
            await asyncio.wait_for(conn.closed, 5)
        self._conns.clear()

    def _record(self, tally: Tally, status: int, latency: float, counting: bool) -> None:
        if 200 <= status < 300:
            tally.all_events += self.workload.events_per_request
        if not counting:
            return
        tally.statuses[status] += 1
        if 200 <= status < 300:
            tally.requests += 1
            tally.events += self.workload.events_per_request
            tally.latencies.append(latency)

    async def closed_loop(self, duration: float, warmup: float = 0.5, max_requests: int | None = None) -> Tally:
        """Every connection sends its next request as soon as the last is answered.

        With ``max_requests`` the run ends once that many requests were sent (preload),
        and everything answered counts; otherwise only the window after ``warmup``.
        """
        tally = Tally()
        clock = time.perf_counter
        start = clock()
        measure_from = start if max_requests is not None else start + warmup
        stop_at = float("inf") if max_requests is not None else measure_from + duration
        budget = [max_requests if max_requests is not None else -1]

        async def drive(conn: Connection) -> None:
            while True:
                now = clock()
                if now >= stop_at:
                    return
                if budget[0] == 0:
                    return
                if budget[0] > 0:
                    budget[0] -= 1
                request = self.request_bytes()
                sent_at = clock()
                tally.sent += 1
                try:
                    status = await conn.send(request)
                except (ConnectionError, ProtocolFailure) as exc:
                    tally.errors[type(exc).__name__] += 1
                    return
                done = clock()
                # Answers that arrive inside the window count, whenever they were sent: counting
                # only requests sent *and* answered inside it loses the ones in flight at its
                # start, and reads the rate low by latency / duration (more for a slower server).
                self._record(tally, status, done - sent_at, measure_from <= done <= stop_at)

        await asyncio.gather(*(drive(c) for c in self._conns))
        end = clock() if max_requests is not None else min(clock(), stop_at)
        tally.seconds = end - measure_from
        tally.wall_seconds = clock() - start
        return tally

    async def open_loop(self, rate: float, duration: float, warmup: float = 0.5) -> Tally:
        """Requests are due at fixed intervals whether or not earlier ones were answered.

        Latency runs from the *scheduled* send time, so a stalled server is charged for
        the queueing it causes (no coordinated omission). A request due while every
        connection is busy waits for the next free one, and that wait is counted.
        """
        tally = Tally()
        loop = asyncio.get_running_loop()
        clock = time.perf_counter
        idle: deque[Connection] = deque(self._conns)
        backlog: deque[float] = deque()
        interval = 1.0 / rate
        start = clock()
        measure_from = start + warmup
        stop_at = measure_from + duration
        outstanding = [0]
        finished = loop.create_future()

        def launch(conn: Connection, due: float) -> None:
            tally.sent += 1
            outstanding[0] += 1
            fut = conn.send(self.request_bytes())
            fut.add_done_callback(lambda f: answered(conn, due, f))

        def answered(conn: Connection, due: float, fut: asyncio.Future[int]) -> None:
            outstanding[0] -= 1
            now = clock()
            exc = fut.exception()
            if exc is not None:
                tally.errors[type(exc).__name__] += 1
                if outstanding[0] == 0 and clock() >= stop_at and not finished.done():
                    finished.set_result(None)
                return
            status = fut.result()
            self._record(tally, status, now - due, measure_from <= due < stop_at)
            if 200 <= status < 300 and measure_from <= now < stop_at:
                tally.answered_in_window += 1
                tally.answered_events_in_window += self.workload.events_per_request
            if backlog:
                launch(conn, backlog.popleft())
            elif conn.transport is not None and not conn.transport.is_closing():
                idle.append(conn)
            if outstanding[0] == 0 and not backlog and clock() >= stop_at and not finished.done():
                finished.set_result(None)

        index = 0
        while True:
            now = clock()
            if now >= stop_at:
                break
            # Issue everything already due; spin rather than oversleep the next slot.
            while start + index * interval <= now:
                due = start + index * interval
                index += 1
                while idle and (idle[0].transport is None or idle[0].transport.is_closing()):
                    idle.popleft()  # closed by the server while idle: a write would go nowhere
                if idle:
                    launch(idle.popleft(), due)
                else:
                    backlog.append(due)
            wait = start + index * interval - clock()
            await asyncio.sleep(wait - 0.001 if wait > 0.002 else 0)
        # Requests still in the backlog were due inside the window: they are sent and
        # charged their full wait, or the latencies would flatter an overloaded server.
        if outstanding[0]:
            try:
                await asyncio.wait_for(finished, 30)
            except TimeoutError:
                tally.errors["unanswered_at_end"] += outstanding[0]
        if backlog:
            # Due, but every connection was lost before one was free to send them.
            tally.errors["never_sent"] += len(backlog)
            backlog.clear()
        tally.seconds = duration
        tally.wall_seconds = clock() - start
        return tally


def run(coro_factory: Callable[[], Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro_factory())
    except ImportError:
        return asyncio.run(coro_factory())
