"""Run the bridge as a real subprocess (`bridge serve`), for kill -9 and SIGTERM tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BridgeProcess:
    def __init__(self, raw_config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        raw_config["server"]["port"] = self.port
        raw_config["server"]["log_format"] = "json"
        self.config_path = workdir / "bridge-proc.yaml"
        self.config_path.write_text(yaml.safe_dump(raw_config))
        self.log_path = workdir / "bridge-proc.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        await self.spawn()
        await self.wait_serving(timeout)

    async def spawn(self) -> None:
        """Start the process, without waiting for it to serve."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.cli",
            "serve",
            "--config",
            str(self.config_path),
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    async def wait_serving(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"bridge exited early ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"bridge did not start:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
