"""The job store seam: what every durable store (SQLite, PostgreSQL) must do.

The model is deliberately small, after RudderStack's jobsdb and Segment's Centrifuge:

* ``enqueue`` stores a request's events durably, deduplicated per source on their
  ``message_id``, as one job per (event, destination). Concurrent callers share one
  transaction (group commit); the call returns only after that transaction is durable.
* A delivery worker ``lease``s a batch of jobs for one destination, sends them, and
  then settles each job exactly once: ``ack`` (delivered), ``retry`` (later),
  ``dead_letter`` (terminal failure, kept for replay) or ``discard`` (mapped to
  nothing on purpose, e.g. an anonymous user). A lease that is never settled expires
  and the job returns to the queue, so a crash loses nothing.
* Per-user ordering: with ``ordered=True`` a lease never hands out a job while an
  earlier job with the same ``ordering_key`` for that destination is still unsettled.

All timestamps are UNIX epoch seconds (float), read from ``Store.now()``: the store's
own clock, which every node sharing one database must agree on. All SQL is kept portable
between SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# Jobs looked at per step of ``Store.make_due``: a few milliseconds of the store each.
MAKE_DUE_STEP = 5000
# Dead letters or discards moved (a replay) or deleted (a purge) per slice, in id order,
# each slice committed alone, by every store. In one transaction, a DLQ of a million records
# (an outage past the retry budget) outlasted PostgreSQL's command_timeout, which cancelled
# it, and held SQLite's single writer, and so every ingest acknowledgement, until it was
# done. An interrupted replay has moved some records, and running it again moves the rest;
# two replays at once still move each record once.
RECORD_SLICE = 10_000


class StoreError(Exception):
    """The store could not do what was asked (I/O error, disk full, closed)."""


class StoreFull(StoreError):
    """The store is over its configured size or the disk is nearly full (backpressure)."""


class StoreInUse(StoreError):
    """Another server holds the store, which takes one (a SQLite file): an operator's mistake
    known before serving, which `bridge serve` reports as a config error, as a port in use."""


@dataclass(frozen=True, slots=True)
class IdentityLink:
    """``from_id`` is known to be the same user as ``to_id`` within ``namespace``.

    The namespace is the destination name: a link learnt for one MoEngage workspace
    is applied only to deliveries to that workspace.
    """

    namespace: str
    from_id: str
    to_id: str


class IncomingEvent(NamedTuple):
    """One validated inbound event, ready to be stored.

    A named tuple, not a frozen dataclass: ingest builds one per event, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs three times as much.
    """

    message_id: str  # dedupe key within the source; kept as the event identity downstream
    ordering_key: str  # the user the event belongs to ('' when none)
    payload: bytes  # orjson-encoded normalised event
    destinations: tuple[str, ...]  # one job is created per destination
    links: tuple[IdentityLink, ...] = ()  # identity links learnt from this event


class EnqueueResult(NamedTuple):
    """What one enqueue call stored; a named tuple for the same reason as IncomingEvent
    (one per single Tracking API call)."""

    stored: int  # events that were new and now have jobs
    duplicates: int  # events whose message_id was already seen for this source
    duplicate_indexes: tuple[int, ...] = ()  # positions (in the call's list) of the duplicates


class Job(NamedTuple):
    """One leased job. A named tuple for the reason IncomingEvent is one: a lease makes one
    per job delivered, and the SQLite store builds them from its rows in C (sqlite_ops)."""

    id: int
    destination: str
    source: str
    message_id: str
    ordering_key: str
    payload: bytes
    attempts: int  # including the attempt this lease is for
    created_at: float
    first_attempt_at: float  # time of the first lease
    # Digests of the outputs an earlier attempt delivered (bridge/delivery/outputs.py):
    # empty unless the job was retried, released or dead-lettered with some of its outputs
    # accepted, and then not sent again.
    delivered_outputs: bytes = b""


# {job id: attempts as leased}; see Store.ack.
Fence = Mapping[int, int]

# {job id: the digests of every output of it delivered so far}; see Store.retry.
Delivered = Mapping[int, bytes]

# {job id: the ids whose identity links go with it}; see Store.ack.
ErasedLinks = Mapping[int, Collection[str]]

# {job id: the (merged id, retained id) pairs its delivered outputs merged}; see Store.ack.
MergedLinks = Mapping[int, Collection[tuple[str, str]]]

# A delivered_outputs value is its digests end to end, each this long: the store counts
# them by length (DeadLetterRecord.outputs_delivered) without knowing how they are made.
OUTPUT_DIGEST_BYTES = 8


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A terminal failure to record for job ``job_id`` (which leaves the queue)."""

    job_id: int
    reason: str  # short machine-readable reason, e.g. "http_400", "retries_exhausted"
    status: int | None = None  # last upstream HTTP status, None for connection errors
    response_body: str = ""  # last upstream response body (truncated by the caller)
    # The request as mapped, as sent but with this job's items alone (a request shared
    # with other jobs is not kept whole under each): what re-sending the event would post.
    # An item refused before sending, or a request that could not be built: its items' JSON.
    request_body: bytes = b""
    label: str = ""  # event name or type, so a person can find it in `dlq list`
    mapping_version: str = ""
    # The outputs delivered so far (as Job.delivered_outputs), kept for a replay. Empty:
    # whatever the job recorded before.
    delivered_outputs: bytes = b""


@dataclass(frozen=True, slots=True)
class Discard:
    """A job that mapped to nothing on purpose (anonymous_user, loop, ...)."""

    job_id: int
    reason: str
    label: str = ""
    detail: str = ""


@dataclass(slots=True)
class DeadLetterRecord:
    id: int
    destination: str
    source: str
    message_id: str
    payload: bytes  # the original inbound event
    reason: str
    status: int | None
    response_body: str
    request_body: bytes
    label: str
    attempts: int
    created_at: float  # when the event was first stored
    first_attempt_at: float | None
    failed_at: float  # when it was dead-lettered
    mapping_version: str
    # Outputs of the event the destination accepted before it was dead-lettered: a replay
    # sends only the others (bridge/delivery/outputs.py).
    outputs_delivered: int = 0


# The column order every store selects dead letters in, for ``dead_letter_record``.
# (length() of a NULL is NULL; of a blob or bytea, its bytes, in SQLite and PostgreSQL alike.)
DEAD_LETTER_COLUMNS = (
    "id, destination, source, message_id, payload, reason, status, response_body, request_body, label,"
    " attempts, created_at, first_attempt_at, failed_at, mapping_version, COALESCE(length(delivered_outputs), 0)"
)


def dead_letter_record(row: Sequence[Any]) -> DeadLetterRecord:
    """A DeadLetterRecord from a row in DEAD_LETTER_COLUMNS order (any driver's row type)."""
    return DeadLetterRecord(
        id=row[0],
        destination=row[1],
        source=row[2],
        message_id=row[3],
        payload=bytes(row[4]),
        reason=row[5],
        status=row[6],
        response_body=row[7],
        request_body=bytes(row[8]),
        label=row[9],
        attempts=row[10],
        created_at=row[11],
        first_attempt_at=row[12],
        failed_at=row[13],
        mapping_version=row[14],
        outputs_delivered=int(row[15]) // OUTPUT_DIGEST_BYTES,
    )


@dataclass(slots=True)
class DiscardRecord:
    id: int
    destination: str
    source: str
    message_id: str
    payload: bytes
    reason: str
    label: str
    detail: str
    discarded_at: float


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Selects dead letters or discards. Every field is optional (None = any)."""

    destination: str | None = None
    reason: str | None = None
    since: float | None = None  # failed_at / discarded_at >= since
    until: float | None = None  # failed_at / discarded_at < until
    ids: tuple[int, ...] | None = None
    # Any of these (None = any): a replay keeps to the configured destinations, since what
    # it queued for another would wait for a worker that never comes.
    destinations: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # unsettled jobs (queued + leased)
    oldest_created_at: float | None  # created_at of the oldest unsettled job
    dead: int = 0  # dead letters held for this destination


@dataclass(slots=True)
class DestinationState:
    name: str
    paused: bool = False
    reason: str = ""
    changed_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


class Store(ABC):
    """A durable job store. Every method is safe to call concurrently from one event loop."""

    @abstractmethod
    async def open(self) -> None:
        """Create the schema if needed and get ready. Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending work and release resources."""

    def now(self) -> float:
        """The store's clock (UNIX seconds): the time its own writes and lease checks use.

        A time the store will compare with its own (a retry's ``available_at``, the
        retry budget's age, a prune cutoff) must start from this, not from ``time.time()``:
        with a shared database, a node whose clock is off would otherwise take another
        node's lease early or hold a retry for too long."""
        return time.time()

    # -- ingest ---------------------------------------------------------------
    @abstractmethod
    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        """Durably store ``events`` for ``source``; returns once committed (group commit).

        Dedupe: an event whose (source, message_id) was stored before (or earlier in the
        same list) creates no job and is reported as a duplicate. Identity links of new
        events are upserted (latest wins). Raises StoreFull when over the size limit.
        """

    # -- delivery ---------------------------------------------------------------
    @abstractmethod
    async def lease(
        self,
        destination: str,
        limit: int,
        lease_seconds: float,
        *,
        ordered: bool = True,
        ahead: Collection[int] = (),
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs for ``destination``, oldest first.

        A job is due when it is queued with available_at <= now, or leased with an
        expired lease. Leasing increments ``attempts`` and sets ``first_attempt_at``
        on the first lease. With ``ordered`` a job is skipped while an older unsettled
        job of the same non-empty ordering_key exists for that destination (whether it
        is waiting for a retry, leased, or skipped in this same call).

        ``ahead``: the jobs of the caller's batch still in flight. They are never leased
        again here, and they hold back no later job of their users: the caller promises
        to settle them before it sends anything of this lease, and to give back, unsent,
        the jobs of any user whose job in ``ahead`` was not delivered (see
        bridge/delivery/worker.py, "pipelining"). This lets one delivery loop lease and
        map its next batch while the previous one is on the wire.
        """

    # Settling (ack, retry, release, dead_letter, discard) takes an optional ``fence``:
    # {job id: the ``attempts`` its lease returned}. A job leased again since (its lease
    # expired and another worker or node took it) has a higher count and is left alone,
    # so a late holder can never undo, repeat or reorder the new holder's work.
    @abstractmethod
    async def ack(
        self,
        job_ids: Sequence[int],
        mapping_version: str = "",
        *,
        fence: Fence | None = None,
        erase_links: ErasedLinks | None = None,
        merge_links: MergedLinks | None = None,
    ) -> None:
        """Mark jobs delivered, recording the mapping version that mapped them.

        ``erase_links``: {job id: ids} for the jobs that deleted a user (a MoEngage Delete
        User). In the same transaction, for each such job that is delivered, every identity
        link of its destination's namespace from or to any of its ids is removed, if it
        was learnt no later than the job was stored: the deleted user's later events are
        no longer attributed to them, and the store keeps nothing of who they were. A link
        learnt after the deletion arrived is new data and stays. So, with the links, go the
        destination's dead letters stored no later than the deletion, and its discards,
        whose ordering key is one of those ids: replayed after the deletion, such an event
        would create the deleted user again.

        ``merge_links``: {job id: (merged id, retained id) pairs} for the jobs that merged
        one user into another (a MoEngage Merge User). In the same transaction, for each
        such job that is delivered, the merged id and every id linked to it are linked
        to the retained id, so that the merged user's later events go to the retained
        user rather than make the merged one again (bridge.store.merge_links.plan_merges
        says which links change). Merges and erasures apply in job order, a job's merges
        before its erasures (bridge.store.merge_links.link_steps): as acks of one job at a
        time would leave the links."""

    # ``delivered`` (retry, release): for the jobs some of whose outputs the upstream
    # accepted, the digests of every output delivered so far, which the job keeps and its
    # next lease returns (Job.delivered_outputs) so that they are not sent again. Other jobs
    # keep what they recorded before. Only such a partly delivered job pays for the write.
    @abstractmethod
    async def retry(
        self,
        job_ids: Sequence[int],
        available_at: float,
        error: str,
        *,
        fence: Fence | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        """Return leased jobs to the queue, due again at ``available_at``."""

    @abstractmethod
    async def defer(
        self,
        job_ids: Sequence[int],
        available_at: float,
        reason: str,
        *,
        fence: Fence | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        """Return leased jobs to the queue as ``release`` does, their attempt not counted
        (nor their first attempt, if this was it), but due again only at ``available_at``:
        jobs that were not tried, held back behind others (an unordered deletion waiting
        for its user's earlier jobs), whose wait must not spend their retry budget. Their
        other outputs may have gone out before they were held back: ``delivered``, as for
        ``retry``."""

    @abstractmethod
    async def users_waiting(
        self, destination: str, before: int, users: Sequence[str], ignore: Collection[int] = ()
    ) -> set[str]:
        """Those of ``users`` with an unsettled job for ``destination`` older than job
        ``before`` (queued, waiting for a retry, or leased), not counting the jobs of
        ``ignore`` (the caller's own batch): what an unordered destination
        asks before sending a job that must not overtake its users' earlier ones (a
        deletion). Read without an index on the key: such jobs are rare."""

    @abstractmethod
    async def release(
        self, job_ids: Sequence[int], *, fence: Fence | None = None, delivered: Delivered | None = None
    ) -> None:
        """Return leased jobs to the queue now, without counting the attempt (shutdown, pause)."""

    @abstractmethod
    async def dead_letter(self, entries: Sequence[DeadLetter], *, fence: Fence | None = None) -> None:
        """Move jobs to the dead-letter queue with their reason and last response, and the
        outputs delivered so far (the entry's, else the job's), which a replay keeps."""

    @abstractmethod
    async def discard(self, entries: Sequence[Discard], *, fence: Fence | None = None) -> None:
        """Settle jobs that mapped to nothing on purpose, keeping a record of why (and,
        as dead_letter does, the outputs an earlier attempt delivered)."""

    @abstractmethod
    async def resolve_links(self, namespace: str, ids: Sequence[str]) -> dict[str, str]:
        """Return {from_id: to_id} for those of ``ids`` that have an identity link."""

    # -- operators ----------------------------------------------------------------
    @abstractmethod
    async def list_dead(self, flt: RecordFilter, limit: int = 100) -> list[DeadLetterRecord]:
        """Dead letters matching ``flt``, newest first."""

    @abstractmethod
    async def replay_dead(self, flt: RecordFilter) -> int:
        """Re-queue matching dead letters as fresh jobs (same message_id, attempts reset,
        original payload, so they are re-mapped with the current mapping, and the outputs
        delivered before, so those are not sent again). Returns count."""

    @abstractmethod
    async def replay_discards(self, flt: RecordFilter) -> int:
        """Re-queue matching discards as replay_dead does dead letters: an event a mapping
        discarded by mistake (a bad deploy) is delivered once the mapping is fixed."""

    @abstractmethod
    async def purge_dead(self, flt: RecordFilter) -> int:
        """Delete matching dead letters. Returns count."""

    @abstractmethod
    async def list_discards(self, flt: RecordFilter, limit: int = 100) -> list[DiscardRecord]:
        """Discard records matching ``flt``, newest first."""

    @abstractmethod
    async def queue_stats(self) -> dict[str, QueueStats]:
        """Per-destination depth, oldest age and dead-letter count."""

    @abstractmethod
    async def delivered_version(self, destination: str, message_id: str) -> str | None:
        """The mapping version recorded when this event was delivered, if it was.

        An audit lookup for operators and tests: it reads the delivered jobs without an
        index, since keeping one by message id would cost every ack."""

    @abstractmethod
    async def get_destination_states(self) -> dict[str, DestinationState]:
        """Persisted pause state per destination (shared with the CLI and other nodes)."""

    @abstractmethod
    async def set_destination_state(self, state: DestinationState) -> None: ...

    @abstractmethod
    async def make_due(self, destination: str) -> int:
        """Make every queued job of ``destination`` that waits for a retry time due now;
        returns how many. An operator's resume: the retries set while the destination
        failed (up to ``max_delay``, or a Retry-After of up to ``max_retry_after``) would
        otherwise hold back what was just resumed. Works through the queue in short steps,
        so ingest is never held up for a long backlog."""

    @abstractmethod
    async def check_writable(self) -> None:
        """Raise StoreError unless a write can be committed right now, or StoreFull when
        ingest would be refused for capacity (readiness)."""

    @abstractmethod
    async def prune(self, dedupe_before: float, settled_before: float) -> int:
        """Forget dedupe keys older than ``dedupe_before`` and delivered jobs / discard
        records older than ``settled_before``. Returns rows removed."""
