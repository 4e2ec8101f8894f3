"""Sandbox mode for `make run` without credentials: local stand-in upstreams.

Every unset ${VAR} in the config gets a visible placeholder, every destination is sent to
a local stand-in that checks what MoEngage or Segment would check and logs what it got,
so a newcomer can curl the bridge and see the MoEngage request their event became.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from bridge.config.loader import env_references, read_config_text, read_yaml
from bridge.config.model import Config, build_config
from bridge.destinations.base import ConfigError
from bridge.destinations.moengage.datacenters import normalise_data_center

if TYPE_CHECKING:
    from aiohttp import web

    from bridge.testing.standins import MoEngageStandIn, SegmentStandIn

log = structlog.get_logger("bridge.sandbox")

MOENGAGE_PORT_VARIABLE = "BRIDGE_SANDBOX_MOENGAGE_PORT"
MOENGAGE_PORT = 8089
# One stand-in Segment per region, as Segment has one ingestion host per region.
SEGMENT_PORT_VARIABLES = {"us": "BRIDGE_SANDBOX_SEGMENT_PORT", "eu": "BRIDGE_SANDBOX_SEGMENT_EU_PORT"}
SEGMENT_PORTS = {"us": 8090, "eu": 8091}


def _port_from_env(variable: str, default: int) -> int:
    """The stand-in port ``variable`` moves it to: a config error, naming the variable,
    when it is no port (a traceback at start-up before)."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{variable}: expected a port, 0 to 65535, got {text!r}")
    return port


def sandbox_ports() -> tuple[int, dict[str, int]]:
    """The stand-ins' ports: the MoEngage one, and the Segment one of each region."""
    segment = {region: _port_from_env(var, SEGMENT_PORTS[region]) for region, var in SEGMENT_PORT_VARIABLES.items()}
    return _port_from_env(MOENGAGE_PORT_VARIABLE, MOENGAGE_PORT), segment


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

    host = "127.0.0.1"
    moengage_port, segment_ports = sandbox_ports()
    cfg = sandbox_config(config_path, host, moengage_port, segment_ports)
    configure_logging(cfg.server.log_level, cfg.server.log_format)
    for secret in cfg.secrets():
        register_secret(secret)
    asyncio.run(_serve_with_standins(cfg, host, moengage_port, segment_ports))
    return 0


def sandbox_config(config_path: str, host: str, moengage_port: int, segment_ports: Mapping[str, int]) -> Config:
    """The config with placeholders for unset ${VARS}, every MoEngage destination sent to
    the stand-in MoEngage and every Segment destination to the stand-in of its region."""
    # Read as `bridge serve` reads it: a directory or a file that is not UTF-8 is a config error.
    env = sandbox_env(read_config_text(config_path))
    data, _ = read_yaml(config_path, env)
    destinations = data.get("destinations")
    # Anything but a list is build_config's to refuse, naming the key.
    for dest in destinations if isinstance(destinations, list) else []:
        if not isinstance(dest, dict):
            continue
        if dest.get("kind") == "moengage":
            # One stand-in for every data center: the path names the host it stands for.
            dest["base_url"] = f"http://{host}:{moengage_port}{_data_center_path(dest.get('data_center'))}"
        else:  # a missing or unknown region fails in build_config, which names it
            dest["base_url"] = f"http://{host}:{segment_ports.get(str(dest.get('region')), segment_ports['us'])}"
    return build_config(data, config_path)


def _data_center_path(value: object) -> str:
    """The stand-in's path for a data center's host: data center 02 (api-02.moengage.com)
    is /api-02. Empty for a value that names none: build_config refuses it, naming the key."""
    try:
        return f"/api-{normalise_data_center(value, 'data_center')}"
    except ConfigError:
        return ""


@dataclass
class SandboxUpstreams:
    """The stand-ins a sandbox config's destinations are sent to, and their servers."""

    moengage: MoEngageStandIn
    segment: dict[str, SegmentStandIn]  # by region
    runners: list[web.AppRunner]

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_standins(
    cfg: Config, host: str, moengage_port: int, segment_ports: Mapping[str, int]
) -> SandboxUpstreams:
    """Serve stand-ins that accept what the real upstreams would for every destination:
    one MoEngage knowing each destination's workspace, key and data center, and one Segment
    per region of a Segment destination, each judging a write key by its destination's region."""
    from bridge.destinations.moengage.destination import MoEngageDestination
    from bridge.destinations.segment.destination import SegmentDestination
    from bridge.testing.standins import MoEngageStandIn, SegmentStandIn, serve_standins

    moe = [d.client for d in cfg.destinations if isinstance(d.client, MoEngageDestination)]
    seg = [d.client for d in cfg.destinations if isinstance(d.client, SegmentDestination)]
    # A workspace or write key configured twice has one real key or region: the first
    # destination's wins, and the other's requests are refused or dropped as they would be.
    workspaces = {d.workspace_id: d.api_key for d in reversed(moe)}
    # A workspace lives in one data center: the first destination's. Another's requests for
    # it reach the stand-in under another data center's path and are refused, as MoEngage would.
    data_centers = {d.workspace_id: d.data_center for d in reversed(moe)}
    workspace_id, api_key = (moe[0].workspace_id, moe[0].api_key) if moe else ("sandbox", "sandbox")
    data_center = moe[0].data_center if moe else "01"
    moengage = MoEngageStandIn(workspace_id, api_key, data_center, workspaces=workspaces, data_centers=data_centers)
    keys = {d.write_key: d.region or "us" for d in reversed(seg)}  # never None for Segment
    regions = sorted({d.region or "us" for d in seg} or {"us"})
    segment = {region: SegmentStandIn(keys, region=region) for region in regions}
    ports = [
        (moengage, moengage_port, MOENGAGE_PORT_VARIABLE),
        *((standin, segment_ports[r], SEGMENT_PORT_VARIABLES[r]) for r, standin in segment.items()),
    ]
    return SandboxUpstreams(moengage, segment, await serve_standins(host, ports))


async def _serve_with_standins(cfg: Config, host: str, moengage_port: int, segment_ports: dict[str, int]) -> None:
    from bridge.app import serve
    from bridge.stop_signals import stop_event

    # Before the stand-ins start: a SIGTERM meanwhile reaches serve, which then does not start.
    stop = stop_event(asyncio.get_running_loop())
    upstreams = await start_standins(cfg, host, moengage_port, segment_ports)
    log.warning(
        "sandbox_mode",
        message="no credentials: sending to local stand-in upstreams",
        moengage=f"http://{host}:{moengage_port}",
        segment={region: f"http://{host}:{segment_ports[region]}" for region in upstreams.segment},
    )
    try:
        await serve(cfg, stop=stop)
    finally:
        await upstreams.stop()
