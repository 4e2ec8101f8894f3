"""The observability tests' view of a real bridge: the app exactly as `bridge serve` wires it
(bridge.app.build_app), with the end-to-end suite's config and credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from bridge.app import build_app as build_bridge_app
from bridge.bindings import PrometheusBindings
from bridge.config.model import Config, build_config
from bridge.observability.metrics import Metrics
from bridge.runtime import Runtime
from tests.e2e.harness import (
    ADMIN_TOKEN,
    API_KEY,
    SEGMENT_OUT_KEY,
    STREAMS_PASSWORD,
    WEBHOOK_SECRET,
    WORKSPACE,
    WRITE_KEY,
    basic,
    config_dict,
)

__all__ = ["API_KEY", "SECRETS", "SEGMENT_OUT_KEY", "STREAMS_PASSWORD", "WORKSPACE", "WRITE_KEY", "basic"]

SECRETS = (WRITE_KEY, WEBHOOK_SECRET, STREAMS_PASSWORD, ADMIN_TOKEN, API_KEY, SEGMENT_OUT_KEY)


def config(tmp_path: Path, moengage_url: str, segment_url: str) -> Config:
    return build_config(config_dict(tmp_path, moengage_url, segment_url), str(tmp_path / "bridge.yaml"))


def build_app(cfg: Config, metrics: Metrics) -> tuple[web.Application, Runtime]:
    bindings = PrometheusBindings(metrics)
    runtime = Runtime(cfg, ingest_metrics=bindings.ingest, delivery_metrics=bindings.delivery)
    runtime.load_mappings()
    return build_bridge_app(runtime, bindings), runtime


def track(user_id: str, event: str = "Order Completed", **properties: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user_id, "event": event, "properties": properties}
