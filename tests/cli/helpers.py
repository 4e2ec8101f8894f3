"""A real SQLite store file, as `bridge serve` leaves it, for the CLI's store commands."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bridge.cli import main as cli_main
from bridge.store.base import DeadLetter
from bridge.store.sqlite import SqliteStore
from tests.store.helpers import event

ROOT = Path(__file__).resolve().parents[2]


def serve_store(path: Path, *, dead: int = 0, destination: str = "d") -> None:
    """Create the store at ``path`` as the server does when it starts, with ``dead``
    events dead-lettered for ``destination``."""

    async def go() -> None:
        store = SqliteStore(str(path), min_free_disk_bytes=0)
        await store.open()
        try:
            if dead:
                await store.enqueue("web", [event(f"m{i}", f"u{i}", (destination,)) for i in range(dead)])
                jobs = await store.lease(destination, dead, 30)
                await store.dead_letter([DeadLetter(j.id, "http_400", 400, label="Order Completed") for j in jobs])
        finally:
            await store.close()

    asyncio.run(go())


def _bridge_command() -> tuple[list[str], dict[str, str]]:
    """The installed `bridge` script, importing this checkout, and its environment."""
    script = Path(sys.executable).with_name("bridge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bridge.cli"]
    return command, dict(os.environ, PYTHONPATH=str(ROOT))


def run_bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed `bridge` script, importing this checkout."""
    command, env = _bridge_command()
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def spawn_bridge(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """`run_bridge`, started and left running, its stdout and stderr pipes to read."""
    command, env = _bridge_command()
    return subprocess.Popen(
        [*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_served_store_untouched(
    ctr: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store of the ``served`` fixture still has d active and its two dead letters."""
    monkeypatch.chdir(ctr)
    capsys.readouterr()
    assert cli_main(["destinations", "list", "--config", "c.yaml"]) == 0
    assert cli_main(["dlq", "list", "--json", "--config", "c.yaml"]) == 0
    listed, _, dead = capsys.readouterr().out.partition("\n")
    assert listed == "d: active, queued 0, dead letters 2"
    assert len(orjson.loads(dead)) == 2
