from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from bridge.testing.standins import MoEngageStandIn, SegmentStandIn
from tests.e2e.harness import API_KEY, SEGMENT_OUT_KEY, WORKSPACE, Bridge, config_dict


@pytest.fixture
async def make_bridge(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Bridge] = []

    async def make(tweak: Callable[[dict[str, Any]], None] | None = None, start: bool = True) -> Bridge:
        moengage = MoEngageStandIn(WORKSPACE, API_KEY)
        segment = SegmentStandIn({SEGMENT_OUT_KEY: "us"}, region="us")
        moe_server = TestServer(moengage.app(), host="127.0.0.1")
        seg_server = TestServer(segment.app(), host="127.0.0.1")
        await moe_server.start_server()
        await seg_server.start_server()
        raw = config_dict(tmp_path, str(moe_server.make_url("")).rstrip("/"), str(seg_server.make_url("")).rstrip("/"))
        if tweak is not None:
            tweak(raw)
        bridge = Bridge(tmp_path, moengage, segment, moe_server, seg_server, raw)
        made.append(bridge)
        if start:
            await bridge.start()
        return bridge

    yield make
    for b in made:
        await b.stop()
        b.moengage.stop()
        b.segment.stop()
        await b.moengage_server.close()
        await b.segment_server.close()


@pytest.fixture
async def bridge(make_bridge: Callable[..., Any]) -> Bridge:
    b: Bridge = await make_bridge()
    return b
