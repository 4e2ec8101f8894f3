"""Stand-in upstreams in their own process, for the bridge to deliver into.

    python -m bench.standin --workspace WS --api-key KEY --write-key KEY [--cpu 1]

Serves the project's MoEngage and Segment stand-ins (bridge.testing) which validate
every request like the real APIs and answer at once. Adds ``GET /_bench/counts`` so the
orchestrator can see how many items have arrived. Nothing is kept, neither requests nor
accepted items: only their counts. Holding 300k accepted items made every cyclic garbage
collection walk them, which tripled the stand-in's CPU per item and slowed its answers
enough to hold the bridge's delivery back (see docs/benchmarks.md, session 10).
Prints ``READY <moengage port> <segment port>`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from aiohttp import web

from bench.httpload import run
from bench.loadgen import pin
from bridge.testing.standins import MoEngageStandIn, SegmentStandIn


class Tally(list[Any]):
    """A list that counts what is appended to it and keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.appended = 0

    def append(self, _item: Any) -> None:
        self.appended += 1

    def __len__(self) -> int:
        return self.appended


class Counting:
    """What both bench stand-ins share: no request records, no notes, errors counted."""

    errors = 0

    def record(self, request: web.Request, body: Any, size: int) -> None:
        pass

    def note(self, request: web.Request, **fields: Any) -> None:
        pass

    def _seen(self, request: web.Request, status: int) -> None:
        if status != 200:
            self.errors += 1
        self._notify()  # type: ignore[attr-defined]


class CountingMoEngage(Counting, MoEngageStandIn):
    def __init__(self, workspace_id: str, api_key: str, data_center: str = "01") -> None:
        super().__init__(workspace_id, api_key, data_center)
        # Validation runs as always; the accepted items are counted, not kept.
        self._customers, self._events, self._devices, self._merges = Tally(), Tally(), Tally(), Tally()
        self.ignored = Tally()

    def counts(self) -> dict[str, int]:
        return {
            "requests": self.received,
            "customers": len(self._customers),
            "events": len(self._events),
            "devices": len(self._devices),
            "merges": len(self._merges),
            "ignored": len(self.ignored),
            "errors": self.errors,
        }


class CountingSegment(Counting, SegmentStandIn):
    def __init__(self, keys: dict[str, str], region: str = "us") -> None:
        super().__init__(keys, region)
        self.accepted, self.dropped = Tally(), Tally()

    def counts(self) -> dict[str, int]:
        return {"requests": self.received, "events": len(self.accepted), "errors": self.errors}


async def serve(args: argparse.Namespace) -> None:
    moengage = CountingMoEngage(args.workspace, args.api_key, args.data_center)
    segment = CountingSegment({args.write_key: "us"}, "us")
    runners = []
    ports = []
    for standin in (moengage, segment):
        app = standin.app()

        async def counts(_request: web.Request, standin: Any = standin) -> web.Response:
            return web.json_response(standin.counts())

        app.router.add_get("/_bench/counts", counts)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, 0)
        await site.start()
        runners.append(runner)
        ports.append(next(a[1] for a in runner.addresses if isinstance(a, tuple)))
    sys.stdout.write(f"READY {ports[0]} {ports[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__)
    p.add_argument("--workspace", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--data-center", default="01")
    p.add_argument("--write-key", required=True, help="the key the Segment stand-in accepts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--cpu", type=int, default=1, help="core to pin to (-1: do not pin)")
    args = p.parse_args(argv)
    pin(None if args.cpu < 0 else args.cpu)
    run(lambda: serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
