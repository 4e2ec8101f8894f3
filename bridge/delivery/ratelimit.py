"""Token buckets per destination, slowed down adaptively when the upstream says 429."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping


class TokenBucket:
    """A bucket that may go into debt: a request costing more than the burst still
    goes through, and later callers wait until the debt is paid back."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.base_rate = rate
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self._updated = time.monotonic()
        self._last_throttle = 0.0  # the last 429 (recovery waits a second after it)
        self._halved_at = 0.0  # when the rate was last halved
        self._last_recover = 0.0

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, n: float) -> float:
        """How long taking ``n`` tokens now would make the caller wait (takes nothing)."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        return 0.0 if tokens >= n else (n - tokens) / self.rate

    def reserve(self, n: float) -> float:
        """Take ``n`` tokens now; return how long the caller must wait before sending."""
        now = time.monotonic()
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def throttled(self, sent_at: float | None = None) -> None:
        """The upstream answered 429: halve the rate (down to 5% of the configured one).

        ``sent_at`` (monotonic): when the refused request took its tokens. One taken before
        the last halving was paced at the old rate, on the wire with the 429 that halved it:
        the same signal of the upstream, so it halves nothing more. Counted each, an
        unordered batch's 20 requests refused together took the rate to its floor at once."""
        now = time.monotonic()
        self._last_throttle = now
        if sent_at is not None and sent_at < self._halved_at:
            return
        self._refill(now)
        self.rate = max(self.base_rate * 0.05, self.rate * 0.5)
        self._halved_at = now

    def succeeded(self) -> None:
        """Recover 10% per second without a 429, back up to the configured rate."""
        if self.rate >= self.base_rate:
            return
        now = time.monotonic()
        if now - self._last_throttle > 1.0 and now - self._last_recover > 1.0:
            self._refill(now)
            self.rate = min(self.base_rate, self.rate * 1.1)
            self._last_recover = now


class RateLimiter:
    """All buckets of one destination."""

    def __init__(self, rates: Mapping[str, float]) -> None:
        self.buckets = {name: TokenBucket(rate) for name, rate in rates.items() if rate > 0}

    async def acquire(self, cost: Mapping[str, int]) -> None:
        wait = 0.0
        for name, n in cost.items():
            bucket = self.buckets.get(name)
            if bucket is not None and n > 0:
                wait = max(wait, bucket.reserve(n))
        if wait > 0:
            await asyncio.sleep(wait)

    def wait_time(self, cost: Mapping[str, int]) -> float:
        return max(
            (b.wait_time(n) for name, n in cost.items() if n > 0 and (b := self.buckets.get(name)) is not None),
            default=0.0,
        )

    def throttled(self, cost: Mapping[str, int], sent_at: float | None = None) -> None:
        """A request of ``cost`` got a 429; ``sent_at``: see TokenBucket.throttled."""
        for name in cost:
            if name in self.buckets:
                self.buckets[name].throttled(sent_at)

    def succeeded(self, cost: Mapping[str, int]) -> None:
        for name in cost:
            if name in self.buckets:
                self.buckets[name].succeeded()


def shared_limiters(scopes: Iterable[tuple[str, str | None, Mapping[str, float]]]) -> dict[str, RateLimiter]:
    """One limiter for each rate-limit scope that several destinations share, by destination
    name, from (name, scope, rates) of each destination. A bucket's rate is the lowest any of
    them sets: each destination's own cap holds, and together they stay within the
    upstream's, which counts them as one. A destination alone in its scope is not named."""
    groups: dict[str, list[tuple[str, Mapping[str, float]]]] = {}
    for name, scope, rates in scopes:
        if scope is not None:
            groups.setdefault(scope, []).append((name, rates))
    limiters: dict[str, RateLimiter] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        lowest: dict[str, float] = {}
        for _, rates in members:
            for bucket, rate in rates.items():
                lowest[bucket] = min(rate, lowest.get(bucket, rate))
        limiter = RateLimiter(lowest)
        limiters.update((name, limiter) for name, _ in members)
    return limiters
