"""Stand-in upstreams (MoEngage Data API, Segment Tracking API) for tests and the sandbox.

moengage = MoEngageStandIn("WS1", "secret")
server = await aiohttp_server(moengage.app())
...
await moengage.wait_for(lambda: len(moengage.events()) == 3)
"""

from bridge.testing.moengage_standin import BLOCKED_CUSTOMER_IDS, Ignored, MoEngageStandIn
from bridge.testing.sandbox import serve_standins, start_sandbox_upstreams
from bridge.testing.segment_standin import Dropped, SegmentEvent, SegmentStandIn
from bridge.testing.upstream import Planned, Recorded, Seen, StandIn

__all__ = [
    "BLOCKED_CUSTOMER_IDS",
    "Dropped",
    "Ignored",
    "MoEngageStandIn",
    "Planned",
    "Recorded",
    "Seen",
    "SegmentEvent",
    "SegmentStandIn",
    "StandIn",
    "serve_standins",
    "start_sandbox_upstreams",
]
