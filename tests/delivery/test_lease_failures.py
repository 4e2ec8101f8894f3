"""A delivery loop whose leases fail (the store is away) asks less and less often."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from structlog.testing import capture_logs

from bridge.config.model import build_config
from bridge.delivery.worker import LEASE_RETRY_CAP, DestinationWorker
from bridge.store.base import Job, Store, StoreError
from tests.e2e.harness import config_dict


class AwayStore:
    """A store that is away until ``back`` is set: every lease fails, and is counted."""

    def __init__(self) -> None:
        self.leases = 0
        self.back = False

    async def lease(self, destination: str, limit: int, lease_seconds: float, **kw: Any) -> list[Job]:
        self.leases += 1
        if not self.back:
            raise StoreError("postgres: connection refused")
        return []


def _worker(tmp_path: Path, store: AwayStore, poll_interval: float) -> DestinationWorker:
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    raw["destinations"][0]["delivery"] = {"poll_interval": poll_interval, "concurrency": 1}
    config = build_config(raw)
    return DestinationWorker(config.destinations[0], cast(Store, store), lambda: {})


@contextlib.asynccontextmanager
async def looping(worker: DestinationWorker) -> AsyncIterator[None]:
    """``worker``'s delivery loop, running until the block ends."""
    task = asyncio.create_task(worker._loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_loop_whose_leases_fail_backs_off_and_polls_again_once_they_work(tmp_path: Path) -> None:
    store = AwayStore()
    worker = _worker(tmp_path, store, poll_interval=0.01)
    with capture_logs() as logs:
        async with looping(worker):
            await asyncio.sleep(1.5)
            # Waits of 0.01, 0.02, 0.04 ... 0.64 s: 8 attempts in 1.5 s, where polling every
            # 0.01 s made about 150, each a traceback.
            assert 5 <= store.leases <= 10, store.leases
            store.back = True
            await asyncio.sleep(LEASE_RETRY_CAP / 2)  # the longest wait so far ends within this
            since_back = store.leases
            await asyncio.sleep(0.3)
            assert store.leases - since_back >= 10  # polling every 0.01 s again
    events = [entry["event"] for entry in logs]
    assert events.count("lease_failed") == 1 and events.count("lease_recovered") == 1, events


async def test_a_loop_paused_while_its_leases_fail_does_not_say_they_work_again(tmp_path: Path) -> None:
    store = AwayStore()
    worker = _worker(tmp_path, store, poll_interval=0.01)
    with capture_logs() as logs:
        async with looping(worker):
            await asyncio.sleep(0.2)
            assert store.leases >= 2
            worker.paused = True  # a paused loop leases nothing: it learns nothing of the store
            await asyncio.sleep(LEASE_RETRY_CAP / 2)
    events = [entry["event"] for entry in logs]
    assert events.count("lease_failed") == 1 and "lease_recovered" not in events, events
