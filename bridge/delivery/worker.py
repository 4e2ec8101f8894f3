"""One destination's delivery loop: lease -> map -> pack -> send -> settle.

Every leased job is settled exactly once (ack, retry, dead-letter, discard) or, when
the worker stops mid-way, released. After a crash it is due again with the same
message_id: on SQLite as soon as the next server starts (the dead one's leases were held
in its memory, see store/sqlite_leases.py), on PostgreSQL once its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import filterfalse, islice, repeat
from operator import attrgetter, sub
from typing import Any, TypedDict, TypeVar

import orjson
import structlog

from bridge.config.model import DestinationConfig
from bridge.delivery.guard import DeadLetterGuard
from bridge.delivery.metrics import DeliveryMetrics, NoDeliveryMetrics
from bridge.delivery.outputs import digests_of, not_yet_delivered
from bridge.delivery.policy import Action, RetryPolicy, RetrySchedule
from bridge.delivery.ratelimit import RateLimiter
from bridge.destinations.base import Item, Request, Response
from bridge.destinations.http import CONNECTIONS
from bridge.destinations.packing import json_array
from bridge.mapping.api import CompiledMapping, Discarded, Failed, MapContext, Output
from bridge.mapping.links import link_context
from bridge.observability.failure_runs import FailureRun
from bridge.observability.redaction import redact_text
from bridge.store.base import DeadLetter, DestinationState, Discard, Job, Store
from bridge.store.ordering import KEY_SEPARATOR

log = structlog.get_logger("bridge.delivery")

MAX_KEPT_BODY = 4096
# While leasing fails (the store is away), the loops ask again after poll_interval, then
# twice as long each failure, up to this (or poll_interval, if longer).
LEASE_RETRY_CAP = 5.0


# The least a job held back behind its user's earlier jobs waits before it is looked at again.
DEFER_SECONDS = 0.5
# Jobs whose last refusal for now the worker remembers: a lease's worth many times over,
# about 100 bytes each. A job forgotten is retried whole as before, never lost.
REFUSALS_KEPT = 50_000
# Bisections of requests refused for now, per batch attempt: enough to find a poison event
# or two among 500 (9 levels each), and a bound on the requests an upstream that fails at
# random while taking others gets from one batch without a backoff. The rest wait for the
# batch's next attempt.
RETRY_SPLITS = 24
# A request refused for now with nothing accepted at its endpoint since (no evidence the
# upstream is up) is sent as its two halves once, a probe, when one of its jobs had been
# tried this many times before this attempt and its last attempt was refused for now: on a
# quiet destination (that request the only traffic) no other request brings the evidence,
# and a poison event's request-mates otherwise waited out the retry budget with it. Two,
# so a blip (one refusal, or two) is not probed; an outage costs a request or two more a
# retry cycle, never one an event.
PROBE_AFTER = 2
# A leased job's id and attempt count, read in C (see _batch).
_JOB_ID = attrgetter("id")
_ATTEMPTS = attrgetter("attempts")
_ITEM_JOB = attrgetter("job_id")  # of an Item
_PAYLOAD = attrgetter("payload")  # of a Job
_ACTION = attrgetter("action")  # of a Verdict
_KIND = attrgetter("kind")  # of an Output
_V = TypeVar("_V")


def event_label(event: Any) -> str:
    """A human handle for an event in DLQ listings: its name, else its type."""
    if not isinstance(event, dict):
        return ""
    for key in ("event", "event_name", "event_code", "type"):
        value = event.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


@dataclass(frozen=True, slots=True)  # one is shared by every item of a request
class Verdict:
    action: Action
    response: Response | None = None
    # The request judged. Rendered for the DLQ only for a job that is dead-lettered (see
    # DestinationWorker._request_for_record), not on every retry or refusal.
    request: Request | None = None


@dataclass(slots=True)
class _Batch:
    """The jobs of one lease and what became of them."""

    jobs: dict[int, Job]
    deadline: float  # monotonic time after which no request may start (well inside the lease)
    events: dict[int, Any] = field(default_factory=dict)  # the parsed payloads, by job id
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    # Jobs with an item never sent: released, uncounted, unless one of their items was
    # refused, for now or for good (a RETRY or DEAD verdict): that attempt is judged (see _settle).
    unsent: set[int] = field(default_factory=set)
    # Unordered delivery: jobs whose barrier was held back behind an earlier job of their
    # users, not sent (see DestinationWorker._send_barriers): due again later, not judged,
    # unless another of their outputs was refused (judged as an unsent one is, see _settle).
    deferred: set[int] = field(default_factory=set)
    settled: set[int] = field(default_factory=set)
    version: str = ""  # the mapping version that mapped this batch
    items_left: dict[int, int] = field(default_factory=dict)  # per job: items without a verdict yet
    dead_pending: int = 0  # jobs given a dead verdict here, not yet known to the guard
    retry_splits: int = 0  # requests refused for now that were bisected or probed (RETRY_SPLITS)
    probed: bool = False  # one probe a batch attempt (see PROBE_AFTER)
    delivered_pending: int = 0  # and jobs delivered here, likewise
    guard_reason: str = ""  # set when the guard would trip: send nothing more, then pause
    # Who that pause is by: the guard (a bad deploy: a mapping change ends it) or the
    # upstream (an answer about the account, or a redirect: it waits for an operator).
    pause_by: str = "guard"
    # Settle only jobs still on this lease (see Store.ack): after a lapsed lease, whoever
    # leased them since owns them.
    fence: dict[int, int] = field(default_factory=dict)
    # Pipelining (DestinationWorker._loop): the batch this one may not send before, the
    # task delivering this one, set once it is mapped, and its jobs that no longer hold
    # back their users (delivered, dead-lettered or discarded).
    after: _Batch | None = None
    task: asyncio.Task[None] | None = None
    mapped: asyncio.Event = field(default_factory=asyncio.Event)
    passed: set[int] = field(default_factory=set)
    # The requests the upstream accepted: one append a request, read only for the jobs
    # left partly delivered (delivered_outputs), so a fully delivered batch pays nothing.
    accepted: list[Request] = field(default_factory=list)
    # The jobs that delete their user (Destination.ERASE_KINDS): {job: the ids whose
    # identity links their ack erases}. See _erased_ids.
    erases: dict[int, frozenset[str]] = field(default_factory=dict)
    # The jobs that merge a user into another (Destination.MERGE_FIELDS): {job: its
    # (merged id, retained id) pairs}, which their ack links. See _uses_changed_links.
    merges: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # The items that wait for an earlier item of their own job (Destination.FOLLOWERS):
    # {id(follower): its leader}, and, only while there are some, the ids of the items
    # accepted so far (see _without_unready_followers). Empty for a batch of one-output events.
    leaders: dict[int, Item] = field(default_factory=dict)
    accepted_ids: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.task is None or self.task.done()

    async def done(self) -> None:
        """Wait until this batch is settled (never raises: its task handles its own errors)."""
        if self.task is not None and not self.task.done():
            await asyncio.wait({self.task})

    def holds(self) -> dict[str, int]:
        """{user: the oldest job id here that was neither delivered nor removed}: that
        user's later jobs must wait for it (it was retried or given back)."""
        held: dict[str, int] = {}
        if self.passed.issuperset(self.jobs):
            return held  # nearly every batch: every job passed (asked in C)
        for job_id, job in self.jobs.items():
            if job_id not in self.passed and job.ordering_key:
                for user in job.ordering_key.split(KEY_SEPARATOR):
                    if job_id < held.get(user, job_id + 1):
                        held[user] = job_id
        return held

    def link_changes(self, job_ids: Collection[int]) -> _LinkChanges:
        """Store.ack's ``erase_links`` and ``merge_links`` for acking ``job_ids``: None
        each for a batch with no deletion, no merge."""
        return {"erase_links": _of(self.erases, job_ids), "merge_links": _of(self.merges, job_ids)}

    def label(self, job_id: int) -> str:
        # Only a job that is dead-lettered or discarded needs its label: made on demand.
        return event_label(self.events.get(job_id))

    def delivered_outputs(self, job_ids: Collection[int]) -> dict[int, bytes]:
        """{job: the digests of every output it has delivered so far}, for those of
        ``job_ids`` that had an output accepted in this attempt: what they keep when they
        stay queued (or go to the DLQ), so that no later attempt or replay sends those
        again. The others have nothing new to record."""
        if not self.accepted or not job_ids:
            return {}
        wanted = set(job_ids)
        sent: dict[int, list[Item]] = {}
        for request in self.accepted:
            for item in request.items:
                if item.job_id in wanted:
                    sent.setdefault(item.job_id, []).append(item)
        # The earlier attempts' outputs were not sent in this one: the two never overlap.
        return {job_id: self.jobs[job_id].delivered_outputs + digests_of(items) for job_id, items in sent.items()}

    def fully_delivered(self, job_id: int) -> bool:
        verdict = self.verdicts.get(job_id)
        return (
            verdict is not None
            and verdict.action is Action.DELIVERED
            and self.items_left.get(job_id) == 0
            and job_id not in self.unsent
        )


class DestinationWorker:
    def __init__(
        self,
        config: DestinationConfig,
        store: Store,
        mappings: Callable[[], Mapping[str, CompiledMapping]],
        metrics: DeliveryMetrics | None = None,
        *,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``limiter``: buckets shared with other destinations on the same upstream account
        (DeliveryManager); by default this destination's own."""
        self.config = config
        self.name = config.name
        self.client = config.client
        self.store = store
        self._mappings = mappings
        self.metrics = metrics or NoDeliveryMetrics()
        self.policy = RetryPolicy(config.retry)
        self.limiter = limiter or RateLimiter(rates_of(config))
        self.guard = DeadLetterGuard(config.guard)
        self.paused = False
        self.pause_reason = ""
        self._paused_version = ""
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Destination-wide backoff (a circuit breaker): after a Retry-After or a run of
        # retryable failures, nothing is leased or sent until then.
        self._hold_until = 0.0
        self._failure_streak = 0
        # {job: time.monotonic() of its last refusal for now}, and {endpoint: when the
        # upstream last accepted a request there}: which jobs it refused before it took others
        # since (see _refused_while_accepting). Bounded (REFUSALS_KEPT), oldest forgotten first.
        self._refused_at: dict[int, float] = {}
        self._accepted_at: dict[str, float] = {}
        # {job: its attempt count when a request of it was last probed (PROBE_AFTER)}: a job
        # is probed once an attempt, not again when its half is given back unsent (ordered
        # delivery) and leased again under the same count. Bounded as _refused_at is.
        self._probed: dict[int, int] = {}
        # Requests on the wire, every loop's: no more than the destination has connections.
        # Past them, a request waited in aiohttp's pool with its timeout running: an unordered
        # batch past its retry budget (a request an event, see _pack) timed out its last
        # requests unsent against an upstream that answered each in time, and dead-lettered them.
        self._slots = asyncio.Semaphore(CONNECTIONS)
        # Failing leases (a store outage): logged once with the traceback, then once a
        # minute, and lease_recovered at the end; every loop of this worker shares it.
        self._lease_failures = FailureRun("lease_failed", "lease_recovered", destination=self.name)
        # What on-call reads in /admin/status while a queue grows: the last answer that
        # was not a delivery, and when a request last got one (store clock, epoch seconds).
        self.last_failure: dict[str, Any] | None = None
        self.last_delivered_at: float | None = None
        # Events the mapping chose not to send, by reason, since this server started: an
        # ack with nothing delivered and nothing logged (one-character user ids, say) is
        # otherwise only in the discards table and a metric.
        self.discarded: Counter[str] = Counter()
        # changed_at of the latest resume seen in the store (None: no state read yet)
        self._resume_seen: float | None = None
        # After an operator resumes, the first batch is delivered and dead-lettered as usual
        # (the guard judges it afterwards): a resume always makes progress.
        self._precheck = True

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        await self.client.start()
        for i in range(self.config.delivery.concurrency):
            self._tasks.append(asyncio.create_task(self._loop(), name=f"deliver:{self.name}:{i}"))

    def wake(self) -> None:
        # Ingest calls this for every request. A paused destination has nothing to lease,
        # and waking it would only spin its loop once per request; resuming wakes it.
        if not self.paused:
            self._wake.set()

    def begin_stop(self) -> None:
        """Start no new lease or request from now on; what is in flight carries on."""
        self._stopping = True
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Finish in-flight deliveries within ``timeout``; then cancel (jobs are released)."""
        self.begin_stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.client.close()

    # -- pause state -----------------------------------------------------------------
    def apply_state(self, state: DestinationState | None) -> None:
        paused = bool(state and state.paused)
        # Only the guard's pauses end by themselves when the mapping changes; an operator's
        # pause waits for an operator.
        by_guard = bool(state and state.paused and state.extra.get("by") == "guard")
        if not by_guard:
            self._paused_version = ""
        elif not self._paused_version:
            # The version that failed, as the pause recorded it: after a restart (the usual
            # way a fixed mapping arrives) the live version is the fix, not the failure.
            assert state is not None
            self._paused_version = str(state.extra.get("version") or "") or self._mapping_version()
        operator_resume = state is not None and not paused and state.extra.get("by") != "guard"
        resumed_at = state.changed_at if state is not None and operator_resume else 0.0
        if self._resume_seen is None:
            self._resume_seen = resumed_at  # what the store held at start: history
        elif resumed_at > self._resume_seen:
            # A resume recorded since, maybe from the CLI for a destination that was not
            # paused here: it still means "deliver now". (From paused, see below.)
            self._resume_seen = resumed_at
            if not self.paused:
                self.retry_now()
        if paused == self.paused:
            return
        log.warning(
            "destination_paused" if paused else "destination_resumed",
            destination=self.name,
            reason=state.reason if state else "",
        )
        self.paused = paused
        self.pause_reason = state.reason if state else ""
        self.guard.reset()
        self._precheck = paused  # resumed (by an operator): the next batch runs unchecked
        self.metrics.paused(self.name, paused)
        if not paused and state is not None and state.extra.get("by") == "guard":
            # The guard's resume after a mapping change, maybe another node's: look for work,
            # but keep the backoff the upstream asked for. Only an operator's means "now".
            self._wake.set()
        elif not paused:
            self.retry_now()

    def retry_now(self) -> None:
        """Drop the destination-wide backoff (a Retry-After, or a run of failures) and
        look for work at once: what an operator's resume asks for. Resumed from the CLI,
        the server sees it at its next look at the store's states."""
        self._hold_until = 0.0
        self._failure_streak = 0
        self._wake.set()

    def _mapping_version(self) -> str:
        mapping = self._mappings().get(self.config.mapping)
        return mapping.version if mapping else ""

    async def _check_mapping_changed(self) -> None:
        """A new mapping version resumes a destination the guard paused."""
        if self.paused and self._paused_version and self._mapping_version() != self._paused_version:
            # Only the guard's own pause ends here: not one an operator has made since.
            current = (await self.store.get_destination_states()).get(self.name)
            if current is not None and current.paused and current.extra.get("by") != "guard":
                self.apply_state(current)
                return
            # Tagged as the guard's: not an operator's "deliver now", so it keeps the backoff
            # (a Retry-After the upstream asked for), here and on every other node.
            state = DestinationState(self.name, False, "mapping changed", self.store.now(), {"by": "guard"})
            await self.store.set_destination_state(state)
            self.apply_state(state)
            self._precheck = True  # not an operator's resume: a still-broken mapping pauses again at once

    async def _pause(self, reason: str, version: str | None = None, by: str = "guard") -> None:
        """The guard's pause, or with ``by="upstream"`` one for an answer about the account (or
        a redirect), which no mapping change ends: the credentials or the URL need fixing, and
        an operator resumes. Neither replaces an operator's pause."""
        if self.paused:
            return
        # An operator may have paused from the CLI or another node since this server last
        # read the states: the store is the truth, and an operator's pause stands.
        current = (await self.store.get_destination_states()).get(self.name)
        if current is not None and current.paused:
            self.apply_state(current)
            return
        # A mapping change ends it: changed from the version that failed, not the live one
        # (which may already be the fix, loaded while this batch was being sent). Stored
        # with the pause, so a restart or another node knows it too.
        if by != "guard":
            state = DestinationState(self.name, True, reason, self.store.now(), {"by": by})
            await self.store.set_destination_state(state)
            self.apply_state(state)
            return
        failed = version or self._mapping_version()
        state = DestinationState(self.name, True, reason, self.store.now(), {"by": "guard", "version": failed})
        await self.store.set_destination_state(state)
        self._paused_version = failed
        self.apply_state(state)

    # -- the loop ----------------------------------------------------------------------
    # Pipelining: a loop sends one batch at a time, but leases and maps the next one while
    # the previous is on the wire, so the core is not idle during the upstream's round
    # trips. The next lease passes the previous batch's jobs as ``ahead`` (Store.lease):
    # they are not leased again and do not hold back their users' later jobs. In exchange
    # the new batch sends nothing before the previous one has settled, and then gives
    # back, unsent, every job of a user with an older job in the previous batch that was
    # not delivered (retried or given back): per-user order holds as if the two batches
    # had been leased one after the other. At most two batches are alive per loop.
    # Only a destination's single loop pipelines (``concurrency: 1``): with several, each
    # loop's next lease also skips every user of the other loops' two batches, and the
    # leases fragment (bench: CPU per delivered event 32-38 us with two pipelined loops,
    # against 21-22 with two plain ones and 19-20 with one pipelined loop).
    async def _loop(self) -> None:
        cfg = self.config.delivery
        pipelined = cfg.concurrency == 1
        previous: _Batch | None = None
        alive: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping:
                held = self._hold_until - time.monotonic()
                if held > 0:
                    await self._sleep(min(held, cfg.poll_interval * 10))
                    continue
                flying = previous if previous is not None and not previous.finished else None
                jobs = []
                try:
                    await self._check_mapping_changed()
                    if not self.paused:
                        jobs = await self.store.lease(
                            self.name,
                            cfg.batch_size,
                            cfg.lease_seconds,
                            ordered=cfg.ordered,
                            ahead=flying.jobs.keys() if flying is not None else (),
                        )
                        # Only a lease says the store answers again: a paused loop asks nothing.
                        self._lease_failures.succeeded()
                except Exception as exc:
                    self._lease_failures.failed(exc)
                if not jobs:
                    if flying is not None:
                        # Its users may have more jobs waiting: lease again once it settles.
                        await flying.done()
                        continue
                    await self._sleep(self._lease_failures.backoff(cfg.poll_interval, LEASE_RETRY_CAP))
                    continue
                batch = self._batch(jobs, after=flying)
                batch.task = asyncio.create_task(self.deliver(batch), name=f"batch:{self.name}")
                alive.add(batch.task)
                batch.task.add_done_callback(alive.discard)
                if not pipelined:
                    await batch.done()
                # The next lease waits until this batch is mapped (its successor would
                # compete with it for the core) and the one before it has settled.
                await batch.mapped.wait()
                if flying is not None:
                    await flying.done()
                previous = batch
        except asyncio.CancelledError:
            for task in alive:
                task.cancel()  # cancelled with the loop (stop's timeout): their jobs are given back
            raise
        finally:
            if alive:
                await asyncio.wait(set(alive))

    def _batch(self, jobs: list[Job], after: _Batch | None) -> _Batch:
        # No request starts after half the lease, and a request cannot outlive the
        # timeout (config: lease_seconds > 2 x request_timeout), so every job is settled
        # while its lease still holds: no other worker or node can lease it meanwhile.
        deadline = time.monotonic() + self.config.delivery.lease_seconds / 2
        # Both maps built in C (zip over attrgetters), not by a Python step per job.
        ids = list(map(_JOB_ID, jobs))
        fence = dict(zip(ids, map(_ATTEMPTS, jobs), strict=True))
        return _Batch(dict(zip(ids, jobs, strict=True)), deadline, fence=fence, after=after)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early for new work or shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def deliver(self, batch: _Batch) -> None:
        try:
            await self._deliver(batch)
        except Exception as exc:
            log.exception("delivery_failed", destination=self.name, jobs=len(batch.jobs))
            await self._recover(batch, exc)
        finally:
            batch.mapped.set()
            batch.after = None  # a settled batch need not keep its predecessor alive
            unsettled = list(filterfalse(batch.settled.__contains__, batch.jobs))  # in C
            if unsettled:
                await asyncio.shield(self._give_back(batch, unsettled))

    async def _give_back(self, batch: _Batch, unsettled: list[int]) -> None:
        """Stopped mid-way (shutdown): ack what the upstream already accepted, so a restart
        does not send it again, and give the rest back now rather than at lease expiry."""
        delivered = [j for j in unsettled if batch.fully_delivered(j)]
        done = set(delivered)
        rest = [j for j in unsettled if j not in done]
        with contextlib.suppress(Exception):
            if delivered:
                await self.store.ack(delivered, batch.version, fence=batch.fence, **batch.link_changes(delivered))
                batch.passed.update(delivered)
                self.metrics.delivered(self.name, len(delivered))
            if rest:
                await self.store.release(rest, fence=batch.fence, delivered=batch.delivered_outputs(rest))

    async def _recover(self, batch: _Batch, exc: Exception) -> None:
        """A failure of our own (not the upstream's): retry later with backoff, counting
        the attempt, so a fault that repeats is not a hot loop and ends in the DLQ."""
        now = self.store.now()
        # Kept and shown (DLQ, status): a fault's text may quote a credential (a DSN, a
        # header). Redacted before it is cut, so none is kept in part.
        error = redact_text(f"internal error: {type(exc).__name__}: {exc}")[:MAX_KEPT_BODY]
        try:
            # What the upstream already accepted is done: retrying it would send it twice.
            delivered = [j for j in batch.jobs if j not in batch.settled and batch.fully_delivered(j)]
            if delivered:
                await self.store.ack(delivered, batch.version, fence=batch.fence, **batch.link_changes(delivered))
                batch.settled.update(delivered)
                batch.passed.update(delivered)
                self.metrics.delivered(self.name, len(delivered))
                self.guard.record(len(delivered), 0)  # good outcomes, as any ack's
            dead: list[DeadLetter] = []
            retries = RetrySchedule(self.policy, now)
            for job_id, job in batch.jobs.items():
                if job_id in batch.settled:
                    continue
                if self.policy.exhausted(job.attempts, job.first_attempt_at, now):
                    # The version that mapped it, as any dead letter carries: which version
                    # met the fault is what an operator replaying after a fix looks for.
                    dead.append(
                        DeadLetter(
                            job_id,
                            "internal_error",
                            response_body=error,
                            label=batch.label(job_id),
                            mapping_version=batch.version,
                        )
                    )
                else:
                    retries.add(job_id, job.attempts, None)
            # What went out of a job before the fault is not sent again by its retry.
            sent = batch.delivered_outputs([j for ids in retries.groups.values() for j in ids])
            for at, ids in retries.groups.items():
                await self.store.retry(ids, at, error, fence=batch.fence, delivered=sent)
                batch.settled.update(ids)
            if dead:
                await self._dead_letter(batch, dead)
        except Exception:
            log.exception("delivery_recovery_failed", destination=self.name)

    async def _deliver(self, batch: _Batch) -> None:
        mapping = self._mappings().get(self.config.mapping)
        if mapping is None:
            await self._pause(f"mapping {self.config.mapping!r} is not loaded")
            return
        batch.version = mapping.version
        items, job_items = await self._map(batch, mapping)
        batch.mapped.set()
        if batch.after is not None:
            await batch.after.done()
            items = self._hold_back(batch, items, job_items)
        if batch.guard_reason:
            await self._pause(batch.guard_reason, batch.version, by=batch.pause_by)
            return  # the jobs are released by deliver()
        if self._guard_trips():
            await self._pause_for_guard()
            return  # the mapped jobs are released by deliver()
        requests = self._pack(items, batch) if items else []
        if self.config.delivery.ordered:
            for i, request in enumerate(requests):
                if not await self._send(request, batch, ordered=True):
                    # Later requests may hold the same users' later events: keep their order
                    # by not sending them before the failed ones.
                    for later in requests[i + 1 :]:
                        batch.unsent.update(it.job_id for it in later.items)
                    break
        else:
            barriers = self.client.ORDER_BARRIER_KINDS
            last: list[Request] = []
            if barriers:
                last = [r for r in requests if any(it.output.kind in barriers for it in r.items)]
                if last:
                    requests = [r for r in requests if r not in last]
            # Sent at once, a follower in another request than its leader (a Track Device
            # beside its user's Track User) could reach the upstream first: it goes in a
            # second round, once its leader's request is judged (sent only if accepted).
            followers: list[Item] = []
            if batch.leaders:
                requests, followers = _part_followers(requests, batch.leaders)
            await self._send_together(requests, batch)
            if followers:
                await self._send_together(self.client.pack(followers), batch)
            if last:
                await self._send_barriers(last, batch)
        await self._settle(batch, job_items, mapping.version)

    def _pack(self, items: list[Item], batch: _Batch) -> list[Request]:
        """The batch's requests, in its items' order. A job past its retry budget goes in a
        request of its own (see _alone): the others of a request refused for now, again and
        again, because of one event (a 5xx or a time-out its content causes) are delivered,
        and only that event is dead-lettered."""
        # In C, one look at the batch's counts: a job is past the budget only once its
        # attempts are past min_attempts, which nearly no batch's are.
        if max(batch.fence.values(), default=0) <= self.policy.config.min_attempts:
            return self.client.pack(items)
        now = self.store.now()
        exhausted = self.policy.exhausted
        # Its attempt before this one was past the budget already (this one counted too).
        last = {job_id for job_id, job in batch.jobs.items() if exhausted(job.attempts - 1, job.first_attempt_at, now)}
        if not last:
            return self.client.pack(items)
        # Cut where such a job's items are, in order: each user's requests still go in the
        # order of its jobs (ordered delivery sends them one after the other).
        requests: list[Request] = []
        run: list[Item] = []
        i = 0
        while i < len(items):
            job_id = items[i].job_id
            if job_id not in last:
                run.append(items[i])
                i += 1
                continue
            if run:
                requests += self.client.pack(run)
                run = []
            j = i
            while j < len(items) and items[j].job_id == job_id:
                j += 1
            requests += self.client.pack(items[i:j])
            i = j
        if run:
            requests += self.client.pack(run)
        return requests

    async def _send_together(self, requests: list[Request], batch: _Batch) -> None:
        """Unordered delivery: send ``requests`` at once. Every request finishes before
        anything is settled or recovered: were one to fail and the rest be recovered while
        still in flight, their 200s would land on jobs already scheduled again, and those
        events would be sent twice."""
        outcomes = await asyncio.gather(
            *(self._send(r, batch, ordered=False) for r in requests), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _send_barriers(self, requests: list[Request], batch: _Batch) -> None:
        """Unordered delivery: send, one after the other, the requests of jobs that may not
        overtake their users' earlier jobs (Destination.ORDER_BARRIER_KINDS), once the rest
        of the batch is settled. A job whose user has an earlier job not delivered, in this
        batch or still in the store (waiting for a retry, or leased by another loop or
        node), is deferred: due again after retry.base_delay, its wait not taken for a
        failed attempt."""
        for request in requests:
            job_ids = sorted({it.job_id for it in request.items})
            # Jobs of this very request go out together, in their order (a Merge User call
            # takes many merges): one never waits for another, or both waited for good.
            together = set(job_ids)
            blocked = False
            for job_id in job_ids:
                users = [u for u in batch.jobs[job_id].ordering_key.split(KEY_SEPARATOR) if u]
                if not users:
                    continue
                for other_id, other in batch.jobs.items():
                    if (
                        other_id < job_id
                        and other_id not in together
                        and other_id not in batch.passed
                        and not batch.fully_delivered(other_id)
                        and any(u in other.ordering_key.split(KEY_SEPARATOR) for u in users)
                    ):
                        blocked = True
                        break
                if blocked:
                    break
                # Earlier jobs outside this batch (this batch's own are settled or judged above).
                if await self.store.users_waiting(self.name, job_id, users, ignore=batch.jobs.keys()):
                    blocked = True
                    break
            if blocked:
                batch.deferred.update(job_ids)
                log.info("delivery_deferred", destination=self.name, jobs=len(job_ids), reason="user_has_earlier_jobs")
                continue
            await self._send(request, batch, ordered=False)

    def _hold_back(self, batch: _Batch, items: list[Item], job_items: dict[int, list[Item]]) -> list[Item]:
        """After the previous batch settled: mark unsent (given back, the attempt not
        counted) what may not go out now, and return the items that may."""
        previous, batch.after = batch.after, None
        if previous is None or not job_items:
            return items
        if self.paused:
            # The previous batch paused the destination: nothing more goes out.
            batch.unsent.update(job_items)
            return []
        if not self.config.delivery.ordered:
            return items
        held = previous.holds()
        if not held:
            return items
        _hold_users(batch, held, job_items)
        return [it for it in items if it.job_id not in batch.unsent] if batch.unsent else items

    async def _map(self, batch: _Batch, mapping: CompiledMapping) -> tuple[list[Item], dict[int, list[Item]]]:
        events = batch.events
        dead: list[DeadLetter] = []  # the mapping's failures: the bad-deploy guard counts these
        data_dead: list[DeadLetter] = []  # the events' own faults: dead-lettered one by one
        try:
            # The whole lease parsed in C, not by a Python step a job. (batch.jobs is by id.)
            events.update(zip(batch.jobs, map(orjson.loads, map(_PAYLOAD, batch.jobs.values())), strict=True))
        except orjson.JSONDecodeError:
            # A payload that is not JSON (ingest never stores one): job by job, to find it.
            # Those parsed before it are parsed again, in place (the dict keeps their order).
            for job in batch.jobs.values():
                try:
                    events[job.id] = orjson.loads(job.payload)
                except orjson.JSONDecodeError:
                    data_dead.append(DeadLetter(job.id, "corrupt_payload", mapping_version=mapping.version))
        options = self.config.mapping_options
        # identity_ids gives [] for an event that is not a JSON object.
        identity_ids = mapping.identity_ids
        ids = {job_id: identity_ids(e, options) for job_id, e in events.items()}
        # One union in C, not a Python step per id.
        wanted = sorted(set().union(*ids.values()))
        links = await self.store.resolve_links(self.name, wanted) if wanted else {}
        discards: list[Discard] = []
        done: list[int] = []  # jobs whose every output an earlier attempt delivered
        items: list[Item] = []
        job_items: dict[int, list[Item]] = {}
        # With no links in the batch every event of a source is mapped in the same context:
        # one (frozen, so shareable) object per source instead of one per event.
        plain: dict[str, MapContext] = {}
        reject_reason = self.client.reject_reason
        erase_kinds = self.client.ERASE_KINDS
        merge_fields = self.client.MERGE_FIELDS
        link_kinds = erase_kinds.union(merge_fields)
        followers = self.client.FOLLOWERS
        # The deletions and merges this batch's jobs come after: the previous batch's, in
        # flight, and those of this one met so far (see _uses_changed_links).
        after = batch.after
        erasures = dict(after.erases) if after is not None and after.erases else {}
        merges = dict(after.merges) if after is not None and after.merges else {}
        for job_id, event in events.items():
            job = batch.jobs[job_id]
            if links:
                ctx = link_context(mapping, event, links, options=options, source=job.source, ids=ids[job_id])
            else:
                ctx = plain.get(job.source) or plain.setdefault(job.source, MapContext(None, options, job.source))
            result = mapping.apply(event, ctx)
            if isinstance(result, Discarded):
                discards.append(Discard(job_id, result.reason, batch.label(job_id), result.detail))
                continue
            if isinstance(result, Failed):
                dead.append(
                    DeadLetter(
                        job_id,
                        f"mapping_{result.reason}",
                        response_body=result.detail,
                        label=batch.label(job_id),
                        mapping_version=mapping.version,
                    )
                )
                continue
            try:
                if len(result) == 1:
                    # Most events map to one output: made without a comprehension, which is a
                    # function call of its own (Python 3.11), costing more than the Item.
                    out = result[0]
                    mine = [Item(job_id, out, orjson.dumps(out.body))]
                else:
                    mine = [Item(job_id, out, orjson.dumps(out.body)) for out in result]
            except orjson.JSONEncodeError as exc:
                # Mapped, but not writable as JSON (nested past orjson's 254 levels): this
                # event can never be sent. Dead-lettered alone, as a request that cannot be
                # built is; raised, it failed its whole batch again and again.
                data_dead.append(
                    DeadLetter(
                        job_id,
                        "render_error",
                        response_body=f"the mapped event cannot be written as JSON: {exc}",
                        label=batch.label(job_id),
                        mapping_version=mapping.version,
                    )
                )
                continue
            if not mine:
                discards.append(Discard(job_id, "no_output", batch.label(job_id)))
                continue
            # In C (no generator a mapped event): deletions and merges are rare, every event asks.
            if link_kinds and not link_kinds.isdisjoint(map(_KIND, result)):
                if not erase_kinds.isdisjoint(map(_KIND, result)):
                    batch.erases[job_id] = erasures[job_id] = _erased_ids(ids[job_id], links)
                pairs = _merged_pairs(result, merge_fields)
                if pairs:
                    batch.merges[job_id] = merges[job_id] = pairs
            if job.delivered_outputs:
                mine = self._not_yet_delivered(job, mine)
                if not mine:
                    done.append(job_id)
                    continue
            # A plain loop, not next() over a generator: it runs for every mapped event.
            for item in mine:
                reason = reject_reason(item)
                if reason:
                    break
            if reason:
                # Mapped to something the destination cannot take (over its size limit, a
                # kind it has no endpoint for): dead-lettered, not discarded, so it is seen
                # and replayed once a mapping change makes it fit.
                (data_dead if reason in self.client.DATA_REJECTIONS else dead).append(
                    DeadLetter(
                        job_id,
                        reason,
                        response_body=self.client.rejection_detail(item, reason),
                        request_body=item.encoded,
                        label=batch.label(job_id),
                        mapping_version=mapping.version,
                    )
                )
                continue
            job_items[job_id] = mine
            if len(mine) > 1 and followers:
                _find_leaders(mine, followers, batch.leaders)
            if (erasures or merges) and _uses_changed_links(job_id, ids[job_id], links, erasures, merges):
                # Mapped with a link a deletion before it erases once delivered, or naming
                # a user a merge before it merges away: given back unsent (its attempt not
                # counted), and mapped again after that deletion or merge.
                batch.unsent.add(job_id)
                continue
            items.extend(mine)
        # Every job with items has them all to judge yet: counted in C, after the loop.
        batch.items_left.update(zip(job_items, map(len, job_items.values()), strict=True))
        if batch.unsent and self.config.delivery.ordered:
            # Its users' later jobs here wait with it (sent, an event of an alias's retained
            # user overtook the alias), as the next batch's wait for this one (_hold_back).
            held: dict[str, int] = {}
            for job_id in sorted(batch.unsent):
                for user in filter(None, batch.jobs[job_id].ordering_key.split(KEY_SEPARATOR)):
                    held.setdefault(user, job_id)
            _hold_users(batch, held, job_items)
            items = [it for it in items if it.job_id not in batch.unsent]
        if discards:
            await self.store.discard(discards, fence=batch.fence)
            batch.settled.update(d.job_id for d in discards)
            batch.passed.update(d.job_id for d in discards)
            for d in discards:
                self.metrics.discarded(batch.jobs[d.job_id].source, self.name, d.reason, 1)
                self.discarded[d.reason] += 1
        if done:
            # Nothing left to send: delivered, and counted as delivered now, once (the
            # attempts that sent its outputs did not count it, since it stayed queued),
            # by the metrics and by the bad-deploy guard alike, as _settle counts an ack.
            await self.store.ack(done, mapping.version, fence=batch.fence, **batch.link_changes(done))
            batch.settled.update(done)
            batch.passed.update(done)
            self.metrics.delivered(self.name, len(done))
            self.guard.record(len(done), 0)
        if dead:
            # The batch's good outcomes still to come (those acked above are counted already).
            mapped = len(events) - len(dead) - sum(1 for d in data_dead if d.job_id in events) - len(done)
            if self._precheck and self.guard.would_trip(len(dead), delivered=mapped):
                # A bad mapping deploy: pause (it resumes when the mapping changes) rather
                # than dead-letter every event; the failed jobs stay queued.
                first = dead[0]
                batch.guard_reason = (
                    f"{len(dead)} of {len(events)} events failed to map ({first.reason}: {first.response_body[:200]})"
                )
                return [], {}
        if dead or data_dead:
            await self._dead_letter(batch, dead + data_dead, counted=len(dead))
        return items, job_items

    def _not_yet_delivered(self, job: Job, items: list[Item]) -> list[Item]:
        """The items of ``job`` no earlier attempt delivered (see bridge/delivery/outputs.py)."""
        left = not_yet_delivered(items, job.delivered_outputs)
        if len(left) < len(items):
            # Debug: a replay of many such dead letters must not log a line an event at info.
            log.debug(
                "outputs_already_delivered",
                destination=self.name,
                message_id=job.message_id,
                skipped=len(items) - len(left),
                left=len(left),
            )
        return left

    async def _send(
        self, request: Request, batch: _Batch, *, ordered: bool, refusals: list[Response] | None = None
    ) -> bool:
        """Send one request; split or bisect on 413/400 until every item has a verdict.

        Returns False when the request (or, in ordered mode, part of it) was not sent or
        must be retried, so the caller can hold back what comes after it. ``refusals``: a
        probe's half (see _probe), whose refusal for now is added there rather than backed
        off at once, so the probe's other half still goes out."""
        if batch.leaders:
            request = self._without_unready_followers(request, batch)
            if not request.items:
                return True  # nothing left to send: the leaders' verdicts stand for their jobs
        if self._stopping or batch.guard_reason or self.paused:
            # Shutting down, about to pause, or paused (by an operator, mid-batch): start
            # nothing new. Unsent jobs are given back without counting the attempt.
            batch.unsent.update(it.job_id for it in request.items)
            return False
        cost = self.client.rate_cost(request).buckets
        now = time.monotonic()
        wait = self.limiter.wait_time(cost)
        if now < self._hold_until or now + wait > batch.deadline:
            if now >= self._hold_until and len(request.items) > 1:
                # Too many tokens to wait for within the lease: send it in smaller parts.
                return await self._send_halves(request, batch, ordered=ordered)
            if now >= self._hold_until:
                # One item that cannot get its tokens in time: come back when it can.
                self._hold_until = now + wait
            batch.unsent.update(it.job_id for it in request.items)
            return False
        async with self._slots:
            if time.monotonic() < self._hold_until or time.monotonic() > batch.deadline:
                # Waited for a connection: a backoff begun meanwhile (another request failed),
                # or the lease's deadline, holds it back as it holds back any new request.
                batch.unsent.update(it.job_id for it in request.items)
                return False
            await self.limiter.acquire(cost)
            if self._stopping or self.paused:
                # SIGTERM or a pause arrived while waiting for tokens: still nothing new after it.
                batch.unsent.update(it.job_id for it in request.items)
                return False
            started = time.monotonic()
            response = await self.client.send(request)
        self.metrics.request(self.name, response.status, time.monotonic() - started)
        action = self.policy.classify(response, len(request.items))
        if response.status == 429:
            # Paced when it took its tokens (``now``): one outage's 429s halve the rate once.
            self.limiter.throttled(cost, sent_at=now)
        elif action is Action.DELIVERED:
            self.limiter.succeeded(cost)
        if action in (Action.SPLIT, Action.BISECT):
            return await self._send_halves(request, batch, ordered=ordered)
        splittable = (
            action is Action.RETRY
            and response.status != 429
            and response.retry_after is None  # the upstream asked for a wait: not a poison's answer
            and len(request.items) > 1
            and batch.retry_splits < RETRY_SPLITS
        )
        if splittable and self._refused_while_accepting(request):
            # Refused again, though the upstream took other requests since these were last
            # refused: not an outage but something in them (one event whose content fails
            # the upstream, every time). Bisected now, without a backoff, so its
            # request-mates are delivered rather than wait out the retry budget. Remembered
            # first: a half is bisected again only if the upstream accepts something after
            # this refusal (the other half), so an upstream that went down meanwhile gets
            # a request or two more, never a request an event.
            batch.retry_splits += 1
            self._remember_refusal(request)
            self._attempt_failed(request, response, "bisect")
            return await self._send_halves(request, batch, ordered=ordered)
        if splittable and self._worth_a_probe(request, batch):
            # No evidence either way (nothing accepted at this endpoint since), after
            # refusals enough to exclude a blip: find some (see _probe).
            batch.retry_splits += 1
            self._remember_refusal(request)
            self._attempt_failed(request, response, "probe")
            return await self._probe(request, batch, ordered=ordered)
        if action is Action.PAUSE:
            # The account refused (retry.pause_statuses): its answer is about the
            # credentials, not these events, so the next ones would get it too. Pause at
            # once, whatever the guard has counted, and even right after a resume. No
            # mapping change ends it: the credentials or the URL need fixing.
            return self._hold_for_pause(request, batch, response, by="upstream")
        job_ids = list(map(_ITEM_JOB, request.items))
        jobs = set(job_ids)
        if action is Action.DEAD:
            if self._precheck and self.guard.would_trip(batch.dead_pending + len(jobs), batch.delivered_pending):
                # A whole request refused for good (a bad credential or mapping deploy):
                # pause instead of dead-lettering it; these jobs stay queued.
                return self._hold_for_pause(request, batch, response)
            batch.dead_pending += len(jobs)
        elif action is Action.DELIVERED:
            batch.delivered_pending += len(jobs)
            batch.accepted.append(request)
            if batch.leaders:
                batch.accepted_ids.update(map(id, request.items))
            self.last_delivered_at = self.store.now()
            self._accepted_at[request.endpoint] = time.monotonic()
            if self._refused_at:
                for it in request.items:
                    self._refused_at.pop(it.job_id, None)
        if action is Action.RETRY:
            if refusals is not None and response.status != 429 and response.retry_after is None:
                refusals.append(response)  # backed off once the probe's other half is sent
            else:
                self._back_off(response)
            self._remember_refusal(request)
        else:
            self._failure_streak = 0
        if action is not Action.DELIVERED:
            self._attempt_failed(request, response, action.value)
        verdict = Verdict(action, response, request)  # the same for every item: one object
        if len(jobs) == len(job_ids) and batch.verdicts.keys().isdisjoint(jobs):
            _judge_first(batch, job_ids, verdict)
        else:
            _judge(batch, job_ids, verdict)
        return action is not Action.RETRY

    def _refused_while_accepting(self, request: Request) -> bool:
        """Whether a job of ``request`` was refused for now before the upstream last
        accepted a request at its endpoint: it takes others, and refused this one again. Not
        so in an outage (nothing accepted since), when splitting would only multiply requests.
        Nor in an outage of this endpoint alone (MoEngage's Merge User down while Bulk Import
        takes the tracks): another endpoint's acceptances said nothing of it, and each retry
        of its requests was bisected at once, down to a request an item."""
        refused = self._refused_at
        if not refused:
            return False
        accepted = self._accepted_at.get(request.endpoint)
        if accepted is None:
            return False
        return any(refused.get(it.job_id, accepted) < accepted for it in request.items)

    def _remember_refusal(self, request: Request) -> None:
        refused = self._refused_at
        now = time.monotonic()
        for it in request.items:
            refused.pop(it.job_id, None)  # re-inserted last: the dict stays in refusal order
            refused[it.job_id] = now
        _forget_oldest(refused)

    def _worth_a_probe(self, request: Request, batch: _Batch) -> bool:
        """Whether ``request``, refused for now with no evidence that the upstream is up
        (see _refused_while_accepting), is to be probed: this batch attempt probed nothing
        yet, and one of its jobs, not probed at this attempt count, was refused for now on
        its last attempt and tried at least PROBE_AFTER times before this one. Marks its
        jobs probed if so."""
        if batch.probed:
            return False
        refused, probed, jobs = self._refused_at, self._probed, batch.jobs
        if not any(
            it.job_id in refused
            and jobs[it.job_id].attempts > PROBE_AFTER
            and probed.get(it.job_id, 0) < jobs[it.job_id].attempts
            for it in request.items
        ):
            return False
        batch.probed = True
        for it in request.items:
            probed.pop(it.job_id, None)
            probed[it.job_id] = jobs[it.job_id].attempts
        _forget_oldest(probed)
        return True

    async def _probe(self, request: Request, batch: _Batch, *, ordered: bool) -> bool:
        """Send ``request``'s two halves once. Either accepted is the evidence that the
        upstream is up, and the other half, or these jobs' next attempt, is bisected
        (_refused_while_accepting). Both refused is probably an outage: backed off then,
        as any refusal is; the halves are not probed again before their next attempt.
        A half's refusal is backed off only once both are sent, so the second goes out
        even when the first is refused (the hold that refusal began would have given it
        back unsent, and one half only found nothing when the poison was in it). In
        ordered delivery the halves are cut between users (_apart_by_users) so that the
        second may go out whatever became of the first; where no such cut exists, a
        refused first half holds back the second, as ever."""
        halves = _apart_by_users(request, batch) if ordered else None
        first, second = halves or request.split()
        refusals: list[Response] = []
        delivered = await self._send(first, batch, ordered=ordered, refusals=refusals)
        if not delivered and ordered and halves is None:
            batch.unsent.update(it.job_id for it in second.items)
        else:
            delivered = await self._send(second, batch, ordered=ordered, refusals=refusals) and delivered
        if refusals:
            self._back_off(refusals[-1])
        return delivered

    def _without_unready_followers(self, request: Request, batch: _Batch) -> Request:
        """``request`` without its followers whose leader was not accepted (retried,
        dead-lettered, not sent) and is not in ``request`` before them. Such a follower is
        not sent in this attempt: its job keeps its leader's verdict, and its next attempt
        or replay sends both (the upstream has nothing of it to skip)."""
        leaders, accepted = batch.leaders, batch.accepted_ids
        here: set[int] | None = None
        kept: list[Item] = []
        for it in request.items:
            leader = leaders.get(id(it))
            if leader is not None and id(leader) not in accepted:
                if here is None:
                    here = set(map(id, request.items))
                if id(leader) not in here:
                    verdict = batch.verdicts.get(it.job_id)
                    if verdict is None or verdict.action is Action.DELIVERED:
                        # Its leader has no verdict to stand for the job (never the case in the
                        # order the engine sends): given back, not acked without this item.
                        batch.unsent.add(it.job_id)
                    continue
            kept.append(it)
        if len(kept) == len(request.items):
            return request
        log.debug("followers_held", destination=self.name, held=len(request.items) - len(kept))
        return Request(request.endpoint, kept)

    def _hold_for_pause(self, request: Request, batch: _Batch, response: Response, by: str = "guard") -> bool:
        """Send nothing more of ``batch``; its jobs stay queued and the destination pauses
        once it settles. Returns False, as for a request not delivered."""
        jobs = {it.job_id for it in request.items}
        # The reason is kept and shown (status, logs): never with an echoed credential.
        # Redacted before it is cut: a credential straddling the cut would otherwise be
        # kept in part.
        batch.guard_reason = (
            f"{self.name} refused {len(jobs)} events with HTTP {response.status}: "
            f"{redact_text(response.body or response.error or '')[:200]}"
        )
        batch.pause_by = by
        batch.unsent.update(jobs)
        self._attempt_failed(request, response, "pause")
        return False

    def _attempt_failed(self, request: Request, response: Response, action: str) -> None:
        """One warning per request not delivered, and the same facts kept for /admin/status.
        The body is redacted before it is cut, so no credential it echoes is kept in part."""
        body = redact_text(response.body)[:300]
        log.warning(
            "delivery_attempt_failed",
            destination=self.name,
            status=response.status,
            error=response.error,
            items=len(request.items),
            action=action,
            body=body,
        )
        self.last_failure = {
            "at": self.store.now(),
            "status": response.status,
            "error": redact_text(response.error or "")[:300] or None,
            "action": action,
            "items": len(request.items),
            "body": body,
        }

    def backing_off_seconds(self) -> float:
        """How long the destination-wide backoff (Retry-After, or a run of failures) still
        holds every new request back; 0 when it does not."""
        return max(0.0, self._hold_until - time.monotonic())

    async def _send_halves(self, request: Request, batch: _Batch, *, ordered: bool) -> bool:
        first, second = request.split()
        if not await self._send(first, batch, ordered=ordered) and ordered:
            batch.unsent.update(it.job_id for it in second.items)
            return False
        return await self._send(second, batch, ordered=ordered)

    def _back_off(self, response: Response) -> None:
        """Hold the whole destination: honour Retry-After, and back off exponentially while
        failures continue, instead of firing new requests at an upstream that is down."""
        now = time.monotonic()
        if now < self._hold_until:
            # Already holding: no request starts during a hold, so this one was on the wire
            # with the failure that began it, one failure of the upstream, not the next. Counted
            # each, a blip that failed an unordered batch's 20 requests held the destination
            # for base_delay x 2^19, i.e. max_delay (5 min), instead of base_delay.
            if response.retry_after is not None:
                self._hold_until = max(self._hold_until, now + self.policy.delay(0, response.retry_after))
            return
        self._failure_streak += 1
        delay = self.policy.delay(self._failure_streak, response.retry_after)
        self._hold_until = max(self._hold_until, now + delay)

    async def _settle(self, batch: _Batch, job_items: dict[int, list[Item]], version: str) -> None:
        now = self.store.now()
        acked: list[int] = []
        dead: list[DeadLetter] = []
        retries = RetrySchedule(self.policy, now)
        unsent: list[int] = []
        deferred: list[int] = []
        shared: dict[int, dict[int, list[Item]]] = {}  # see _request_for_record
        if _all_delivered(batch, job_items):
            # Nearly every batch: all acked, in C, with nothing to sort out job by job below.
            acked = list(job_items)
        for job_id in () if acked else job_items:
            job = batch.jobs[job_id]
            verdict = batch.verdicts.get(job_id)
            if job_id in batch.deferred and (verdict is None or verdict.action is Action.DELIVERED):
                # Only a job with nothing refused waits uncounted: one with an output refused
                # for good was deferred, not dead-lettered, and sent that output again each
                # time (its attempt never counted), for as long as its user's earlier job waited.
                deferred.append(job_id)
                continue
            if verdict is None or (job_id in batch.unsent and verdict.action is Action.DELIVERED):
                unsent.append(job_id)  # some item never went out: released, attempt not counted
                continue
            # A job refused, for now or for good, is judged, its attempt counted, even with items
            # not sent (held back behind the failed one, in order): given back uncounted, a job
            # whose first request always failed never spent its retry budget, and was tried for
            # as long as the upstream failed, never dead-lettered. So was one refused for good
            # that a later output's failure for now outranked. Its retry, or its replay, sends
            # what was not accepted (delivered_outputs, below).
            resp = verdict.response
            if verdict.action is Action.DELIVERED:
                acked.append(job_id)
            elif verdict.action is Action.RETRY:
                if self.policy.exhausted(job.attempts, job.first_attempt_at, now) and _alone(job_id, verdict):
                    body = self._request_for_record(job_id, verdict, shared)
                    dead.append(self._dead(job_id, "retries_exhausted", resp, body, batch, version))
                else:
                    retries.add(job_id, job.attempts, resp.retry_after if resp else None)
            elif batch.guard_reason or self.paused:
                # The guard tripped in this batch: the upstream refuses everything (a bad
                # deploy), and the events a bisect judged one by one before it tripped were
                # refused for the same reason. They wait with the rest for the resume. So do
                # those of a batch on the wire while the destination paused (the guard
                # tripped on another loop's batch, or an operator paused it): dead-lettered,
                # a few of a bad deploy's events reached the DLQ after the pause.
                unsent.append(job_id)
            else:
                body = self._request_for_record(job_id, verdict, shared)
                dead.append(self._dead(job_id, _dead_reason(resp), resp, body, batch, version))
        if acked:
            await self.store.ack(acked, version, fence=batch.fence, **batch.link_changes(acked))
            batch.settled.update(acked)
            batch.passed.update(acked)
            self.metrics.delivered(self.name, len(acked))
        # A job that stays queued keeps what of it went out, so its next attempt sends the rest
        # only. A deferred one too: its Track User accepted before its merge was held back was
        # otherwise sent again once the merge could go.
        delivered = batch.delivered_outputs([*unsent, *deferred, *(j for ids in retries.groups.values() for j in ids)])
        for at, ids in retries.groups.items():
            error = _describe(batch.verdicts[ids[0]].response)
            await self.store.retry(ids, at, error, fence=batch.fence, delivered=delivered)
            batch.settled.update(ids)
        if dead:
            await self._dead_letter(batch, dead)
        if unsent:
            await self.store.release(unsent, fence=batch.fence, delivered=delivered)
            batch.settled.update(unsent)
        if deferred:
            # Not released (due at once, an unordered lease would take it straight back and
            # spin): due again after the base delay, waiting for the user's earlier jobs.
            # Deferred, not retried: nothing was tried, so the wait counts no attempt. Counted,
            # a deletion waiting out a long retry of its user's events spent its own retry
            # budget, and its first failure once sent went straight to the DLQ.
            # At least DEFER_SECONDS: with `retry.base_delay: 0` (allowed) it was due again at
            # once, leased and checked in a tight loop while the user's earlier jobs waited.
            wait = "waiting for the user's earlier events to be delivered"
            due = now + max(self.config.retry.base_delay, DEFER_SECONDS)
            await self.store.defer(deferred, due, wait, fence=batch.fence, delivered=delivered)
            batch.settled.update(deferred)
        self.guard.record(len(acked), 0)
        self._precheck = True
        if batch.guard_reason:
            await self._pause(batch.guard_reason, batch.version, by=batch.pause_by)
        elif self._guard_trips():
            await self._pause_for_guard(batch.version)

    def _request_for_record(self, job_id: int, verdict: Verdict, shared: dict[int, dict[int, list[Item]]]) -> bytes:
        """The request of ``job_id``'s verdict as its dead letter keeps it: the one its own
        items alone make, credentials removed, i.e. what re-sending this event would post.
        A request carries many jobs' items (a Bulk Import of hundreds of users' events):
        kept whole under each of its jobs, one failed request wrote its size times its job
        count to the DLQ, and each entry showed the other users' events. ``shared``: each
        shared request's items by job (id(verdict) -> job -> items), grouped once for all
        its jobs."""
        request = verdict.request
        if request is None:
            return b""
        if len(request.items) > 1:
            by_job = shared.get(id(verdict))
            if by_job is None:
                by_job = shared[id(verdict)] = {}
                for it in request.items:
                    by_job.setdefault(it.job_id, []).append(it)
            if len(by_job) > 1:
                request = Request(request.endpoint, by_job[job_id])
        if verdict.response is not None and verdict.response.failure:
            # A request that could not be built is kept as its items: rendering it again
            # would fail again.
            return json_array(request.items)
        return self.client.render_for_record(request)

    def _guard_trips(self) -> bool:
        return self.guard.tripped() and not self.paused

    async def _pause_for_guard(self, version: str | None = None) -> None:
        ratio, size = self.guard.ratio, self.guard.size
        await self._pause(f"{ratio:.0%} of the last {size} deliveries were dead-lettered", version)

    def _dead(
        self, job_id: int, reason: str, resp: Response | None, body: bytes, batch: _Batch, version: str
    ) -> DeadLetter:
        return DeadLetter(
            job_id,
            reason,
            status=resp.status if resp and resp.status else None,
            # An upstream may echo our credentials back (a 401 quoting the header): never keep them.
            response_body=redact_text(resp.body or resp.error or "")[:MAX_KEPT_BODY] if resp else "",
            request_body=body,
            label=batch.label(job_id),
            mapping_version=version,
        )

    async def _dead_letter(self, batch: _Batch, dead: list[DeadLetter], *, counted: int | None = None) -> None:
        """``counted``: how many of ``dead`` the bad-deploy guard sees (default all); the
        events' own faults are not a deploy's."""
        # A job dead-lettered after some of its outputs went out keeps them, so a replay
        # sends the rest only. (One with none new keeps what the job recorded before.)
        delivered = batch.delivered_outputs([d.job_id for d in dead])
        if delivered:
            dead = [replace(d, delivered_outputs=delivered[d.job_id]) if d.job_id in delivered else d for d in dead]
        await self.store.dead_letter(dead, fence=batch.fence)
        batch.settled.update(d.job_id for d in dead)
        batch.passed.update(d.job_id for d in dead)
        self.guard.record(0, len(dead) if counted is None else counted)
        for d in dead:
            self.metrics.dead_lettered(self.name, d.reason, 1)
            log.warning(
                "dead_lettered",
                destination=self.name,
                reason=d.reason,
                status=d.status,
                event_name=d.label,
                message_id=batch.jobs[d.job_id].message_id,
            )


def _apart_by_users(request: Request, batch: _Batch) -> tuple[Request, Request] | None:
    """``request``'s items in two parts that share no user, the first about half of them
    (whole groups of jobs linked by a user, in the order they first appear), each in the
    request's order: ordered delivery may send the second before the first is delivered.
    None when there is no such cut (one user's events, or users chained through all of them)."""
    jobs = batch.jobs
    group: dict[int, int] = {}  # job -> a job of its group (union-find, by path halving)
    first_job: dict[str, int] = {}  # user -> the first job of the request that names it

    def root(job_id: int) -> int:
        while group[job_id] != job_id:
            group[job_id] = group[group[job_id]]
            job_id = group[job_id]
        return job_id

    for it in request.items:
        job_id = it.job_id
        if job_id in group:
            continue
        group[job_id] = job_id
        for user in jobs[job_id].ordering_key.split(KEY_SEPARATOR):
            if not user:
                continue
            other = first_job.setdefault(user, job_id)
            group[root(other)] = root(job_id)
    sizes = Counter(root(it.job_id) for it in request.items)  # in order of first appearance
    first_groups: set[int] = set()
    taken = 0
    for g, n in sizes.items():
        if taken >= len(request.items) // 2:
            break
        first_groups.add(g)
        taken += n
    if not 0 < taken < len(request.items):
        return None
    first = [it for it in request.items if root(it.job_id) in first_groups]
    second = [it for it in request.items if root(it.job_id) not in first_groups]
    return Request(request.endpoint, first), Request(request.endpoint, second)


def _forget_oldest(by_job: dict[int, _V]) -> None:
    """Keep ``by_job`` (in insertion order, oldest first) within REFUSALS_KEPT: a job
    forgotten is retried whole as before, never lost."""
    if len(by_job) > REFUSALS_KEPT:
        for job_id in list(islice(by_job, len(by_job) - REFUSALS_KEPT // 2)):
            del by_job[job_id]


def _hold_users(batch: _Batch, held: dict[str, int], job_items: Mapping[int, list[Item]]) -> None:
    """Mark unsent (given back, the attempt not counted) every job of ``job_items`` with an
    older job of one of its users held back: ``held`` is {user: the oldest such job id}."""
    for job_id in sorted(batch.jobs):  # in id order, so a held job passes its hold on
        key = batch.jobs[job_id].ordering_key
        if not key:
            continue
        users = key.split(KEY_SEPARATOR)
        # Only an OLDER job held back delays this one: a newer one given back unsent comes
        # after it anyway.
        if any(held.get(user, job_id) < job_id for user in users):
            for user in users:
                held[user] = min(held.get(user, job_id), job_id)
            if job_id in job_items:
                batch.unsent.add(job_id)


_RANKS = {Action.DELIVERED: 0, Action.RETRY: 1, Action.DEAD: 2, Action.SPLIT: 2, Action.BISECT: 2, Action.PAUSE: 2}


def _erased_ids(own: Sequence[str], links: Mapping[str, str]) -> frozenset[str]:
    """The ids whose identity links a deletion erases once it is delivered (Store.ack's
    erase_links): its event's own ids and the ids they are linked to (the user it deletes).

    Erased when the deletion is delivered, not when it is ingested: the user's events
    queued before it, and the deletion itself, resolve their links when they are mapped
    for delivery; erased at ingest, they would go out under another id (the deletion
    deleting someone other than the user MoEngage holds). Erased in the ack's own
    transaction, so no job leased after the ack is mapped with them; the user's later
    jobs already mapped with them (further on in the deletion's batch, or in the next one,
    mapped while it was on the wire) are given back unsent and mapped again (_uses_erased)."""
    return frozenset([*own, *(links[i] for i in own if i in links)])


def _uses_changed_links(
    job_id: int,
    own: Sequence[str],
    links: Mapping[str, str],
    erasures: Mapping[int, frozenset[str]],
    merges: Mapping[int, tuple[tuple[str, str], ...]],
) -> bool:
    """Whether job ``job_id`` was mapped with identity links that an earlier job's ack
    changes: a link from or to one of the ids of a deletion of ``erasures`` ({job: ids}),
    which its ack erases; or, linked or not, an id of a user that a merge of ``merges``
    ({job: (merged, retained) pairs}) merges away, which its ack links to the retained
    user (sent as it was mapped, the job made the merged user again)."""
    used = {x for i in own if i in links for x in (i, links[i])}
    if used and any(e < job_id and not used.isdisjoint(ids) for e, ids in erasures.items()):
        return True
    named = used.union(own)
    return any(e < job_id and any(m in named for m, _ in pairs) for e, pairs in merges.items())


def _merged_pairs(outputs: Sequence[Output], fields: Mapping[str, tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The (merged id, retained id) pairs of ``outputs`` of a merging kind (Destination.MERGE_FIELDS)."""
    pairs = []
    for out in outputs:
        names = fields.get(out.kind)
        if names is not None and type(out.body) is dict:
            merged, retained = out.body.get(names[0]), out.body.get(names[1])
            if type(merged) is str and type(retained) is str and merged != retained:
                pairs.append((merged, retained))
    return tuple(pairs)


class _LinkChanges(TypedDict):
    erase_links: dict[int, frozenset[str]] | None
    merge_links: dict[int, tuple[tuple[str, str], ...]] | None


def _of(by_job: Mapping[int, _V], job_ids: Collection[int]) -> dict[int, _V] | None:
    """``by_job``'s entries for ``job_ids``, or None when there are none."""
    if not by_job:
        return None
    return {j: by_job[j] for j in job_ids if j in by_job} or None


def _find_leaders(items: list[Item], followers: Mapping[str, str], leaders: dict[int, Item]) -> None:
    """Record in ``leaders`` ({id(follower): leader}) each of one job's ``items`` that waits
    for an earlier one of them (Destination.FOLLOWERS): the nearest before it of its kind."""
    for n, item in enumerate(items):
        kind = followers.get(item.output.kind)
        if kind is None:
            continue
        for earlier in reversed(items[:n]):
            if earlier.output.kind == kind:
                leaders[id(item)] = earlier
                break


def _part_followers(requests: list[Request], leaders: Mapping[int, Item]) -> tuple[list[Request], list[Item]]:
    """Unordered delivery: ``requests`` without the followers whose leader is in another
    request, and those followers, in their order, for a second round. A follower after its
    leader in one request (a device in its user's Bulk Import) stays: it goes in place."""
    kept: list[Request] = []
    held: list[Item] = []
    for request in requests:
        items = request.items
        moved: list[Item] = []
        here: set[int] | None = None
        for it in items:
            leader = leaders.get(id(it))
            if leader is not None:
                if here is None:
                    here = set(map(id, items))
                if id(leader) not in here:
                    moved.append(it)
        if moved:
            held.extend(moved)
            gone = set(map(id, moved))
            items = [it for it in items if id(it) not in gone]
            if not items:
                continue
            request = Request(request.endpoint, items)
        kept.append(request)
    return kept, held


def rates_of(config: DestinationConfig) -> dict[str, float]:
    """A destination's bucket rates: the documented caps, with its `rate_limits` over them."""
    return {**config.client.rate_limits(), **config.rate_limits}


def _alone(job_id: int, verdict: Verdict) -> bool:
    """Whether the request judged ``verdict`` held ``job_id``'s items only. A job past its
    retry budget refused for now in a request shared with other jobs gets one attempt more,
    on its own (DestinationWorker._pack), rather than follow the event that failed them all
    into the dead-letter queue; refused alone, it is dead-lettered as retries_exhausted."""
    request = verdict.request
    return request is None or all(it.job_id == job_id for it in request.items)


def _rank(action: Action) -> int:
    return _RANKS[action]


def _all_delivered(batch: _Batch, job_items: Collection[int]) -> bool:
    """Whether every job of ``job_items`` was delivered whole: none deferred, none with an
    item unsent, each with a DELIVERED verdict. Asked in C, before _settle's job-by-job look."""
    if batch.deferred or batch.unsent:
        return False
    verdicts = list(filter(None, map(batch.verdicts.get, job_items)))  # a Verdict is truthy
    return len(verdicts) == len(job_items) and list(map(_ACTION, verdicts)).count(Action.DELIVERED) == len(verdicts)


def _judge(batch: _Batch, job_ids: Iterable[int], verdict: Verdict) -> None:
    """Give ``verdict`` to the jobs of a request's items (``job_ids``, one an item): one
    item fewer left to judge each, and a job with several items takes its worst verdict."""
    rank = _rank(verdict.action)
    items_left, verdicts = batch.items_left, batch.verdicts
    for job_id in job_ids:
        items_left[job_id] = items_left.get(job_id, 1) - 1
        previous = verdicts.get(job_id)
        if previous is None or rank > _rank(previous.action):
            verdicts[job_id] = verdict


def _judge_first(batch: _Batch, job_ids: list[int], verdict: Verdict) -> None:
    """_judge for a request of one item a job, none of them judged before (nearly every
    request): the same, in C rather than by a Python step an item."""
    items_left = batch.items_left
    items_left.update(zip(job_ids, map(sub, map(items_left.get, job_ids, repeat(1)), repeat(1)), strict=True))
    batch.verdicts.update(zip(job_ids, repeat(verdict)))


def _dead_reason(resp: Response | None) -> str:
    """The DLQ reason of a request refused for good: what failed, or the HTTP status."""
    if resp is not None and resp.failure:
        return resp.failure  # never sent: render_error, unknown_endpoint
    if resp is not None and resp.status == 413:
        return "payload_too_large"
    return f"http_{resp.status if resp else 0}"


def _describe(resp: Response | None) -> str:
    if resp is None:
        return "not sent"
    if resp.error:
        return redact_text(resp.error)
    return f"http {resp.status}: {redact_text(resp.body)[:200]}"  # redacted before it is cut
