"""kill -9 while enqueueing: every acknowledged message id must be in the store afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from bridge.store.base import RecordFilter
from tests.store.conftest import StoreFactory
from tests.store.helpers import event

ROOT = Path(__file__).resolve().parents[2]


async def _run_and_kill(factory: StoreFactory, acked_target: int) -> set[str]:
    args = [sys.executable, "-m", "tests.store.crash_writer", factory.url]
    args.append(factory.location if factory.kind == "postgres" else "200")
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: set[str] = set()
    try:
        async with asyncio.timeout(60):
            while len(acked) < acked_target:
                line = await proc.stdout.readline()
                if not line:
                    stderr = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"the writer died early: {stderr.decode(errors='replace')}")
                acked.add(line.decode().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = await proc.communicate()
    # Complete lines written before the kill were acknowledged too; a cut-off last one was not.
    acked.update(rest.decode().split("\n")[:-1])
    return acked


async def test_sigkill_loses_no_acknowledged_event(factory: StoreFactory) -> None:
    acked: set[str] = set()
    for _round in range(3):
        acked |= await _run_and_kill(factory, 300)
    store = await factory.new()
    jobs = await store.lease("moe", 100_000, 30, ordered=False)
    stored = {j.message_id for j in jobs}
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged ids lost, e.g. {sorted(missing)[:5]}"
    assert len(acked) >= 900
    assert await store.list_dead(RecordFilter()) == []
    # Their dedupe keys survived too: sending them again stores nothing.
    again = await store.enqueue("web", [event(i) for i in sorted(acked)])
    assert (again.stored, again.duplicates) == (0, len(acked))
