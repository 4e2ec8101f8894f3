"""What a delivered merge does to the identity links (Store.ack's ``merge_links``).

A merge (MoEngage's Merge User) moves one user's data into another and deletes the first.
Without a link, the merged user's later calls (an old device still sending the old
userId) were sent under the merged id, and MoEngage made that user again: a ghost
profile beside the one it had just been merged into. Once the merge is delivered, the
merged id, and every id linked to it, reads as the retained user.

Planned here once for both stores, from the links the store holds now; each store writes
the plan in the ack's own transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple

from bridge.store.base import ErasedLinks, MergedLinks


class Merge(NamedTuple):
    namespace: str  # the merging job's destination: links are per destination
    merged: str
    retained: str
    at: float  # when the merging job was stored, on the store's clock


class LinkRow(NamedTuple):
    namespace: str
    from_key: str  # from_id as the store keeps it (PostgreSQL: a long id under its digest)
    to_id: str
    updated_at: float


def plan_merges(merges: Iterable[Merge], held: Iterable[LinkRow], key: Callable[[str], str]) -> list[LinkRow]:
    """The link rows to write, in (namespace, from) order, so that after ``merges`` (in job
    order) each merged id and each id linked to it resolves to its retained id.

    ``held``: the store's rows from or to any merged id. Only what was known when a merge
    was stored changes: a link to the merged id learnt no later than that moves to the
    retained id, keeping its own time; the merged id's own link becomes the retained id,
    dated by the merge, unless the merged id was linked elsewhere since (new data, which
    wins as any later link does). A deletion stored after the merge erases these links as
    any other (Store.ack's ``erase_links``; one stored before the merge, in the same ack,
    was applied before it: see link_steps). Merges in one ack apply in order, so a merge
    into a user that the next merge merges away ends at the last retained id."""
    state = {(r.namespace, r.from_key): (r.to_id, r.updated_at) for r in held}
    changed: set[tuple[str, str]] = set()
    for m in merges:
        if m.merged == m.retained:
            continue
        for k, (to_id, at) in state.items():
            if to_id == m.merged and at <= m.at and k[0] == m.namespace:
                state[k] = (m.retained, at)  # an existing key: no change of size while iterating
                changed.add(k)
        own = (m.namespace, key(m.merged))
        current = state.get(own)
        if current is None or current[1] <= m.at:
            state[own] = (m.retained, m.at)
            changed.add(own)
    return [LinkRow(ns, f, *state[ns, f]) for ns, f in sorted(changed)]


def merges_of(stored: Iterable[tuple[int, str, float]], merge_links: MergedLinks) -> list[Merge]:
    """``merge_links`` as Merges, for the jobs of ``stored`` ((job id, destination,
    created_at) of each job the ack delivered), in job order; a job the ack did not deliver
    (another holder's now) merges nothing here: its holder's ack will."""
    return [
        Merge(destination, merged, retained, created_at)
        for job_id, destination, created_at in sorted(stored)
        for merged, retained in merge_links[job_id]
    ]


class LinkStep(NamedTuple):
    """One step of an ack's link changes: the merges of a run of consecutive jobs, or their
    erasures (one of the two is empty)."""

    merges: dict[int, Collection[tuple[str, str]]]
    erasures: dict[int, Collection[str]]


def link_steps(merge_links: MergedLinks | None, erase_links: ErasedLinks | None) -> list[LinkStep]:
    """An ack's merges and erasures in job order (a job that does both: its merges first),
    consecutive jobs' merges (or erasures) in one step: the ack leaves the links as acks of
    each job in turn would.

    Not merges first, then erasures: a merge moves links keeping their own times, and an
    erasure takes the links learnt before its deletion, so a deletion stored before the
    merge took the links the merge had just moved to the retained user (the merged user's
    later calls made it again, a ghost profile), and missed those it had moved away from
    the deleted user (a deleted user's link kept). Nor moved links dated by the merge: a
    deletion stored before the merge, of a user linked to the merged id, then missed them,
    in the same ack or a later one (per-user order holds a merge back behind its own users'
    earlier jobs, not behind those of a user linked to them)."""
    steps: list[LinkStep] = []
    for job_id in sorted({*(merge_links or ()), *(erase_links or ())}):
        if merge_links and job_id in merge_links:
            if not steps or steps[-1].erasures:
                steps.append(LinkStep({}, {}))
            steps[-1].merges[job_id] = merge_links[job_id]
        if erase_links and job_id in erase_links:
            if not steps or steps[-1].merges:
                steps.append(LinkStep({}, {}))
            steps[-1].erasures[job_id] = erase_links[job_id]
    return steps
