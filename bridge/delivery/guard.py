"""Bad-deploy guard: stop a destination instead of dead-lettering all of its traffic.

After a bad mapping or credential deploy nearly every delivery fails terminally.
Dead-lettering them all turns an incident into a replay chore; pausing keeps them
queued (after getsentry/arroyo's DlqLimit).
"""

from __future__ import annotations

from collections import deque
from itertools import islice, repeat

from bridge.config.model import GuardConfig


class DeadLetterGuard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._window: deque[bool] = deque(maxlen=config.window)  # True = dead-lettered
        self._dead = 0

    def record(self, delivered: int, dead: int) -> None:
        """``delivered`` good outcomes, then ``dead`` dead letters, into the window.

        Each run goes in at once, in C (a batch's acks are hundreds of outcomes): the dead
        count loses the dead outcomes pushed out at the window's old end."""
        window = self._window
        size = self.config.window
        for outcome, n in ((False, delivered), (True, dead)):
            n = min(n, size)
            if n <= 0:
                continue
            pushed_out = len(window) + n - size
            if pushed_out > 0:
                self._dead -= sum(islice(window, pushed_out))
            window.extend(repeat(outcome, n))
            if outcome:
                self._dead += n

    @property
    def size(self) -> int:
        return len(self._window)

    @property
    def ratio(self) -> float:
        return self._dead / len(self._window) if self._window else 0.0

    def would_trip(self, dead: int, delivered: int = 0) -> bool:
        """Whether ``delivered`` more good outcomes and then ``dead`` more dead letters
        would trip the guard: asked before dead-lettering a whole request or batch (with
        the batch's own good outcomes so far), so a bad deploy pauses the destination
        instead of filling the DLQ with one batch's worth of events, while a few bad
        events among good ones are dead-lettered as usual."""
        cfg = self.config
        if not cfg.enabled or dead <= 0:
            return False
        outcomes = [*self._window, *([False] * min(delivered, cfg.window)), *([True] * min(dead, cfg.window))]
        recent = outcomes[-cfg.window :]
        return len(recent) >= cfg.min_events and sum(recent) / len(recent) > cfg.threshold

    def tripped(self) -> bool:
        cfg = self.config
        return cfg.enabled and len(self._window) >= cfg.min_events and self.ratio > cfg.threshold

    def reset(self) -> None:
        self._window.clear()
        self._dead = 0
