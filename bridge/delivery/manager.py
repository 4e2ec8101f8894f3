"""All destination workers of one bridge process, isolated from each other."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping

from bridge.config.model import Config
from bridge.delivery.metrics import DeliveryMetrics
from bridge.delivery.ratelimit import shared_limiters
from bridge.delivery.worker import DestinationWorker, rates_of
from bridge.mapping.api import CompiledMapping
from bridge.observability.failure_runs import FailureRun
from bridge.store.base import DestinationState, Store


class DeliveryManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        mappings: Callable[[], Mapping[str, CompiledMapping]],
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self.store = store
        # Destinations on one upstream account (a MoEngage workspace) share its rate limits.
        limiters = shared_limiters((d.name, d.client.rate_limit_scope(), rates_of(d)) for d in config.destinations)
        self.workers = {
            d.name: DestinationWorker(d, store, mappings, metrics, limiter=limiters.get(d.name))
            for d in config.destinations
        }
        self._poll = min((d.delivery.poll_interval for d in config.destinations), default=1.0)
        self._state_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh_states()
        for worker in self.workers.values():
            await worker.start()
        self._state_task = asyncio.create_task(self._watch_states(), name="destination-states")

    def notify(self, destinations: Iterable[str]) -> None:
        for name in destinations:
            worker = self.workers.get(name)
            if worker is not None:
                worker.wake()

    async def refresh_states(self) -> dict[str, DestinationState]:
        states = await self.store.get_destination_states()
        for name, worker in self.workers.items():
            worker.apply_state(states.get(name))
        return states

    async def _watch_states(self) -> None:
        # Pause/resume may come from the CLI or another node: the store is the truth.
        failures = FailureRun("destination_state_refresh_failed", "destination_state_refresh_recovered")
        while True:
            await asyncio.sleep(max(self._poll, 0.2))
            try:
                await self.refresh_states()
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()

    async def set_paused(self, name: str, paused: bool, reason: str) -> int:
        """Pause or resume ``name``. A resume also makes its waiting retries due and drops
        its backoff: an operator who resumes means "deliver now". Returns how many waiting
        jobs a resume made due (0 for a pause)."""
        state = DestinationState(name, paused, reason, self.store.now())
        await self.store.set_destination_state(state)
        worker = self.workers[name]
        worker.apply_state(state)
        if paused:
            return 0
        worker.retry_now()  # first: a store error in make_due still leaves the backoff dropped
        return await self.store.make_due(name)

    def begin_stop(self) -> None:
        """On SIGTERM, while HTTP drains: no destination starts anything new."""
        for worker in self.workers.values():
            worker.begin_stop()

    async def stop(self, timeout: float) -> None:
        if self._state_task is not None:
            self._state_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._state_task
        await asyncio.gather(*(w.stop(timeout) for w in self.workers.values()))
