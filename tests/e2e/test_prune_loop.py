"""The runtime's periodic prune through a store outage: one traceback, not one a prune."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge.config.model import build_config
from bridge.runtime import Runtime
from bridge.store.base import StoreError
from tests.e2e.harness import config_dict, wait_until


async def test_a_store_outage_is_logged_once_by_the_prune_loop_then_its_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.runtime.PRUNE_INTERVAL", 0.01)
    raw = config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    runtime = Runtime(build_config(raw))
    calls = 0

    async def prune(dedupe_before: float, settled_before: float) -> int:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise StoreError("postgres: connection refused")
        return 0

    monkeypatch.setattr(runtime.store, "prune", prune)
    with capture_logs() as logs:
        await runtime.start()
        try:
            await wait_until(lambda: calls > 6, what="the store to come back for the prune loop")
        finally:
            await runtime.stop()
    failed = [e for e in logs if e["event"] == "store_prune_failed"]
    assert len(failed) == 1 and "exc_info" in failed[0]
    recovered = [e for e in logs if e["event"] == "store_prune_recovered"]
    assert len(recovered) == 1 and recovered[0]["failures"] == 5
