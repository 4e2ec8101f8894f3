"""A real bridge on loopback with stand-in upstreams, for end-to-end tests."""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from yarl import URL

from bridge.app import build_app
from bridge.bindings import PrometheusBindings
from bridge.config.model import Config, build_config
from bridge.http_server import BridgeRunner
from bridge.runtime import Runtime
from bridge.store.base import Store
from bridge.store.postgres import PostgresStore
from bridge.testing.standins import MoEngageStandIn, SegmentStandIn

REPO = Path(__file__).resolve().parents[2]
WRITE_KEY = "wk_live_4f9a8b7c6d5e"
EU_WRITE_KEY = "wk_eu_1a2b3c4d5e6f"
WEBHOOK_SECRET = "whsec_9f8e7d6c5b4a"
WORKSPACE = "WSPACE1"
API_KEY = "moe_api_key_5566778899"
SEGMENT_OUT_KEY = "seg_out_key_0011223344"
STREAMS_USER = "moe"
STREAMS_PASSWORD = "streams-pass-7788"
ADMIN_TOKEN = "admin-token-abcdef123456"

FAST_DELIVERY = {"poll_interval": 0.05, "batch_size": 100}
FAST_RETRY = {"base_delay": 0.05, "max_delay": 0.3}
# The PostgreSQL every store test uses (on this machine and in CI); each test its own schema.
DSN = "postgresql://postgres@127.0.0.1:5432/test"


def basic(user: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def config_dict(tmp_path: Path, moengage_url: str, segment_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "region": "us", "shutdown_timeout": 5},
        "store": {"url": f"sqlite:///{tmp_path}/bridge.db"},
        "mappings": {"dir": str(REPO / "mappings")},
        "admin": {"token": ADMIN_TOKEN},
        "sources": [
            {
                "name": "web",
                "kind": "segment",
                "write_key": WRITE_KEY,
                "region": "us",
                "webhook_secret": WEBHOOK_SECRET,
                "to": ["moengage-main"],
            },
            {"name": "eu-web", "kind": "segment", "write_key": EU_WRITE_KEY, "region": "eu", "to": ["moengage-eu"]},
            {
                "name": "streams-main",
                "kind": "moengage_streams",
                "data_center": "01",
                "auth": {"type": "basic", "username": STREAMS_USER, "password": STREAMS_PASSWORD},
                "to": ["segment-prod"],
            },
        ],
        "destinations": [
            {
                "name": "moengage-main",
                "kind": "moengage",
                "workspace_id": WORKSPACE,
                "api_key": API_KEY,
                "data_center": "01",
                "mapping": "segment-to-moengage",
                "base_url": moengage_url,
                "delivery": dict(FAST_DELIVERY),
                "retry": dict(FAST_RETRY),
            },
            {
                "name": "moengage-eu",
                "kind": "moengage",
                "workspace_id": WORKSPACE,
                "api_key": API_KEY,
                "data_center": "02",
                "mapping": "segment-to-moengage",
                "base_url": moengage_url,
                "delivery": dict(FAST_DELIVERY),
                "retry": dict(FAST_RETRY),
            },
            {
                "name": "segment-prod",
                "kind": "segment",
                "write_key": SEGMENT_OUT_KEY,
                "region": "us",
                "mapping": "moengage-to-segment",
                "base_url": segment_url,
                "delivery": dict(FAST_DELIVERY),
                "retry": dict(FAST_RETRY),
            },
        ],
    }


class ServedAsInProduction(TestServer):
    """aiohttp's TestServer cancels a handler whose client disconnects; `bridge serve`
    (aiohttp's default) lets it finish. Serve the bridge the way production does: that,
    and the runner `bridge serve` uses (JSON for aiohttp's own rejections)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return BridgeRunner(self.app, **kwargs)


@dataclass
class Bridge:
    """A running bridge plus its upstream stand-ins."""

    tmp_path: Path
    moengage: MoEngageStandIn
    segment: SegmentStandIn
    moengage_server: TestServer
    segment_server: TestServer
    raw: dict[str, Any]
    config: Config | None = None
    runtime: Runtime | None = None
    bindings: PrometheusBindings | None = None
    store_factory: Callable[[], Store] | None = None
    client: TestClient[Any, Any] | None = None
    _clients: list[TestClient[Any, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.client is not None
        return str(self.client.make_url("")).rstrip("/")

    def destination(self, name: str) -> dict[str, Any]:
        return next(d for d in self.raw["destinations"] if d["name"] == name)

    async def start(self) -> Bridge:
        self.config = build_config(copy.deepcopy(self.raw))
        self.bindings = PrometheusBindings()
        self.runtime = Runtime(
            self.config,
            ingest_metrics=self.bindings.ingest,
            delivery_metrics=self.bindings.delivery,
            store=self.store_factory() if self.store_factory else None,
        )
        app: web.Application = build_app(self.runtime, self.bindings)
        self.client = TestClient(ServedAsInProduction(app, host="127.0.0.1"))
        await self.client.start_server()
        self._clients.append(self.client)
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def restart(self) -> Bridge:
        await self.stop()
        return await self.start()

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        assert self.client is not None
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if raw is not None:
            kwargs["data"] = raw
        else:
            kwargs["json"] = body
        resp = await self.client.post(path, **kwargs)
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = await resp.text()
        return resp.status, data

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        assert self.client is not None
        resp = await self.client.get(path, headers=headers or {})
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = await resp.text()
        return resp.status, data


async def on_postgres(
    make_bridge: Callable[..., Awaitable[Bridge]], schema: str, tweak: Callable[[dict[str, Any]], None] | None = None
) -> Bridge:
    """A bridge (the ``make_bridge`` fixture's, ``tweak``ed) whose store is PostgreSQL, in ``schema``."""

    def to_postgres(raw: dict[str, Any]) -> None:
        raw["store"]["url"] = DSN
        if tweak is not None:
            tweak(raw)

    bridge = await make_bridge(to_postgres, start=False)
    bridge.store_factory = lambda: PostgresStore(DSN, schema=schema)
    return await bridge.start()


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Served(Protocol):
    """A bridge being served: in this process (``Bridge``) or as `bridge serve` (``BridgeProcess``)."""

    @property
    def url(self) -> str: ...


async def raw_exchange(bridge: Served, request: bytes, timeout: float = 5) -> bytes:
    """Send ``request`` byte for byte; the whole answer, read until the bridge closes the
    connection (malformed HTTP that no client library would send, say)."""
    url = URL(bridge.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout=timeout)
    finally:
        writer.close()


async def raw_post(bridge: Bridge, path: str, header: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST with header lines written byte for byte: HTTP clients refuse non-ASCII headers,
    but a server must still answer them with a 4xx."""
    response = await raw_exchange(
        bridge,
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        + header
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body,
    )
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(payload)


def depth(value: Any) -> int:
    """Levels of objects and arrays in ``value``, itself included."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def nested(levels: int) -> dict[str, Any]:
    """{"a": {"a": ...}} ``levels`` deep: orjson parses up to 1024 levels but writes 254."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root
