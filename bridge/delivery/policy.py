"""Retry policy: classify upstream answers and schedule the next attempt.

Exponential backoff with full jitter (AWS's recommendation), a budget in time AND
attempts (RudderStack: abort after 180 min and >= 3 attempts; Segment retries 4 h),
and Retry-After honoured but clamped so a hostile or buggy upstream cannot park a
queue for days.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from bridge.config.model import RetryConfig
from bridge.destinations.base import Response


class Action(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    SPLIT = "split"  # payload too large: halve and resend
    BISECT = "bisect"  # rejected as bad: find the poison item(s)
    PAUSE = "pause"  # the account or credentials refused: every event would be, so hold them all
    DEAD = "dead"


# A 400/422 on a multi-item request may be caused by one bad item; other 4xx (auth,
# not found) concern the whole destination, so bisecting would only multiply requests.
BISECT_STATUSES = frozenset({400, 422})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    config: RetryConfig

    def classify(self, response: Response, items: int) -> Action:
        status = response.status
        if 200 <= status < 300:
            return Action.DELIVERED
        if response.failure is not None:
            return Action.BISECT if items > 1 else Action.DEAD
        if status == 0 or status in self.config.retryable_statuses:
            return Action.RETRY
        if response.refuses_account or status in self.config.pause_statuses or 300 <= status < 400:
            # A redirect (never followed: it would carry the credentials to another host)
            # says the destination's URL is wrong or moved, never that these events are:
            # every request would get it, so hold them all rather than dead-letter them.
            return Action.PAUSE
        if status == 413:
            return Action.SPLIT if items > 1 else Action.DEAD
        if status in BISECT_STATUSES and items > 1:
            return Action.BISECT
        return Action.DEAD

    def delay(self, attempts: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """Seconds until the next attempt, after ``attempts`` failed ones."""
        cfg = self.config
        # Capped exponent: 2**1024 would overflow a float after enough attempts.
        ceiling = min(cfg.max_delay, cfg.base_delay * (2.0 ** min(max(0, attempts - 1), 60)))
        delay = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            # The upstream told us when: wait at least that long, within reason.
            delay = max(delay, min(max(retry_after, 0.0), cfg.max_retry_after))
        return delay

    def exhausted(self, attempts: int, first_attempt_at: float, now: float) -> bool:
        """Give up only when BOTH the time budget and the attempt budget are spent."""
        return attempts >= self.config.min_attempts and now - first_attempt_at >= self.config.max_age


class RetrySchedule:
    """Jobs to retry, grouped by due time. Jobs of one batch that failed the same way get
    one jittered delay per attempt count: they travel together again (one store write, one
    later lease) instead of scattering into as many writes and leases as there are jobs."""

    def __init__(self, policy: RetryPolicy, now: float) -> None:
        self.policy = policy
        self.now = now
        self.groups: dict[float, list[int]] = {}
        self._due: dict[tuple[int, float | None], float] = {}

    def add(self, job_id: int, attempts: int, retry_after: float | None) -> None:
        key = (attempts, retry_after)
        due = self._due.get(key)
        if due is None:
            due = self._due[key] = round(self.now + self.policy.delay(attempts, retry_after), 3)
        self.groups.setdefault(due, []).append(job_id)
