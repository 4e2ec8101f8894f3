"""A port already taken (another bridge, a stale `make run`), or a SQLite file another server
holds, is a one-line config error naming the setting, exit code 2, not a traceback; and the
store it opened is closed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import config_dict


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_serve_on_a_taken_port_is_a_config_error(tmp_path: Path, taken_port: int) -> None:
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["server"]["port"] = taken_port
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out = await run_cli("serve", "--config", str(path))
    assert code == 2, out
    assert f"config error: server.host/server.port: cannot listen on http://127.0.0.1:{taken_port}:" in out
    assert "address already in use" in out.lower()
    assert "Traceback" not in out


async def test_serve_on_a_sqlite_file_another_server_holds_is_a_config_error(tmp_path: Path) -> None:
    # Was "store error:", exit 1: like a port in use, the operator's mistake, known before serving.
    from bridge.store.server_lock import ServerLock

    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    db = os.path.realpath(tmp_path / "bridge.db")
    held = ServerLock(db)  # as the first server holds it
    held.acquire()
    try:
        code, out = await run_cli("serve", "--config", str(path))
    finally:
        held.release()
    assert code == 2, out
    assert out.startswith(
        f"config error: store.url: another bridge server is using {db} (it holds {db}.server-lock): "
    ), out
    assert out.count("\n") == 1 and "Traceback" not in out


def open_files(name: str) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if name in (target := os.readlink(f"/proc/self/fd/{fd}")):
                found.append(target)
    return found


async def test_a_failed_listen_stops_what_start_up_opened(tmp_path: Path, taken_port: int) -> None:
    from bridge.app import serve
    from bridge.config.model import load_config
    from bridge.destinations.base import ConfigError

    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["server"]["port"] = taken_port
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="cannot listen on"):
        await serve(load_config(path))
    # The store was opened by start-up, then closed (its writer thread stopped) as a
    # SIGTERM would: nothing of it is left open in this process.
    assert (tmp_path / "bridge.db").exists()
    assert open_files(str(tmp_path / "bridge.db")) == []
    assert not [t for t in threading.enumerate() if t.name == "bridge-sqlite-writer"]


@pytest.mark.parametrize(
    ("variable", "standin"),
    [("BRIDGE_SANDBOX_MOENGAGE_PORT", "moengage"), ("BRIDGE_SANDBOX_SEGMENT_PORT", "segment")],
)
async def test_sandbox_on_a_taken_standin_port_names_its_variable(
    tmp_path: Path, taken_port: int, variable: str, standin: str
) -> None:
    """The error names the one variable that moves the taken port, not a pattern of three."""
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    # The stand-ins not under test take free ports (0), whatever else runs on this machine.
    ports = {"BRIDGE_SANDBOX_MOENGAGE_PORT": "0", "BRIDGE_SANDBOX_SEGMENT_PORT": "0", variable: str(taken_port)}
    code, out = await run_cli("serve", "--config", str(path), "--sandbox", env=ports)
    assert code == 2, out
    assert f"config error: sandbox {standin} stand-in ({variable}): cannot listen on" in out
    assert f"127.0.0.1:{taken_port}" in out
    assert "Traceback" not in out
