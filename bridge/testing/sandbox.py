"""Run the stand-in upstreams inside the current event loop, for `make run` sandbox mode."""

from __future__ import annotations

from aiohttp import web

from bridge.testing.moengage_standin import MoEngageStandIn
from bridge.testing.segment_standin import SegmentStandIn
from bridge.testing.upstream import StandIn


async def _serve(standin: StandIn, host: str, port: int) -> web.AppRunner:
    # Sandbox upstreams must not hold up shutdown with hanging test plans.
    runner = web.AppRunner(standin.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_sandbox_upstreams(
    host: str,
    moengage_port: int,
    segment_port: int,
    moengage: MoEngageStandIn,
    segment: SegmentStandIn,
) -> list[web.AppRunner]:
    """Serve both stand-ins on ``host`` (port 0 picks a free port; see
    ``runner.addresses``), logging a compact summary of every request they receive.
    Call ``cleanup()`` on each returned runner to stop them."""
    moengage.log_requests = True
    segment.log_requests = True
    first = await _serve(moengage, host, moengage_port)
    try:
        second = await _serve(segment, host, segment_port)
    except BaseException:
        await first.cleanup()
        raise
    return [first, second]
