"""Leases of the SQLite store, held in the server's memory instead of in the jobs table.

One server runs on a file, and it holds the file's server lock (server_lock): no other
process leases from it (the CLI reads, replays, purges and prunes, and never leases). So
a lease needs no row of its own. Written to the table, every leased job's row was
rewritten twice, once for the lease and once for the ack: about 3 us a job for the lease's
UPDATE and as much again in the WAL pages it dirtied, a fifth of delivery's cost
(docs/benchmarks.md, session 20). Now a lease only reads, and a settle writes once.

What the table no longer has while a job is leased:
- its state: it stays QUEUED. Leases are looked up here by the lease's selection, which
  treats a held job as leased (blocking its user's later jobs while the lease lasts);
- its attempt count and first attempt: ``Held`` has them, and ``retry``, ``ack``,
  ``dead_letter`` and ``discard`` write them with the settle. ``release`` writes nothing:
  the attempt does not count, so the row already says what it should. Unless a lease of
  ours lapsed before this one: that attempt counts, and the release writes it.

A server that dies loses its leases, and its jobs are due again as soon as the next one
starts, instead of once their leases would have run out: at-least-once, as before, and
sooner. The attempts that were in flight are not counted. Rows a bridge of an earlier
version left LEASED are read as before: due once their ``lease_until`` has passed.

Used on the writer thread only, inside its operations: a change is undone if the
operation's transaction rolls back, so memory never says more than the file.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple

from bridge.store.base import Fence
from bridge.store.ordering import LEASED


class Held(NamedTuple):
    """A tuple, not a class: a lease is taken for every job delivered, and tuples of
    numbers are what the garbage collector stops tracking."""

    attempts: int  # counting this lease
    until: float  # the lease's end (epoch seconds)
    first_attempt_at: float
    # The row's own count when this server first held the job. Above it, by more than
    # this lease, are leases of ours that lapsed: those attempts happened, and a release
    # (which uncounts only its own) must write them to the row.
    counted: int


class Settling(NamedTuple):
    """A job a settle may touch: ``fence`` is what the SQL still checks against the row
    (None: unfenced, or checked here already); ``attempts`` and ``first_attempt_at`` are
    its lease's, if this server holds one (None: the row's stand)."""

    job_id: int
    fence: int | None
    attempts: int | None
    first_attempt_at: float | None
    counted: int | None


# A NamedTuple's own constructor is a Python function; this is the C one, for the per-job
# paths (a lease and a settle make one tuple a job).
new_tuple = tuple.__new__
_ATTEMPTS = itemgetter(0)  # of a Held
_FIRST = itemgetter(2)
_COUNTED = itemgetter(3)
_KEY = itemgetter(0)  # of a (job id, Held) pair


class Leases:
    def __init__(self, on_rollback: Callable[[Callable[[], None]], None]) -> None:
        """``on_rollback``: the writer's (GroupCommitWriter.on_rollback)."""
        self._on_rollback = on_rollback
        self._held: dict[int, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def get(self, job_id: int) -> Held | None:
        return self._held.get(job_id)

    def hold(self, leased: Sequence[tuple[int, Held]]) -> None:
        held_map = self._held
        ids = list(map(_KEY, leased))
        before = list(zip(ids, map(held_map.get, ids), strict=True))  # in C: a lease holds every job delivered
        held_map.update(leased)
        self._on_rollback(partial(self._restore, before))

    def holds_none(self, job_ids: Iterable[int]) -> bool:
        """Whether no job of ``job_ids`` is held here."""
        return not self._held or self._held.keys().isdisjoint(job_ids)

    def settling(self, job_ids: Sequence[int], fence: Fence | None) -> list[Settling]:
        """The jobs of ``job_ids`` a settle fenced by ``fence`` may touch, dropping their
        leases (restored on rollback). A held job leased again since the fence's lease (a
        higher count) is left out, lease and all: its new holder settles it."""
        held_map = self._held
        helds: list[Any] = list(map(held_map.get, job_ids))  # Held or None
        if (
            None not in helds
            and (fence is None or list(map(fence.get, job_ids)) == list(map(_ATTEMPTS, helds)))
            and len(set(job_ids)) == len(helds)
        ):
            # The usual settle: every job held here, on the fence's lease. The same as the
            # loop below gives, made in C rather than by a Python step per job (a settle
            # runs for every job delivered).
            deque(map(held_map.__delitem__, job_ids), maxlen=0)
            self._on_rollback(partial(self._restore, list(zip(job_ids, helds, strict=True))))
            # strict=False: repeat() never ends; the other three are as long as job_ids.
            settled = zip(
                job_ids, repeat(None), map(_ATTEMPTS, helds), map(_FIRST, helds), map(_COUNTED, helds), strict=False
            )
            return list(map(new_tuple, repeat(Settling), settled))
        out: list[Settling] = []
        dropped: list[tuple[int, Held | None]] = []
        for job_id in job_ids:
            held = held_map.get(job_id)
            wanted = fence.get(job_id) if fence is not None else None
            if held is None:
                out.append(new_tuple(Settling, (job_id, wanted, None, None, None)))  # the row's own count decides
            elif wanted is None or wanted == held[0]:
                del held_map[job_id]
                dropped.append((job_id, held))
                out.append(new_tuple(Settling, (job_id, None, held[0], held[2], held[3])))
        if dropped:
            self._on_rollback(partial(self._restore, dropped))
        return out

    def as_leased(self, rows: Iterable[Sequence[Any]]) -> Iterator[Sequence[Any]]:
        """Rows of (id, ordering_key, state, available_at, lease_until) with every held
        job shown leased until its lease ends, as ordering.OrderedSelection reads them."""
        held_map = self._held
        if not held_map:
            yield from rows
            return
        for row in rows:
            held = held_map.get(row[0])
            yield row if held is None else (row[0], row[1], LEASED, row[3], held.until)

    def holds_outside(self, ahead: Collection[int]) -> bool:
        """Whether a job not in ``ahead`` is held."""
        held = self._held
        return bool(held) and (len(held) > len(ahead) or bool(held.keys() - ahead))

    def held_now(self, job_id: int, now: float) -> bool:
        held = self._held.get(job_id)
        return held is not None and held.until > now

    def _restore(self, entries: list[tuple[int, Held | None]]) -> None:
        for job_id, held in reversed(entries):
            if held is None:
                self._held.pop(job_id, None)
            else:
                self._held[job_id] = held
