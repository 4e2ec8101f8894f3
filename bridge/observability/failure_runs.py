"""A periodic task's failures, logged without flooding the log.

A store outage fails every periodic task at once: each delivery loop's lease (every
``poll_interval``), the destination-state refresh and the queue gauges. Logged with a
traceback each time, ten seconds of PostgreSQL being away wrote 336 ``lease_failed``
tracebacks for one destination polling every 50 ms, and the one line that said what went
wrong was lost among them. A run of failures is now logged three ways: its first failure
with the traceback, then one line a minute while it lasts (how many failures, for how
long, the latest error, no traceback), and one ``recovered`` line when the task succeeds
again. The ingest side has the same shape (``ingest_refused`` / ``ingest_resumed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("bridge")

# A run of failures is reported again this often while it lasts.
REPEAT_EVERY = 60.0


class FailureRun:
    """The consecutive failures of one periodic task. ``failed`` in its ``except`` block,
    ``succeeded`` after each run that worked (cheap when nothing failed before)."""

    def __init__(
        self,
        event: str,
        recovered: str,
        *,
        every: float = REPEAT_EVERY,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        self.event = event
        self.recovered = recovered
        self.every = every
        self.fields = fields
        self._clock = clock
        self.failures = 0  # in the current run
        self._started = 0.0
        self._reported_at = 0.0

    def failed(self, exc: BaseException) -> None:
        now = self._clock()
        self.failures += 1
        if self.failures == 1:
            self._started = self._reported_at = now
            log.error(self.event, exc_info=exc, **self.fields)
        elif now - self._reported_at >= self.every:
            self._reported_at = now
            log.error(
                self.event,
                failures=self.failures,
                failing_seconds=round(now - self._started, 1),
                error=f"{type(exc).__name__}: {exc}",
                **self.fields,
            )

    def succeeded(self) -> None:
        if self.failures:
            log.info(
                self.recovered,
                failures=self.failures,
                failing_seconds=round(self._clock() - self._started, 1),
                **self.fields,
            )
            self.failures = 0

    def backoff(self, base: float, cap: float) -> float:
        """How long to wait before trying again: ``base`` while nothing fails, then doubling
        with each failure of the run, up to ``cap`` (and never below ``base``): a store that
        is away is not asked again every poll, and is asked within ``cap`` of its return."""
        if not self.failures:
            return base
        return max(base, min(base * 2.0 ** min(self.failures - 1, 30), cap))
