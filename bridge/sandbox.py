"""Sandbox mode for `make run` without credentials: local stand-in upstreams.

Every unset ${VAR} in the config gets a visible placeholder, every destination is sent to
a local stand-in that checks what MoEngage or Segment would check and logs what it got,
so a newcomer can curl the bridge and see the MoEngage request their event became.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog

from bridge.config.loader import env_references, read_yaml
from bridge.config.model import build_config

log = structlog.get_logger("bridge.sandbox")

MOENGAGE_PORT = int(os.environ.get("BRIDGE_SANDBOX_MOENGAGE_PORT", "8089"))
SEGMENT_PORT = int(os.environ.get("BRIDGE_SANDBOX_SEGMENT_PORT", "8090"))


def placeholder(var: str) -> str:
    return "sandbox-" + var.lower().replace("_", "-")


def sandbox_env(config_text: str) -> dict[str, str]:
    env = dict(os.environ)
    # Only references without a default, and not those in comments, need a placeholder.
    for match, _ in env_references(config_text):
        if match.group(2) is None:
            env.setdefault(match.group(1), placeholder(match.group(1)))
    return env


def run_sandbox(config_path: str) -> int:
    from bridge.observability.logging import configure_logging, register_secret

    with open(config_path, encoding="utf-8") as f:
        env = sandbox_env(f.read())
    data, _ = read_yaml(config_path, env)
    host = "127.0.0.1"
    for dest in data.get("destinations") or []:
        if isinstance(dest, dict):
            port = MOENGAGE_PORT if dest.get("kind") == "moengage" else SEGMENT_PORT
            dest["base_url"] = f"http://{host}:{port}"
    cfg = build_config(data, config_path)
    configure_logging(cfg.server.log_level, cfg.server.log_format)
    for secret in cfg.secrets():
        register_secret(secret)
    asyncio.run(_serve_with_standins(cfg, data, host))
    return 0


async def _serve_with_standins(cfg: Any, data: dict[str, Any], host: str) -> None:
    from bridge.app import serve
    from bridge.testing.standins import MoEngageStandIn, SegmentStandIn, start_sandbox_upstreams

    moe = [d for d in cfg.destinations if d.kind == "moengage"]
    seg = [d for d in cfg.destinations if d.kind == "segment"]
    moengage = MoEngageStandIn(
        workspace_id=getattr(moe[0].client, "workspace_id", "sandbox") if moe else "sandbox",
        api_key=getattr(moe[0].client, "api_key", "sandbox") if moe else "sandbox",
    )
    segment = SegmentStandIn(
        keys={getattr(d.client, "write_key", ""): d.region or "us" for d in seg}, region=cfg.server.region
    )
    runners = await start_sandbox_upstreams(host, MOENGAGE_PORT, SEGMENT_PORT, moengage, segment)
    log.warning(
        "sandbox_mode",
        message="no credentials: sending to local stand-in upstreams",
        moengage=f"http://{host}:{MOENGAGE_PORT}",
        segment=f"http://{host}:{SEGMENT_PORT}",
    )
    try:
        await serve(cfg)
    finally:
        for runner in runners:
            await runner.cleanup()
