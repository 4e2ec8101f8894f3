"""Per-user ordered leasing, the same walk for every store.

The store feeds windows of unsettled jobs in id order; this picks the due ones, skipping
every ordering key that has an older job not yet due (waiting for a retry, or leased).
Keys found blocked are handed back to the store to exclude in SQL from later windows, so
one user with a huge blocked backlog is skipped by the database, not walked row by row
until the scan budget runs out and starves the users queued behind them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

QUEUED = 0
LEASED = 1
MIN_WINDOW = 256
MIN_SCAN_BUDGET = 5000
# Keys excluded in SQL per window (bind-parameter limits); more are still skipped here.
MAX_EXCLUDED_KEYS = 2000
# A job that belongs to two users (an alias merges one into the other) has both ids in its
# ordering key, joined by this: it waits for the earlier jobs of either, and holds both.
KEY_SEPARATOR = "\x1f"


def ordering_key(*ids: str) -> str:
    """The ordering key of a job that must keep its place among the jobs of every id."""
    return KEY_SEPARATOR.join(dict.fromkeys(i for i in ids if i))


class OrderedSelection:
    def __init__(self, limit: int, now: float, ahead: Collection[int] = ()) -> None:
        """``ahead``: jobs of the caller's batch in flight (Store.lease): skipped, and
        holding back nothing, since the caller settles them before sending this lease."""
        self.limit = limit
        self.ahead = ahead
        self.now = now
        self.window = max(limit * 4, MIN_WINDOW)
        self.budget = max(limit * 50, MIN_SCAN_BUDGET)
        self.chosen: list[int] = []
        self.blocked: set[str] = set()
        self._after = 0
        self._scanned = 0
        self._done = limit <= 0

    def next_query(self) -> tuple[int, list[str], int] | None:
        """(jobs after this id, keys to exclude, window size), or None when done."""
        if self._done or self._scanned >= self.budget:
            return None
        return self._after, sorted(self.blocked)[:MAX_EXCLUDED_KEYS], self.window

    def take(self, rows: Iterable[Sequence[Any]]) -> None:
        """Rows of (id, ordering_key, state, available_at, lease_until), in id order.

        ``rows`` may be a lazy cursor: iteration stops as soon as ``limit`` jobs are
        chosen, so the rest of the window is never fetched."""
        scanned = 0
        last_id = self._after
        blocked, chosen, now, ahead, limit = self.blocked, self.chosen, self.now, self.ahead, self.limit
        # Per row: it runs for every job a lease walks past, so nothing is built for a due one.
        for job_id, key, state, available_at, lease_until in rows:
            scanned += 1
            last_id = job_id
            if job_id in ahead:
                continue
            if key:
                if KEY_SEPARATOR in key:
                    users = key.split(KEY_SEPARATOR)
                    if not blocked.isdisjoint(users):
                        # Waiting for an earlier job of one user: both users' later jobs wait too.
                        blocked.update(users)
                        continue
                elif key in blocked:
                    continue
            if (available_at <= now) if state == QUEUED else ((lease_until or 0.0) <= now):
                chosen.append(int(job_id))
                if len(chosen) >= limit:
                    self._done = True
                    return
            elif key:
                blocked.update(key.split(KEY_SEPARATOR))  # one user, or each of an alias's two
        if scanned < self.window:
            self._done = True
            return
        self._after = int(last_id)
        self._scanned += scanned
