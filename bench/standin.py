"""Stand-in upstreams in their own process, for the bridge to deliver into.

    python -m bench.standin --workspace WS --api-key KEY --write-key KEY [--cpu 1]

Serves the project's MoEngage and Segment stand-ins (bridge.testing) which validate
every request like the real APIs and answer at once. Adds ``GET /_bench/counts`` so the
orchestrator can see how many items have arrived. Per-request records (headers, bodies)
are not kept: only the accepted items are, so memory stays proportional to the items.
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


class CountingMoEngage(MoEngageStandIn):
    def record(self, request: web.Request, body: Any, size: int) -> None:
        pass

    def note(self, request: web.Request, **fields: Any) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return {
            "requests": self.received,
            "customers": len(self.customers()),
            "events": len(self.events()),
            "devices": len(self.devices()),
            "merges": len(self.merges()),
            "ignored": len(self.ignored),
            "errors": sum(1 for s in self.seen if s.status != 200),
        }


class CountingSegment(SegmentStandIn):
    def record(self, request: web.Request, body: Any, size: int) -> None:
        pass

    def note(self, request: web.Request, **fields: Any) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return {
            "requests": self.received,
            "events": len(self.events()),
            "errors": sum(1 for s in self.seen if s.status != 200),
        }


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
