"""The servers a run measures: the floor, the bridge, and the stand-in upstreams."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import orjson

from bench.procs import (
    LOAD_CPU,
    PYTHON,
    ROOT,
    SERVER_CPU,
    BenchError,
    Child,
    CpuSample,
    free_port,
    http_json,
    pinnable,
    sample,
    wait_http,
)
from bridge.store import open_store

WRITE_KEY = "bench-write-key-7f3a9c"
STREAMS_SOURCE = "streams-bench"
STREAMS_USER = "moe"
STREAMS_PASSWORD = "bench-streams-password-51c2"
WORKSPACE = "BENCHWS1"
MOENGAGE_KEY = "bench-moengage-api-key-88d1"
SEGMENT_OUT_KEY = "bench-segment-out-key-0c4e"
ADMIN_TOKEN = "bench-admin-token-9b7e2d"
MOENGAGE_DEST = "moengage-main"
SEGMENT_DEST = "segment-prod"
UNLIMITED = "100000000/min"
# Destination modes: paused (ingest phases, delivery cannot compete), live, or down
# (a base URL where nothing listens: deliveries fail and are retried).
MODES = ("paused", "live", "down")


class StandIns:
    """MoEngage + Segment stand-ins in one process on the load core."""

    def __init__(self, log_dir: Path) -> None:
        self.child = Child(
            "standins",
            [
                PYTHON,
                "-m",
                "bench.standin",
                "--workspace",
                WORKSPACE,
                "--api-key",
                MOENGAGE_KEY,
                "--write-key",
                SEGMENT_OUT_KEY,
                "--cpu",
                "-1",
            ],
            log_dir,
            LOAD_CPU,
        )
        words = self.child.ready_line()
        self.moengage_port, self.segment_port = int(words[0]), int(words[1])

    def moengage_counts(self) -> dict[str, int]:
        counts: dict[str, int] = http_json(f"http://127.0.0.1:{self.moengage_port}/_bench/counts")
        return counts

    def sample(self) -> CpuSample:
        return sample(self.child.pid)

    def stop(self) -> None:
        self.child.stop()


class Floor:
    name = "floor"

    def __init__(self, work: Path, log_dir: Path, tag: str, standins: StandIns | None = None) -> None:
        """With ``standins`` it is the delivery floor too, delivering to their MoEngage."""
        db = work / f"floor-{tag}.db"
        argv = [PYTHON, "-m", "bench.floor", "--db", str(db), "--cpu", "-1"]
        if standins is not None:
            moengage = f"http://127.0.0.1:{standins.moengage_port}"
            argv += ["--deliver-to", moengage, "--workspace", WORKSPACE, "--api-key", MOENGAGE_KEY]
        self.child = Child(f"floor-{tag}", argv, log_dir, SERVER_CPU)
        self.port = int(self.child.ready_line()[0])
        wait_http(f"http://127.0.0.1:{self.port}/healthz", child=self.child)

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = http_json(f"http://127.0.0.1:{self.port}/healthz")
        return health

    def deliver(self) -> None:
        http_json(f"http://127.0.0.1:{self.port}/_floor/deliver", "POST")

    @property
    def pid(self) -> int:
        return self.child.pid

    def sample(self) -> CpuSample:
        return sample(self.pid)

    def stop(self) -> None:
        self.child.stop()


def pause_before_serve(config_path: Path, names: tuple[str, ...] = (MOENGAGE_DEST, SEGMENT_DEST)) -> None:
    """Pause ``names`` in the store of a bridge not started yet, as an operator would from
    the CLI. The CLI never creates a store (from the wrong directory it would pause a new,
    empty one), so the store is created first, as ``bridge serve`` would create it."""
    url = orjson.loads(config_path.read_bytes())["store"]["url"]

    async def create() -> None:
        store = open_store(url)
        await store.open()
        await store.close()

    asyncio.run(create())
    for name in names:
        done = subprocess.run(
            [PYTHON, "-m", "bridge.cli", "destinations", "pause", name, "--config", str(config_path)],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BenchError(f"bridge destinations pause {name} failed: {done.stderr.decode(errors='replace')[-600:]}")


def bridge_config(
    work: Path,
    tag: str,
    port: int,
    standins: StandIns | None,
    mode: str,
    log_level: str = "info",
    delivery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config under test; ``delivery`` overrides the destinations' delivery section."""
    if mode not in MODES:
        raise BenchError(f"destination mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "down" or standins is None:
        moengage_url = segment_url = f"http://127.0.0.1:{free_port()}"
    else:
        moengage_url = f"http://127.0.0.1:{standins.moengage_port}"
        segment_url = f"http://127.0.0.1:{standins.segment_port}"
    return {
        "server": {"host": "127.0.0.1", "port": port, "region": "us", "log_level": log_level, "log_format": "json"},
        "store": {"url": f"sqlite:///{work / f'bridge-{tag}.db'}"},
        "mappings": {"dir": str(ROOT / "mappings")},
        "admin": {"token": ADMIN_TOKEN},
        "sources": [
            {"name": "web", "kind": "segment", "write_key": WRITE_KEY, "region": "us", "to": [MOENGAGE_DEST]},
            {
                "name": STREAMS_SOURCE,
                "kind": "moengage_streams",
                "data_center": "01",
                "auth": {"type": "basic", "username": STREAMS_USER, "password": STREAMS_PASSWORD},
                "to": [SEGMENT_DEST],
            },
        ],
        "destinations": [
            {
                "name": MOENGAGE_DEST,
                "kind": "moengage",
                "workspace_id": WORKSPACE,
                "api_key": MOENGAGE_KEY,
                "data_center": "01",
                "mapping": "segment-to-moengage",
                "base_url": moengage_url,
                "rate_limits": {b: UNLIMITED for b in ("users", "events", "bulk_users", "bulk_events", "merge")},
                **({"delivery": dict(delivery)} if delivery else {}),
            },
            {
                "name": SEGMENT_DEST,
                "kind": "segment",
                "write_key": SEGMENT_OUT_KEY,
                "region": "us",
                "mapping": "moengage-to-segment",
                "base_url": segment_url,
                "rate_limits": {"requests": UNLIMITED},
            },
        ],
    }


class Bridge:
    """``bridge serve`` in a child process pinned to the server core, on a fresh store."""

    name = "bridge"

    def __init__(
        self,
        work: Path,
        log_dir: Path,
        tag: str,
        standins: StandIns | None,
        mode: str = "paused",
        profile: Path | None = None,
        delivery: dict[str, Any] | None = None,
        variant: str = "",
    ) -> None:
        self.port = free_port()
        self.config_path = work / f"bridge-{tag}.yaml"
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_bytes(
            orjson.dumps(
                bridge_config(work, tag, self.port, standins, mode, delivery=delivery), option=orjson.OPT_INDENT_2
            )
        )
        if mode == "paused":
            pause_before_serve(self.config_path)
        argv = [PYTHON, "-m", "bridge.cli", "serve", "--config", str(self.config_path)]
        if variant:
            argv = [PYTHON, "-m", "bench.variant", variant, *argv[3:]]
        if profile is not None:
            argv = [PYTHON, "-m", "cProfile", "-o", str(profile), *argv[1:]]
        self.child = Child(f"bridge-{tag}", argv, log_dir, SERVER_CPU, announces=False)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", timeout=60, child=self.child)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [PYTHON, "-m", "bridge.cli", *args, "--config", str(self.config_path)],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BenchError(f"bridge {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-600:]}")
        return done.stdout.decode()

    @property
    def pid(self) -> int:
        return self.child.pid

    def sample(self) -> CpuSample:
        return sample(self.pid)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(f"http://127.0.0.1:{self.port}/admin/status", token=ADMIN_TOKEN)
        return result

    def destination_status(self, name: str) -> dict[str, Any]:
        for d in self.status()["destinations"]:
            if d.get("name") == name:
                return dict(d)
        raise BenchError(f"bridge status has no destination {name!r}")

    def resume(self, name: str) -> None:
        http_json(f"http://127.0.0.1:{self.port}/admin/destinations/{name}/resume", "POST", token=ADMIN_TOKEN)

    def stop(self) -> None:
        code = self.child.stop(timeout=60)
        if code not in (0, -15):
            raise BenchError(f"bridge exited with {code}: {self.child.tail()}")


def pinned_cpu() -> int:
    return pinnable(SERVER_CPU)
