"""What a resume read from the store does to a running worker's backoff."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

from bridge.config.model import build_config
from bridge.delivery.worker import DestinationWorker
from bridge.store.base import DestinationState, Store
from tests.e2e.harness import config_dict


def _worker(tmp_path: Path) -> DestinationWorker:
    config = build_config(config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9"))
    # apply_state reads nothing from the store
    return DestinationWorker(config.destinations[0], cast(Store, None), lambda: {})


def _held(worker: Any) -> bool:
    return bool(worker._hold_until > time.monotonic())


def test_an_operator_resume_ends_the_backoff_and_the_guard_s_does_not(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    name = worker.name
    start = time.time()
    worker.apply_state(DestinationState(name, False, "", start - 3600))  # at start: history
    worker._hold_until = time.monotonic() + 600  # a Retry-After of 10 minutes
    worker.apply_state(DestinationState(name, False, "", start - 3600))  # the same state, read again
    assert _held(worker)
    # The guard's resume after a mapping change (from this node or another) is no
    # "deliver now": the upstream's Retry-After stands.
    worker.apply_state(DestinationState(name, False, "mapping changed", start, {"by": "guard"}))
    assert _held(worker)
    # An operator's resume, here from the CLI of a destination that was not paused, is.
    worker.apply_state(DestinationState(name, False, "", start + 1))
    assert not _held(worker)
