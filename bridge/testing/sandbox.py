"""Run the stand-in upstreams inside the current event loop, for `make run` sandbox mode."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from bridge.http_server import start_site
from bridge.testing.moengage_standin import MoEngageStandIn
from bridge.testing.segment_standin import SegmentStandIn
from bridge.testing.upstream import StandIn


async def _serve(standin: StandIn, host: str, port: int, setting: str) -> web.AppRunner:
    # Sandbox upstreams must not hold up shutdown with hanging test plans.
    runner = web.AppRunner(standin.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        # A port in use names the variable that moves it, so the operator knows which to set.
        await start_site(web.TCPSite(runner, host, port), f"sandbox {standin.name} stand-in ({setting})")
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def serve_standins(host: str, standins: Sequence[tuple[StandIn, int, str]]) -> list[web.AppRunner]:
    """Serve each stand-in on ``host`` at its port (0 picks a free port; see
    ``runner.addresses``), logging a compact summary of every request it receives. The
    third item names the setting the port comes from, for the error when it is in use.
    Call ``cleanup()`` on each returned runner, in order, to stop them."""
    runners: list[web.AppRunner] = []
    try:
        for standin, port, setting in standins:
            standin.log_requests = True
            runners.append(await _serve(standin, host, port, setting))
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners


async def start_sandbox_upstreams(
    host: str,
    moengage_port: int,
    segment_port: int,
    moengage: MoEngageStandIn,
    segment: SegmentStandIn,
) -> list[web.AppRunner]:
    """Serve both stand-ins (see ``serve_standins``): the MoEngage runner first."""
    return await serve_standins(
        host,
        [
            (moengage, moengage_port, "BRIDGE_SANDBOX_MOENGAGE_PORT"),
            (segment, segment_port, "BRIDGE_SANDBOX_SEGMENT_PORT"),
        ],
    )
