"""The Store contract, run against every implementation (see conftest ``kind``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time

import orjson
import pytest

from bridge.store.base import (
    DeadLetter,
    DestinationState,
    Discard,
    IdentityLink,
    IncomingEvent,
    RecordFilter,
    Store,
    StoreError,
    StoreFull,
)
from bridge.store.ordering import ordering_key
from tests.store.conftest import StoreFactory
from tests.store.helpers import event

EVERYTHING = RecordFilter()


# -- ingest -------------------------------------------------------------------------------
async def test_enqueue_reports_duplicates_across_calls_and_within_a_list(store: Store) -> None:
    first = await store.enqueue("web", [event("m1", "u1"), event("m2", "u1"), event("m1", "u1")])
    assert (first.stored, first.duplicates, first.duplicate_indexes) == (2, 1, (2,))

    second = await store.enqueue("web", [event("m3", "u2"), event("m2", "u1")])
    assert (second.stored, second.duplicates, second.duplicate_indexes) == (1, 1, (1,))

    jobs = await store.lease("moe", 100, 30)
    assert [j.message_id for j in jobs] == ["m1", "m2", "m3"]
    assert orjson.loads(jobs[0].payload) == {"messageId": "m1", "userId": "u1"}


async def test_dedupe_is_per_source(store: Store) -> None:
    await store.enqueue("web", [event("same")])
    other = await store.enqueue("app", [event("same")])
    assert (other.stored, other.duplicates) == (1, 0)
    jobs = await store.lease("moe", 10, 30)
    assert sorted(j.source for j in jobs) == ["app", "web"]


async def test_one_job_per_destination(store: Store) -> None:
    await store.enqueue("web", [event("m1", "u1", destinations=("moe-a", "moe-b")), event("m2", "u1")])
    a = await store.lease("moe-a", 10, 30)
    b = await store.lease("moe-b", 10, 30)
    moe = await store.lease("moe", 10, 30)
    assert [j.message_id for j in a] == ["m1"]
    assert [j.message_id for j in b] == ["m1"]
    assert [j.message_id for j in moe] == ["m2"]
    assert a[0].id != b[0].id
    assert {j.destination for j in a + b} == {"moe-a", "moe-b"}


async def test_identity_links_latest_wins_per_namespace(store: Store) -> None:
    await store.enqueue("web", [event("m1", "anon", links=(IdentityLink("moe", "u1", "id-1"),))])
    await store.enqueue("web", [event("m2", "anon", links=(IdentityLink("moe", "u1", "id-2"),))])
    await store.enqueue("web", [event("m3", "anon", links=(IdentityLink("other", "u1", "x"),))])
    # A duplicate's links are ignored: it was already stored once.
    await store.enqueue("web", [event("m1", "anon", links=(IdentityLink("moe", "u1", "stale"),))])

    assert await store.resolve_links("moe", ["u1", "u9"]) == {"u1": "id-2"}
    assert await store.resolve_links("other", ["u1"]) == {"u1": "x"}
    assert await store.resolve_links("nobody", ["u1"]) == {}
    assert await store.resolve_links("moe", []) == {}


async def test_identity_links_of_ids_too_long_to_index_are_kept_and_found(store: Store) -> None:
    """A userId is bounded only by its event's 32 KB. PostgreSQL cannot index a key past
    about 2.7 KB: such a link failed the whole enqueue (a 503 for the request's good events)."""
    long_id = secrets.token_hex(1500)  # random: PostgreSQL compresses a repetitive key to fit
    other_long = long_id[:-1] + ("0" if long_id[-1] != "0" else "1")
    wide = "".join(chr(0x100 + secrets.randbelow(0x700)) for _ in range(600))  # 1,200 bytes in UTF-8
    marked = "bridge-sha256:" + "0" * 64  # looks like a stored digest: must stay its own id
    links = (
        IdentityLink("moe", long_id, "id-long"),
        IdentityLink("moe", other_long, "id-other"),
        IdentityLink("moe", wide, "id-wide"),
        IdentityLink("moe", marked, "id-marked"),
    )
    assert (await store.enqueue("web", [event("m1", "anon", links=links)])).stored == 1
    await store.enqueue("web", [event("m2", "anon", links=(IdentityLink("moe", long_id, "id-long-2"),))])

    found = await store.resolve_links("moe", [long_id, other_long, wide, marked, long_id + "0"])
    assert found == {long_id: "id-long-2", other_long: "id-other", wide: "id-wide", marked: "id-marked"}


async def test_a_delivered_deletion_erases_the_links_from_and_to_its_ids(store: Store) -> None:
    """A user's deletion, once delivered, removes every link of its namespace from or to
    the ids it names (GDPR erasure): their later events are no longer attributed to the
    deleted user. Only links learnt before the deletion was stored, only for a deletion
    actually acked, and only in its own destination's namespace."""
    long_id = "u" * 3000  # kept under its digest by PostgreSQL
    learnt = (
        IdentityLink("moe", "u1", "crm-1"),
        IdentityLink("moe", "u2", "crm-1"),  # another id of the deleted user
        IdentityLink("moe", "crm-1", "crm-0"),  # the deleted id as a from_id
        IdentityLink("moe", long_id, "crm-long"),
        IdentityLink("moe", "u3", "crm-3"),  # another user's
        IdentityLink("other", "u1", "crm-1"),  # another destination's
    )
    await store.enqueue("web", [event("m1", "u1", links=learnt)])
    await store.enqueue("web", [event("del", "u1")])
    # Learnt after the deletion was stored: new data, kept. So is a link taught again as
    # it was (its time moves), and one another user's id moved to.
    again = (IdentityLink("moe", "u4", "crm-1"), IdentityLink("moe", "u2", "crm-1"), IdentityLink("moe", "u3", "crm-9"))
    await store.enqueue("web", [event("m2", "u4", links=again)])
    first, deletion, later = await store.lease("moe", 10, 30)
    erase = {deletion.id: ["u1", "crm-1", long_id]}
    everyone = ["u1", "u2", "u3", "u4", "crm-1", long_id]

    # Not acked by this holder (its lease was taken again since): nothing erased.
    await store.ack([deletion.id], fence={deletion.id: deletion.attempts + 1}, erase_links=erase)
    assert len(await store.resolve_links("moe", everyone)) == 6
    # Acked along with other jobs; a job that deleted nobody erases nothing.
    await store.ack([first.id, deletion.id, later.id], fence={deletion.id: deletion.attempts}, erase_links=erase)
    assert await store.resolve_links("moe", everyone) == {"u2": "crm-1", "u3": "crm-9", "u4": "crm-1"}
    assert await store.resolve_links("other", ["u1"]) == {"u1": "crm-1"}


async def test_a_delivered_merge_links_the_merged_user_to_the_retained_one(store: Store) -> None:
    """Once a merge is delivered, the merged id and every id linked to it (learnt before
    the merge was stored) resolve to the retained id: the merged user's later events go to
    the retained user, not make the merged one again. Only for a merge actually acked,
    only in its own destination's namespace; a link learnt after the merge was stored is
    new data and stays."""
    long_id = "m" * 3000  # kept under its digest by PostgreSQL
    learnt = (
        IdentityLink("moe", "dev-1", "old-1"),  # another id of the merged user
        IdentityLink("moe", long_id, "old-1"),
        IdentityLink("moe", "u3", "crm-3"),  # another user's
        IdentityLink("other", "dev-1", "old-1"),  # another destination's
    )
    await store.enqueue("web", [event("m1", "old-1", links=learnt)])
    await store.enqueue("web", [event("alias", "new-1")])
    # Learnt after the merge was stored: new data, kept.
    await store.enqueue("web", [event("m2", "dev-2", links=(IdentityLink("moe", "dev-2", "old-1"),))])
    first, alias, later = await store.lease("moe", 10, 30)
    merge = {alias.id: [("old-1", "new-1")]}
    everyone = ["old-1", "dev-1", "dev-2", long_id, "u3", "new-1"]
    before = await store.resolve_links("moe", everyone)

    # Not acked by this holder (its lease was taken again since): nothing linked.
    await store.ack([alias.id], fence={alias.id: alias.attempts + 1}, merge_links=merge)
    assert await store.resolve_links("moe", everyone) == before
    # Acked along with other jobs; a job that merged nobody links nothing.
    await store.ack([first.id, alias.id, later.id], fence={alias.id: alias.attempts}, merge_links=merge)
    assert await store.resolve_links("moe", everyone) == {
        "old-1": "new-1",
        "dev-1": "new-1",
        long_id: "new-1",
        "dev-2": "old-1",
        "u3": "crm-3",
    }
    assert await store.resolve_links("other", ["dev-1", "old-1"]) == {"dev-1": "old-1"}


async def test_merges_in_one_ack_apply_in_order_and_a_later_deletion_erases_their_links(store: Store) -> None:
    """A user merged into one that the next merge merges away ends at the last retained
    id; a merged id linked elsewhere after its merge was stored keeps that link. A
    deletion of the retained user stored after the merges erases the links they made."""
    await store.enqueue("web", [event("m0", "a", links=(IdentityLink("moe", "x", "a"),))])
    await store.enqueue("web", [event("alias-1", "b"), event("alias-2", "c"), event("alias-3", "e")])
    await asyncio.sleep(0.01)  # on the store's clock, d is linked after its merge was stored
    await store.enqueue("web", [event("m3", "d", links=(IdentityLink("moe", "d", "elsewhere"),))])
    m0, alias1, alias2, alias3, m3 = await store.lease("moe", 10, 30)
    await store.ack([m0.id, m3.id])
    merges = {alias1.id: [("a", "b")], alias2.id: [("b", "c")], alias3.id: [("d", "e")]}
    await store.ack([alias3.id, alias2.id, alias1.id], merge_links=merges)
    ids = ["a", "b", "c", "d", "x"]
    assert await store.resolve_links("moe", ids) == {"a": "c", "b": "c", "x": "c", "d": "elsewhere"}

    await asyncio.sleep(0.01)  # the deletion is stored after the merges, on the store's clock
    await store.enqueue("web", [event("del", "c")])
    (deletion,) = await store.lease("moe", 10, 30)
    await store.ack([deletion.id], erase_links={deletion.id: ["c"]})
    assert await store.resolve_links("moe", ids) == {"d": "elsewhere"}


async def test_deletions_and_merges_in_one_ack_apply_in_job_order(store: Store) -> None:
    """An ack applied its merges, then its erasures. A merge moves links keeping their
    times, and a deletion erases the links learnt before it: a deletion of new-1 stored
    before old-1's merge into it erased the link the merge had just moved (dev-1's later
    calls went out under dev-1, a user MoEngage never had), and a deletion of old-2 before
    its merge missed dev-2's link, moved out of its reach (a deleted user's link kept).
    Applied in job order, as acks one job at a time would; a merge before a deletion of its
    retained user is still erased by it."""
    links = tuple(IdentityLink("moe", f"dev-{i}", f"old-{i}") for i in (1, 2, 3))
    await store.enqueue("web", [event("learn", "dev-1", links=links)])
    await asyncio.sleep(0.01)  # each group below is stored after the one before, on the store's clock
    await store.enqueue("web", [event("del-1", "new-1"), event("del-2", "old-2")])
    await asyncio.sleep(0.01)
    await store.enqueue("web", [event("alias-1", "new-1"), event("alias-2", "new-2"), event("alias-3", "new-3")])
    await asyncio.sleep(0.01)
    await store.enqueue("web", [event("del-3", "new-3")])
    jobs = {j.message_id: j.id for j in await store.lease("moe", 10, 30)}
    merges = {jobs[f"alias-{i}"]: [(f"old-{i}", f"new-{i}")] for i in (1, 2, 3)}
    erasures = {jobs["del-1"]: ["new-1"], jobs["del-2"]: ["old-2"], jobs["del-3"]: ["new-3"]}
    await store.ack(list(jobs.values()), merge_links=merges, erase_links=erasures)
    ids = [f"{kind}-{i}" for kind in ("dev", "old", "new") for i in (1, 2, 3)]
    assert await store.resolve_links("moe", ids) == {"dev-1": "new-1", "old-1": "new-1", "old-2": "new-2"}


async def test_a_deletion_acked_after_a_later_merge_erases_the_links_it_moved(store: Store) -> None:
    """A deletion of dev (linked to old) waits in the queue while old's merge, stored after
    it, is delivered: per-user order does not hold the merge back (its users are old and
    new). The merge moves dev's link to new keeping its time, so the deletion, acked later,
    still erases it; the merged id's own link, made by the merge after the deletion, stays."""
    await store.enqueue("web", [event("learn", "dev", links=(IdentityLink("moe", "dev", "old"),))])
    await asyncio.sleep(0.01)  # the deletion is stored after the link, the alias after both
    await store.enqueue("web", [event("del-dev", "dev")])
    await asyncio.sleep(0.01)
    await store.enqueue("web", [event("alias", "new")])
    jobs = {j.message_id: j.id for j in await store.lease("moe", 10, 30)}
    await store.ack([jobs["learn"], jobs["alias"]], merge_links={jobs["alias"]: [("old", "new")]})
    assert await store.resolve_links("moe", ["dev", "old"]) == {"dev": "new", "old": "new"}
    await store.ack([jobs["del-dev"]], erase_links={jobs["del-dev"]: ["dev", "old"]})
    assert await store.resolve_links("moe", ["dev", "old", "new"]) == {"old": "new"}


async def test_a_delivered_deletion_removes_its_users_dead_letters_and_discards(store: Store) -> None:
    """Replayed after the deletion, a dead letter or discard of the deleted user created the
    user again in MoEngage (it makes a user of any identifiers it is sent). The deletion
    removes those of its destination stored before it, in the ack's transaction; another
    user's, another destination's and an event of the user stored after it stay."""
    await store.enqueue(
        "web",
        [
            event("old-1", "u1"),
            event("old-2", "crm-1"),  # the user's other id, which the deletion erases too
            event("old-3", "u1"),
            event("other-user", "u2"),
            event("other-dest", "u1", destinations=("other",)),
        ],
    )
    await store.enqueue("web", [event("del", "u1")])
    await store.enqueue("web", [event("after", "u1")])
    old1, old2, old3, other_user, deletion, after = await store.lease("moe", 10, 30)
    (other_dest,) = await store.lease("other", 10, 30)
    await store.dead_letter(
        [DeadLetter(j.id, "http_400") for j in (old1, old2, other_user)],
        fence={j.id: j.attempts for j in (old1, old2, other_user)},
    )
    await store.dead_letter([DeadLetter(other_dest.id, "http_400")], fence={other_dest.id: other_dest.attempts})
    await store.discard([Discard(old3.id, "no_output")], fence={old3.id: old3.attempts})
    # The user's event stored after the deletion is new data: dead-lettered, it stays.
    await store.dead_letter([DeadLetter(after.id, "http_400")], fence={after.id: after.attempts})
    erase = {deletion.id: ["u1", "crm-1"]}

    # Not acked by this holder (its lease was taken again since): nothing removed.
    await store.ack([deletion.id], fence={deletion.id: deletion.attempts + 1}, erase_links=erase)
    assert len(await store.list_dead(EVERYTHING)) == 5
    assert len(await store.list_discards(EVERYTHING)) == 1

    await store.ack([deletion.id], fence={deletion.id: deletion.attempts}, erase_links=erase)
    assert sorted(d.message_id for d in await store.list_dead(EVERYTHING)) == ["after", "other-dest", "other-user"]
    assert await store.list_discards(EVERYTHING) == []
    # A replay now sends nothing of the deleted user's from before the deletion.
    assert await store.replay_dead(RecordFilter(destination="moe")) == 2
    assert sorted(j.message_id for j in await store.lease("moe", 10, 30)) == ["after", "other-user"]


async def test_a_replayed_deletion_erases_the_links_learnt_before_its_replay(store: Store) -> None:
    """A replay queues a deletion anew, after its user's events of the meantime, so those
    are deleted with the user, and the links they taught are erased with them (README);
    a link learnt after the replay is new data, kept."""
    await store.enqueue("web", [event("m1", "u1", links=(IdentityLink("moe", "u1", "crm-1"),))])
    await store.enqueue("web", [event("del", "u1")])
    first, deletion = await store.lease("moe", 10, 30)
    await store.ack([first.id])
    await store.dead_letter([DeadLetter(deletion.id, "http_500")], fence={deletion.id: deletion.attempts})
    meantime = (IdentityLink("moe", "u1", "crm-2"), IdentityLink("moe", "u2", "crm-1"))
    await store.enqueue("web", [event("m2", "u1", links=meantime)])
    assert await store.replay_dead(RecordFilter(reason="http_500")) == 1
    await asyncio.sleep(0.01)  # after the replay on the store's clock, which dates both
    await store.enqueue("web", [event("m3", "u3", links=(IdentityLink("moe", "u3", "crm-2"),))])
    meanwhile, replayed, later = await store.lease("moe", 10, 30)
    assert [j.message_id for j in (meanwhile, replayed, later)] == ["m2", "del", "m3"]
    await store.ack([meanwhile.id, later.id])
    await store.ack([replayed.id], erase_links={replayed.id: ["u1", "crm-1", "crm-2"]})
    assert await store.resolve_links("moe", ["u1", "u2", "u3"]) == {"u3": "crm-2"}


async def test_links_of_an_id_with_nul_are_resolved(store: Store) -> None:
    """Ingest stores such an id (U+0000 as U+FFFD on PostgreSQL); the lookup sent it raw
    and PostgreSQL refused the whole statement: StoreError on every batch holding it."""
    link = IdentityLink("moe", "u\x00x", "t1")
    await store.enqueue("web", [event("m1", "u\x00x", links=(link,))])
    assert await store.resolve_links("moe", ["u\x00x", "plain"]) == {"u\x00x": "t1"}


async def test_dead_letter_naming_a_job_twice_moves_it_once(store: Store) -> None:
    await store.enqueue("web", [event("m1", "u1")])
    [job] = await store.lease("moe", 10, 30)
    fence = {job.id: job.attempts}
    await store.dead_letter([DeadLetter(job.id, "http_400"), DeadLetter(job.id, "http_422")], fence=fence)
    assert [(d.reason, d.attempts) for d in await store.list_dead(RecordFilter())] == [("http_400", 1)]
    assert await store.lease("moe", 10, 30) == []


async def test_discard_naming_a_job_twice_records_it_once(store: Store) -> None:
    await store.enqueue("web", [event("m1", "u1")])
    [job] = await store.lease("moe", 10, 30)
    await store.discard([Discard(job.id, "a"), Discard(job.id, "b")], fence={job.id: job.attempts})
    assert [d.reason for d in await store.list_discards(RecordFilter())] == ["a"]
    assert await store.lease("moe", 10, 30) == []


# -- lease, ack, retry, release -------------------------------------------------------------
async def test_lease_ack_retry_release(store: Store) -> None:
    await store.enqueue("web", [event(f"m{i}", f"u{i}") for i in range(4)])
    before = time.time()
    jobs = await store.lease("moe", 3, 30)
    assert [j.message_id for j in jobs] == ["m0", "m1", "m2"]
    assert all(j.attempts == 1 and j.first_attempt_at >= before - 1 for j in jobs)
    # Leased jobs are not handed out twice.
    assert [j.message_id for j in await store.lease("moe", 10, 30)] == ["m3"]

    m0, m1, m2 = jobs
    await store.ack([m0.id], "v1")
    await store.retry([m1.id], time.time() + 3600, "http_500")
    await store.release([m2.id])

    again = await store.lease("moe", 10, 30)
    assert [j.message_id for j in again] == ["m2"]  # m1 waits an hour, m0 is done
    assert again[0].attempts == 1  # release did not count the attempt

    await store.retry([again[0].id], time.time() - 1, "timeout")  # due at once
    third = await store.lease("moe", 10, 30)
    assert [(j.message_id, j.attempts) for j in third] == [("m2", 2)]
    assert third[0].first_attempt_at == pytest.approx(again[0].first_attempt_at)
    assert (await store.queue_stats())["moe"].depth == 3


@pytest.mark.parametrize("step", [5000, 2])
async def test_make_due_brings_waiting_retries_forward_and_touches_nothing_else(
    store: Store, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step of 2 jobs makes the store walk its queue in several steps.
    monkeypatch.setattr("bridge.store.sqlite.MAKE_DUE_STEP", step)
    monkeypatch.setattr("bridge.store.postgres.MAKE_DUE_STEP", step)
    await store.enqueue("web", [event(f"m{i}", f"u{i}") for i in range(6)])
    await store.enqueue("web", [event("other", "u9", destinations=("elsewhere",))])
    m0, m1, m2, _still_leased = await store.lease("moe", 4, 30)
    (other,) = await store.lease("elsewhere", 1, 30)
    later = time.time() + 3600
    await store.retry([m0.id, m1.id], later, "http_429")  # waiting an hour
    await store.retry([other.id], later, "http_429")  # another destination's: left alone
    await store.ack([m2.id])  # settled: left alone
    # m3 is still leased: left alone. m4 and m5 were due all along.

    assert await store.make_due("moe") == 2
    assert await store.make_due("moe") == 0  # nothing left waiting
    due = await store.lease("moe", 10, 30)
    assert [(j.message_id, j.attempts) for j in due] == [("m0", 2), ("m1", 2), ("m4", 1), ("m5", 1)]
    assert await store.lease("elsewhere", 10, 30) == []
    assert await store.make_due("nowhere") == 0


async def test_an_expired_lease_makes_the_job_due_again(store: Store) -> None:
    await store.enqueue("web", [event("m1", "u1")])
    first = await store.lease("moe", 10, 1.0)
    assert len(first) == 1
    assert await store.lease("moe", 10, 30) == []
    await asyncio.sleep(1.2)
    second = await store.lease("moe", 10, 30)
    assert [(j.id, j.attempts) for j in second] == [(first[0].id, 2)]


async def test_a_late_holder_cannot_settle_a_job_leased_again(store: Store) -> None:
    """Worker A's lease lapses and B leases the job: nothing A does afterwards (fenced by
    the attempt count of its lease) may undo, repeat or reorder B's work."""
    await store.enqueue("web", [event(f"f{i}", "alice") for i in range(2)])
    (a_job,) = await store.lease("moe", 1, 0.05)
    await asyncio.sleep(0.1)
    (b_job,) = await store.lease("moe", 1, 30)
    assert b_job.id == a_job.id and b_job.attempts == a_job.attempts + 1
    stale = {a_job.id: a_job.attempts}
    await store.release([a_job.id], fence=stale)
    await store.retry([a_job.id], time.time(), "late", fence=stale)
    await store.dead_letter([DeadLetter(a_job.id, "http_400")], fence=stale)
    await store.discard([Discard(a_job.id, "late")], fence=stale)
    await store.ack([a_job.id], "old", fence=stale)
    # B still holds it, so alice's next event stays blocked behind it, and nothing moved.
    assert await store.lease("moe", 10, 30) == []
    assert await store.list_dead(EVERYTHING) == [] and await store.list_discards(EVERYTHING) == []
    assert await store.delivered_version("moe", "f0") is None
    await store.ack([b_job.id], "new", fence={b_job.id: b_job.attempts})
    assert await store.delivered_version("moe", "f0") == "new"
    assert [j.message_id for j in await store.lease("moe", 10, 30)] == ["f1"]


async def test_a_late_holder_cannot_settle_a_job_released_and_leased_again(store: Store) -> None:
    """A's lease lapses, B leases the job and gives it back (release), C leases it: A's
    stale fence must not match C's lease (the lapsed attempt still counts)."""
    await store.enqueue("web", [event(f"r{i}", "alice") for i in range(2)])
    (a_job,) = await store.lease("moe", 1, 0.05)
    await asyncio.sleep(0.1)
    (b_job,) = await store.lease("moe", 1, 30)
    await store.release([b_job.id], fence={b_job.id: b_job.attempts})
    (c_job,) = await store.lease("moe", 1, 30)
    assert (c_job.id, c_job.attempts) == (a_job.id, 2)
    assert c_job.first_attempt_at == pytest.approx(a_job.first_attempt_at)
    await store.ack([a_job.id], "old", fence={a_job.id: a_job.attempts})
    # C still holds r0: alice's r1 stays blocked behind it.
    assert await store.lease("moe", 10, 30) == []


async def test_one_ack_settles_only_the_jobs_still_on_its_lease(store: Store) -> None:
    """An ack names jobs leased at different attempt counts, some of them since leased
    again by another worker: it settles exactly those whose count still matches, and a
    job it names without a fence entry is settled unfenced."""
    await store.enqueue("web", [event("g0", "ann"), event("g1", "bob"), event("g2", "cy"), event("g3", "dee")])
    first = await store.lease("moe", 2, 0.05)  # g0, g1
    await asyncio.sleep(0.1)
    again = await store.lease("moe", 4, 30)  # g0 and g1 again (lapsed), g2 and g3 for the first time
    assert [(j.message_id, j.attempts) for j in again] == [("g0", 2), ("g1", 2), ("g2", 1), ("g3", 1)]
    by_id = {j.message_id: j for j in again}
    fence = {first[0].id: first[0].attempts, by_id["g1"].id: 2, by_id["g2"].id: 1}  # g0 stale; g3 absent
    await store.ack([j.id for j in again], "v2", fence=fence)
    assert await store.delivered_version("moe", "g0") is None
    assert [await store.delivered_version("moe", m) for m in ("g1", "g2", "g3")] == ["v2", "v2", "v2"]
    (stats,) = (await store.queue_stats()).values()
    assert stats.depth == 1


async def test_lease_with_zero_limit_or_unknown_destination(store: Store) -> None:
    await store.enqueue("web", [event("m1")])
    assert await store.lease("moe", 0, 30) == []
    assert await store.lease("nowhere", 10, 30) == []


# -- ordering ---------------------------------------------------------------------------------
async def test_a_users_later_event_waits_for_the_earlier_one(store: Store) -> None:
    await store.enqueue(
        "web", [event("a1", "alice"), event("a2", "alice"), event("b1", "bob"), event("n1", ""), event("n2", "")]
    )
    first = await store.lease("moe", 1, 30)
    assert [j.message_id for j in first] == ["a1"]

    # a1 is leased: a2 must not be handed out; bob and key-less events are unaffected.
    second = await store.lease("moe", 10, 30)
    assert [j.message_id for j in second] == ["b1", "n1", "n2"]

    await store.retry([first[0].id], time.time() + 3600, "http_503")
    assert await store.lease("moe", 10, 30) == []  # a1 waits for its retry, a2 still blocked

    # Unordered mode trades ordering for throughput.
    unordered = await store.lease("moe", 10, 30, ordered=False)
    assert [j.message_id for j in unordered] == ["a2"]


async def test_ordering_unblocks_when_the_earlier_event_settles(store: Store) -> None:
    await store.enqueue("web", [event("a1", "alice"), event("a2", "alice"), event("a3", "alice")])
    first = await store.lease("moe", 1, 30)
    assert await store.lease("moe", 10, 30) == []
    await store.ack([first[0].id])
    # Jobs of one user leased together come in ingest order in one batch.
    rest = await store.lease("moe", 10, 30)
    assert [j.message_id for j in rest] == ["a2", "a3"]


async def test_jobs_ahead_are_not_leased_again_and_hold_back_nothing(store: Store) -> None:
    """A loop's next lease while its previous batch is on the wire (``ahead``): that
    batch's users' later jobs come, its own jobs do not, other holders still block."""
    await store.enqueue(
        "web",
        [event("a1", "alice"), event("b1", "bob"), event("a2", "alice"), event("c1", "carol"), event("b2", "bob")],
    )
    mine = await store.lease("moe", 2, 30)
    assert [j.message_id for j in mine] == ["a1", "b1"]
    others = await store.lease("moe", 1, 30, ahead=[j.id for j in mine])
    assert [j.message_id for j in others] == ["a2"]  # alice's next, behind a1 which is ahead
    nxt = await store.lease("moe", 10, 30, ahead=[j.id for j in mine])
    # a2 is leased by someone else (not ahead): alice stays blocked; bob's and carol's come.
    assert [j.message_id for j in nxt] == ["c1", "b2"]
    assert await store.lease("moe", 10, 30, ahead=[j.id for j in mine]) == []


async def test_an_expired_job_ahead_is_not_leased_again_by_its_holder(store: Store) -> None:
    await store.enqueue("web", [event("x1", "xavier"), event("y1", "")])
    held = await store.lease("moe", 10, 0.01)
    await asyncio.sleep(0.05)  # both leases lapse; their holder is still sending them
    for ordered in (True, False):
        again = await store.lease("moe", 10, 30, ordered=ordered, ahead=[held[0].id])
        assert [j.message_id for j in again] == ["y1"]
        await store.release([again[0].id])


async def test_a_blocked_user_does_not_starve_others(store: Store) -> None:
    await store.enqueue("web", [event("first", "heavy")])
    blocker = await store.lease("moe", 1, 30)
    await store.retry([blocker[0].id], time.time() + 3600, "http_500")
    await store.enqueue("web", [event(f"h{i}", "heavy") for i in range(2000)])
    await store.enqueue("web", [event("light", "light")])
    jobs = await store.lease("moe", 5, 30)
    assert [j.message_id for j in jobs] == ["light"]


# -- dead letters and discards ---------------------------------------------------------------
async def _dead(store: Store, n: int, destination: str = "moe") -> list[int]:
    await store.enqueue("web", [event(f"{destination}-d{i}", f"u{i}", destinations=(destination,)) for i in range(n)])
    jobs = await store.lease(destination, 100, 30)
    return [j.id for j in jobs]


async def test_dead_letter_list_and_filters(store: Store) -> None:
    ids = await _dead(store, 3)
    other = await _dead(store, 1, "seg")
    # The store's clock, which stamps failed_at: PostgreSQL's is the database's, which
    # time.time() differs from by the measured offset's error (up to half a round trip,
    # more than the sleep below on a loaded machine).
    t0 = store.now()
    await store.dead_letter(
        [
            DeadLetter(ids[0], "http_400", 400, '{"error":"bad"}', b'{"req":1}', "Order Completed", "v1"),
            DeadLetter(ids[1], "retries_exhausted", 503, "busy", b"{}", "identify", "v1"),
        ]
    )
    await asyncio.sleep(0.05)
    t1 = store.now()
    await store.dead_letter([DeadLetter(other[0], "http_400", 400, "no", b"", "track")])

    every = await store.list_dead(EVERYTHING)
    assert every[0].message_id == "seg-d0"  # newest first
    assert len(every) == 3
    rec = next(r for r in every if r.message_id == "moe-d0")
    assert (rec.destination, rec.source, rec.reason, rec.status) == ("moe", "web", "http_400", 400)
    assert (rec.response_body, rec.request_body, rec.label, rec.mapping_version) == (
        '{"error":"bad"}',
        b'{"req":1}',
        "Order Completed",
        "v1",
    )
    assert orjson.loads(rec.payload)["messageId"] == "moe-d0"
    assert rec.attempts == 1 and rec.first_attempt_at is not None and rec.failed_at >= t0 - 1

    assert {r.message_id for r in await store.list_dead(RecordFilter(destination="moe"))} == {"moe-d0", "moe-d1"}
    assert {r.message_id for r in await store.list_dead(RecordFilter(reason="http_400"))} == {"moe-d0", "seg-d0"}
    assert {r.message_id for r in await store.list_dead(RecordFilter(since=t1))} == {"seg-d0"}
    assert {r.message_id for r in await store.list_dead(RecordFilter(until=t1))} == {"moe-d0", "moe-d1"}
    assert [r.message_id for r in await store.list_dead(RecordFilter(ids=(rec.id,)))] == ["moe-d0"]
    assert await store.list_dead(RecordFilter(ids=())) == []
    assert len(await store.list_dead(EVERYTHING, limit=1)) == 1

    # Dead jobs left the queue; the third job is still leased.
    stats = await store.queue_stats()
    assert (stats["moe"].depth, stats["moe"].dead) == (1, 2)
    assert (stats["seg"].depth, stats["seg"].dead) == (0, 1)


async def test_queue_stats_per_destination_depth_and_head(store: Store) -> None:
    """Depth counts unsettled jobs (leased ones too); the age is the oldest unsettled job's,
    and moves on when that job settles; a destination with nothing queued is absent."""
    before = store.now()  # the clock created_at is stamped by (see the dead letter test)
    await store.enqueue("web", [event("q0", "u0", destinations=("a", "b", "c"))])
    await asyncio.sleep(0.05)
    middle = store.now()
    await store.enqueue("web", [event(f"q{i}", f"u{i}", destinations=("a", "c")) for i in range(1, 4)])
    stats = await store.queue_stats()
    assert {d: s.depth for d, s in stats.items()} == {"a": 4, "b": 1, "c": 4}
    for name in ("a", "b", "c"):
        oldest = stats[name].oldest_created_at
        assert oldest is not None and before <= oldest < middle

    head = await store.lease("a", 1, 30)
    assert (await store.queue_stats())["a"].depth == 4  # leased is not settled
    await store.ack([head[0].id], "v1")
    await store.ack([j.id for j in await store.lease("b", 10, 30)], "v1")
    stats = await store.queue_stats()
    assert "b" not in stats
    assert stats["a"].depth == 3
    oldest = stats["a"].oldest_created_at
    assert oldest is not None and oldest >= middle
    assert stats["c"].oldest_created_at is not None and stats["c"].oldest_created_at < middle


async def test_replay_requeues_fresh_jobs_and_purge_deletes(store: Store) -> None:
    ids = await _dead(store, 3)
    await store.dead_letter([DeadLetter(i, "http_400" if i != ids[2] else "http_422") for i in ids])

    replayed = await store.replay_dead(RecordFilter(reason="http_400"))
    assert replayed == 2
    assert {r.reason for r in await store.list_dead(EVERYTHING)} == {"http_422"}
    jobs = await store.lease("moe", 10, 30)
    assert [(j.message_id, j.ordering_key, j.attempts) for j in jobs] == [("moe-d0", "u0", 1), ("moe-d1", "u1", 1)]
    assert all(j.id not in ids for j in jobs)

    assert await store.purge_dead(RecordFilter(destination="other")) == 0
    assert await store.purge_dead(EVERYTHING) == 1
    assert await store.list_dead(EVERYTHING) == []
    assert (await store.queue_stats())["moe"].dead == 0


async def test_a_filter_may_name_more_ids_and_destinations_than_a_statement_takes_parameters(store: Store) -> None:
    """`bridge dlq replay` takes any number of ids: past PostgreSQL's 32767 parameters a
    statement was refused (a store error) where SQLite replayed them."""
    *ids, _leased = await _dead(store, 5)
    await store.dead_letter([DeadLetter(i, "http_400") for i in ids[:3]])
    await store.discard([Discard(ids[3], "anonymous_user")])  # the fifth stays leased
    known = [r.id for r in await store.list_dead(EVERYTHING)]
    many = (*range(known[0] + 1, known[0] + 40_001), *known)  # 40,000 that name nothing
    names = (*(f"gone-{i}" for i in range(40_000)), "moe")
    assert len(await store.list_dead(RecordFilter(ids=many, destinations=names))) == 3
    assert await store.purge_dead(RecordFilter(ids=many[:-1], destinations=names)) == 2
    assert await store.replay_dead(RecordFilter(ids=many, destinations=names)) == 1
    assert await store.list_dead(EVERYTHING) == []
    (discarded,) = await store.list_discards(EVERYTHING)
    assert await store.replay_discards(RecordFilter(ids=(*many, discarded.id), destinations=names)) == 1
    assert (await store.queue_stats())["moe"].depth == 3  # two replayed, one never settled


async def test_ids_and_texts_no_record_can_have_select_nothing(store: Store) -> None:
    """An id past 64 bits (`bridge dlq show 99999999999999999999`) or a reason that is
    not UTF-8 (a command line's bytes) names no record: SQLite raised OverflowError and
    UnicodeEncodeError (a traceback from the CLI), PostgreSQL a store error."""
    ids = await _dead(store, 2)
    await store.dead_letter([DeadLetter(i, "http_400") for i in ids])
    first, second = sorted(r.id for r in await store.list_dead(EVERYTHING))
    nothing = [
        RecordFilter(ids=(2**63, 2**64, -1, 0)),  # never "no id filter", which would be everything
        RecordFilter(reason="http_400\udcff"),
        RecordFilter(destination="moe\udcff"),
        RecordFilter(destinations=("moe\udcff",)),
    ]
    for flt in nothing:
        assert await store.list_dead(flt) == []
        assert await store.list_discards(flt) == []
        assert await store.replay_dead(flt) == 0
        assert await store.replay_discards(flt) == 0
        assert await store.purge_dead(flt) == 0
    # Beside ids and names that can be stored, they are left out and the rest still match.
    mixed = RecordFilter(ids=(2**64, first, first), destinations=("moe\udcff", "moe"))
    assert [r.id for r in await store.list_dead(mixed)] == [first]
    assert await store.purge_dead(mixed) == 1
    assert [r.id for r in await store.list_dead(EVERYTHING)] == [second]


async def test_since_is_inclusive_and_until_exclusive_for_replay_and_purge(store: Store) -> None:
    """README: a record failed (or discarded) at T is in ``--since T`` and not in
    ``--until T``, for a replay and a purge as for a listing."""
    replayed, purged, discarded = await _dead(store, 3)
    await store.dead_letter([DeadLetter(replayed, "http_400"), DeadLetter(purged, "http_422")])
    await store.discard([Discard(discarded, "anonymous_user")])
    at = {r.reason: r.failed_at for r in await store.list_dead(EVERYTHING)}
    (discard,) = await store.list_discards(EVERYTHING)
    assert await store.replay_dead(RecordFilter(reason="http_400", until=at["http_400"])) == 0
    assert await store.replay_dead(RecordFilter(reason="http_400", since=at["http_400"])) == 1
    assert await store.purge_dead(RecordFilter(until=at["http_422"])) == 0
    assert await store.purge_dead(RecordFilter(since=at["http_422"], until=at["http_422"])) == 0
    assert await store.purge_dead(RecordFilter(since=at["http_422"])) == 1
    assert await store.replay_discards(RecordFilter(until=discard.discarded_at)) == 0
    assert await store.replay_discards(RecordFilter(since=discard.discarded_at)) == 1
    assert (await store.queue_stats())["moe"].depth == 2


async def test_replays_and_a_purge_at_once_move_each_dead_letter_once(factory: StoreFactory) -> None:
    """The admin API (the server's store) and the CLI (its own, on the same database)
    replay the same dead letters while the CLI purges them: each ends in exactly one
    place, a job or gone, never both and never two jobs."""
    server = await factory.new()
    cli = await factory.new(upgrade=False, create=False)
    ids = await _dead(server, 50)
    await server.dead_letter([DeadLetter(i, "http_400") for i in ids])
    named = RecordFilter(ids=tuple(r.id for r in await server.list_dead(EVERYTHING, 100)), destinations=("moe",))
    by_admin, by_cli, purged = await asyncio.gather(
        server.replay_dead(named), cli.replay_dead(named), cli.purge_dead(RecordFilter(reason="http_400"))
    )
    assert by_admin + by_cli + purged == 50
    assert await server.list_dead(EVERYTHING) == []
    queued = [j.message_id for j in await server.lease("moe", 100, 30)]
    assert len(queued) == len(set(queued)) == by_admin + by_cli


async def test_replays_and_purges_in_slices_take_every_matching_record_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay or purge goes RECORD_SLICE records at a time: with slices of 3, ten dead
    letters among others that do not match (one slice over), and nine discards (slices
    that end just at the last record), are each moved or deleted once, in id order, and
    counted as a single statement counted them."""
    monkeypatch.setattr("bridge.store.sqlite.RECORD_SLICE", 3)
    monkeypatch.setattr("bridge.store.postgres.RECORD_SLICE", 3)
    await store.enqueue("web", [event(f"m{i}", f"u{i}", destinations=("moe", "seg")) for i in range(10)])
    await store.enqueue("web", [event(f"x{i}", f"v{i}") for i in range(9)])
    moe = await store.lease("moe", 100, 30)
    seg = await store.lease("seg", 100, 30)
    dead = [j for j in moe if j.message_id.startswith("m")]
    await store.dead_letter([DeadLetter(j.id, "http_400") for pair in zip(dead, seg, strict=True) for j in pair])
    await store.discard([Discard(j.id, "anonymous_user") for j in moe if j.message_id.startswith("x")])

    assert await store.replay_dead(RecordFilter(destination="moe", reason="http_400")) == 10
    assert await store.replay_discards(RecordFilter(reason="anonymous_user")) == 9
    queued = [j.message_id for j in await store.lease("moe", 100, 30)]
    assert queued == [f"m{i}" for i in range(10)] + [f"x{i}" for i in range(9)]
    assert [r.destination for r in await store.list_dead(EVERYTHING, 100)] == ["seg"] * 10
    assert await store.replay_dead(RecordFilter(destination="moe")) == 0
    assert await store.list_discards(EVERYTHING) == []

    assert await store.purge_dead(RecordFilter(destination="seg", since=0.0)) == 10
    assert await store.purge_dead(EVERYTHING) == 0
    assert await store.list_dead(EVERYTHING) == []


async def test_discards_are_recorded_and_leave_the_queue(store: Store) -> None:
    ids = await _dead(store, 2)
    await store.discard(
        [Discard(ids[0], "anonymous_user", "track", "no userId"), Discard(ids[1], "invalid_customer_id")]
    )
    records = await store.list_discards(EVERYTHING)
    assert {(r.message_id, r.reason) for r in records} == {
        ("moe-d0", "anonymous_user"),
        ("moe-d1", "invalid_customer_id"),
    }
    anon = await store.list_discards(RecordFilter(reason="anonymous_user"))
    assert [(r.label, r.detail, r.destination, r.source) for r in anon] == [("track", "no userId", "moe", "web")]
    assert orjson.loads(anon[0].payload)["messageId"] == "moe-d0"
    assert await store.list_discards(RecordFilter(destination="x")) == []
    assert await store.lease("moe", 10, 30) == []
    assert (await store.queue_stats()).get("moe") is None


async def test_replayed_discards_are_queued_again_in_their_users_order(store: Store) -> None:
    """A mapping deployed with a mistake discards what it should send: once it is fixed,
    the discards go back to the queue, as dead letters do, each with its ordering key."""
    await store.enqueue("web", [event("r1", "alice"), event("r2", "bob"), event("r3", "alice")])
    jobs = await store.lease("moe", 10, 30)
    assert [j.message_id for j in jobs] == ["r1", "r2", "r3"]
    await store.discard([Discard(j.id, "anonymous_user") for j in jobs[:2]], fence={j.id: j.attempts for j in jobs})
    await store.discard([Discard(jobs[2].id, "loop")], fence={jobs[2].id: jobs[2].attempts})
    assert await store.replay_discards(RecordFilter(destination="other")) == 0
    assert await store.replay_discards(RecordFilter(reason="anonymous_user")) == 2
    assert [r.reason for r in await store.list_discards(EVERYTHING)] == ["loop"]  # the rest stay
    again = await store.lease("moe", 10, 30)
    assert [(j.message_id, j.ordering_key, j.attempts) for j in again] == [("r1", "alice", 1), ("r2", "bob", 1)]
    assert orjson.loads(again[0].payload)["messageId"] == "r1"
    assert (await store.queue_stats())["moe"].depth == 2


# -- outputs already delivered (bridge/delivery/outputs.py) ---------------------------------
# Two digests' worth of bytes each: the store keeps them as they are, whatever they hold.
SENT_A, SENT_B = b"A" * 8, b"B" * 8


async def _delivered_by_id(store: Store) -> dict[str, bytes]:
    return {j.message_id: j.delivered_outputs for j in await store.lease("moe", 10, 30)}


async def test_a_retried_or_released_job_keeps_the_outputs_it_delivered(store: Store) -> None:
    await store.enqueue("web", [event(f"p{i}", f"u{i}") for i in range(4)])
    p0, p1, p2, p3 = await store.lease("moe", 10, 30)
    assert {j.delivered_outputs for j in (p0, p1, p2, p3)} == {b""}  # nothing recorded for a new job
    fence = {j.id: j.attempts for j in (p0, p1, p2, p3)}
    now = time.time()
    delivered = {p0.id: SENT_A, p1.id: SENT_B, p3.id: SENT_A}  # p3 is not settled with it below
    await store.retry([p0.id, p2.id], now - 1, "http_500", fence=fence, delivered=delivered)
    await store.release([p1.id], fence=fence, delivered=delivered)
    await store.release([p3.id], fence=fence)
    assert await _delivered_by_id(store) == {"p0": SENT_A, "p1": SENT_B, "p2": b"", "p3": b""}


async def test_what_a_job_delivered_survives_later_settles_that_name_nothing(store: Store) -> None:
    await store.enqueue("web", [event("k1", "u1")])
    [job] = await store.lease("moe", 10, 30)
    await store.retry([job.id], time.time() - 1, "http_500", fence={job.id: job.attempts}, delivered={job.id: SENT_A})
    [job] = await store.lease("moe", 10, 30)
    await store.retry([job.id], time.time() - 1, "http_503", fence={job.id: job.attempts})
    [job] = await store.lease("moe", 10, 30)
    await store.release([job.id], fence={job.id: job.attempts})
    [job] = await store.lease("moe", 10, 30)
    assert job.delivered_outputs == SENT_A
    # More delivered since: the worker names them all.
    await store.retry(
        [job.id], time.time() - 1, "http_500", fence={job.id: job.attempts}, delivered={job.id: SENT_A + SENT_B}
    )
    assert await _delivered_by_id(store) == {"k1": SENT_A + SENT_B}


async def test_a_deferred_job_keeps_the_outputs_it_delivered(store: Store) -> None:
    """An unordered job whose merge waits for its user's earlier jobs (Store.defer) may have
    had its other outputs accepted first: its next lease must name them, or they go out again."""
    await store.enqueue("web", [event("d1", "u1"), event("d2", "u2")])
    d1, d2 = await store.lease("moe", 10, 30, ordered=False)
    fence = {j.id: j.attempts for j in (d1, d2)}
    await store.defer([d1.id, d2.id], time.time() - 1, "waiting", fence=fence, delivered={d1.id: SENT_A})
    again = {j.message_id: j for j in await store.lease("moe", 10, 30, ordered=False)}
    assert {m: j.delivered_outputs for m, j in again.items()} == {"d1": SENT_A, "d2": b""}
    assert again["d1"].attempts == 1  # still a deferral: the wait is no attempt
    # A later deferral that names nothing new keeps what was recorded.
    await store.defer([again["d1"].id], time.time() - 1, "waiting", fence={again["d1"].id: again["d1"].attempts})
    assert (await _delivered_by_id(store))["d1"] == SENT_A


async def test_a_late_holder_records_no_delivered_outputs(store: Store) -> None:
    await store.enqueue("web", [event("late", "u1")])
    [first] = await store.lease("moe", 10, 0)  # lapses at once
    [second] = await store.lease("moe", 10, 30)
    stale = {first.id: first.attempts}
    await store.retry([first.id], time.time() - 1, "http_500", fence=stale, delivered={first.id: SENT_A})
    await store.release([first.id], fence=stale, delivered={first.id: SENT_B})
    await store.release([second.id], fence={second.id: second.attempts})
    assert await _delivered_by_id(store) == {"late": b""}


async def test_a_late_holder_neither_delays_nor_rewrites_a_job_given_back_since(store: Store) -> None:
    """A's lease lapses, B leases the job and gives it back with the outputs it delivered:
    the row's count is then A's again (the lapsed attempt counts). A's late defer and retry
    must not hold the job back (SQLite's defer did, until A's time) nor put A's outputs in
    place of B's (SQLite's did: B's were then sent again)."""
    await store.enqueue("web", [event("given", "u1")])
    [a_job] = await store.lease("moe", 10, 0)  # lapses at once
    [b_job] = await store.lease("moe", 10, 30)
    await store.release([b_job.id], fence={b_job.id: b_job.attempts}, delivered={b_job.id: SENT_B})
    stale = {a_job.id: a_job.attempts}
    await store.defer([a_job.id], time.time() + 3600, "waiting", fence=stale, delivered={a_job.id: SENT_A})
    await store.retry([a_job.id], time.time() + 3600, "http_500", fence=stale, delivered={a_job.id: SENT_A})
    await store.release([a_job.id], fence=stale, delivered={a_job.id: SENT_A})
    [again] = await store.lease("moe", 10, 30)
    assert (again.id, again.attempts, again.delivered_outputs) == (a_job.id, 2, SENT_B)


async def test_dead_letters_and_discards_keep_delivered_outputs_for_their_replay(store: Store) -> None:
    await store.enqueue("web", [event(f"r{i}", f"u{i}") for i in range(4)])
    jobs = await store.lease("moe", 10, 30)
    fence = {j.id: j.attempts for j in jobs}
    # r0 and r2 recorded outputs delivered on an earlier attempt; r3 none.
    await store.retry(
        [j.id for j in jobs],
        time.time() - 1,
        "http_500",
        fence=fence,
        delivered={
            jobs[0].id: SENT_A,
            jobs[2].id: SENT_A,
        },
    )
    r0, r1, r2, r3 = await store.lease("moe", 10, 30)
    fence = {j.id: j.attempts for j in (r0, r1, r2, r3)}
    await store.dead_letter(
        [
            DeadLetter(r0.id, "http_400"),  # names none: the job's own record is kept
            DeadLetter(r1.id, "http_400", delivered_outputs=SENT_B),  # delivered in this attempt
            DeadLetter(r3.id, "http_400"),
        ],
        fence=fence,
    )
    await store.discard([Discard(r2.id, "anonymous_user")], fence=fence)
    assert await store.replay_dead(RecordFilter(reason="http_400")) == 3
    assert await store.replay_discards(RecordFilter(reason="anonymous_user")) == 1
    assert await _delivered_by_id(store) == {"r0": SENT_A, "r1": SENT_B, "r2": SENT_A, "r3": b""}


async def test_settling_a_job_twice_has_no_effect(store: Store) -> None:
    ids = await _dead(store, 1)
    await store.ack(ids, "v1")
    await store.dead_letter([DeadLetter(ids[0], "late")])
    await store.discard([Discard(ids[0], "late")])
    assert await store.list_dead(EVERYTHING) == []
    assert await store.list_discards(EVERYTHING) == []
    assert await store.delivered_version("moe", "moe-d0") == "v1"


# -- stats, versions, state ---------------------------------------------------------------------
async def test_queue_stats(store: Store) -> None:
    assert await store.queue_stats() == {}
    before = time.time()
    await store.enqueue("web", [event("m1", destinations=("a", "b")), event("m2", destinations=("a",))])
    stats = await store.queue_stats()
    assert set(stats) == {"a", "b"}
    assert (stats["a"].depth, stats["b"].depth, stats["a"].dead) == (2, 1, 0)
    assert stats["a"].oldest_created_at is not None and stats["a"].oldest_created_at >= before - 1
    jobs = await store.lease("a", 10, 30)
    assert (await store.queue_stats())["a"].depth == 2  # leased still counts
    await store.ack([j.id for j in jobs])
    assert "a" not in await store.queue_stats()


async def test_delivered_version(store: Store) -> None:
    await store.enqueue("web", [event("m1", destinations=("a", "b"))])
    assert await store.delivered_version("a", "m1") is None
    jobs = await store.lease("a", 10, 30)
    await store.ack([jobs[0].id], "sha-1")
    assert await store.delivered_version("a", "m1") == "sha-1"
    assert await store.delivered_version("b", "m1") is None


async def test_destination_state_round_trip(store: Store) -> None:
    assert await store.get_destination_states() == {}
    await store.set_destination_state(DestinationState("moe", True, "dead-letter ratio 0.8", 100.0, {"mapping": "v1"}))
    await store.set_destination_state(DestinationState("seg"))
    states = await store.get_destination_states()
    assert states["moe"] == DestinationState("moe", True, "dead-letter ratio 0.8", 100.0, {"mapping": "v1"})
    assert states["seg"] == DestinationState("seg")
    await store.set_destination_state(DestinationState("moe", False, "resumed by CLI", 200.0))
    assert (await store.get_destination_states())["moe"] == DestinationState("moe", False, "resumed by CLI", 200.0)


async def test_prune_forgets_old_dedupe_keys_delivered_jobs_and_discards(store: Store) -> None:
    ids = await _dead(store, 3)
    await store.ack([ids[0]], "v1")
    await store.discard([Discard(ids[1], "anonymous_user")])
    now = time.time()
    assert await store.prune(now - 3600, now - 3600) == 0
    removed = await store.prune(now + 1, now + 1)
    assert removed == 3 + 1 + 1  # three dedupe keys, one delivered job, one discard
    assert await store.delivered_version("moe", "moe-d0") is None
    assert await store.list_discards(EVERYTHING) == []
    assert (await store.queue_stats())["moe"].depth == 1  # the unsettled job is kept
    # The dedupe key is gone, so the same message id is accepted again.
    again = await store.enqueue("web", [event("moe-d0", "u0")])
    assert again.stored == 1


async def test_check_writable_passes_on_a_healthy_store(store: Store) -> None:
    await store.check_writable()


async def _exists(factory: StoreFactory) -> bool:
    if factory.kind == "sqlite":
        return os.path.exists(factory.location)
    import asyncpg

    from tests.store.conftest import PG_DSN

    conn = await asyncpg.connect(PG_DSN)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", factory.location))
    finally:
        await conn.close()


async def test_without_create_only_an_existing_store_opens(factory: StoreFactory) -> None:
    """What the CLI opens (``create=False``): a store that is not there is an error, not
    a new, empty one on which a pause or a replay would then "succeed" unseen."""
    from bridge.store import open_store

    missing = open_store(factory.url, **factory.options(upgrade=False, create=False))
    with pytest.raises(StoreError, match=r"no (bridge )?store"):
        await missing.open()
    assert not await _exists(factory)  # nothing was created
    server = await factory.new()
    await server.enqueue("web", [event("m1", "u1")])
    cli = await factory.new(upgrade=False, create=False)
    assert (await cli.queue_stats())["moe"].depth == 1
    await cli.set_destination_state(DestinationState("moe", True, "paused from the CLI", 1.0))
    assert (await server.get_destination_states())["moe"].paused


# -- backpressure, group commit, durability ---------------------------------------------------------
async def test_store_full_when_over_max_bytes(factory: StoreFactory) -> None:
    store = await factory.new(max_bytes=400_000)
    stored = 0
    with pytest.raises(StoreFull, match="limit"):
        for i in range(1000):
            result = await store.enqueue("web", [event(f"m{i}-{k}", size=2000) for k in range(20)])
            stored += result.stored
    assert 0 < stored < 1000 * 20
    depth = (await store.queue_stats())["moe"].depth
    with pytest.raises(StoreFull):
        await store.enqueue("web", [event("late")])
    assert (await store.queue_stats())["moe"].depth == depth  # rejected before writing
    with pytest.raises(StoreFull):
        await store.check_writable()  # not ready: ingest would refuse events
    # Operators and delivery can still write (settling jobs is what frees the space).
    await store.set_destination_state(DestinationState("moe", True, "full", time.time()))
    jobs = await store.lease("moe", 5, 30)
    await store.ack([j.id for j in jobs])


async def test_concurrent_enqueues_share_commits(store: Store) -> None:
    before = store.commits  # type: ignore[attr-defined]
    calls = 200
    results = await asyncio.gather(*(store.enqueue("web", [event(f"c{i}", f"u{i}")]) for i in range(calls)))
    commits = store.commits - before  # type: ignore[attr-defined]
    assert sum(r.stored for r in results) == calls
    assert 1 <= commits <= calls // 4, f"{calls} concurrent enqueues took {commits} commits"
    assert (await store.queue_stats())["moe"].depth == calls


async def test_a_failing_call_fails_alone_and_leaves_nothing_behind(store: Store) -> None:
    from bridge.store.base import IncomingEvent

    bad = IncomingEvent("bad", "u1", object(), ("moe",))  # type: ignore[arg-type]
    outcomes = await asyncio.gather(
        store.enqueue("web", [event("ok1")]),
        store.enqueue("web", [event("bad-dedupe"), bad]),
        store.enqueue("web", [event("ok2")]),
        return_exceptions=True,
    )
    assert not isinstance(outcomes[0], BaseException) and outcomes[0].stored == 1
    assert isinstance(outcomes[1], StoreError)
    assert not isinstance(outcomes[2], BaseException) and outcomes[2].stored == 1
    # The failed call's first event left no dedupe key behind.
    retried = await store.enqueue("web", [event("bad-dedupe")])
    assert retried.stored == 1
    assert sorted(j.message_id for j in await store.lease("moe", 10, 30)) == ["bad-dedupe", "ok1", "ok2"]


async def test_everything_survives_close_and_reopen(factory: StoreFactory) -> None:
    store = await factory.new()
    await store.enqueue("web", [event("m1", "u1", links=(IdentityLink("moe", "u1", "id-1"),)), event("m2", "u2")])
    jobs = await store.lease("moe", 1, 30)
    await store.dead_letter([DeadLetter(jobs[0].id, "http_400", 400)])
    await store.set_destination_state(DestinationState("moe", True, "guard"))
    await store.close()

    reopened = await factory.new()
    assert (await reopened.enqueue("web", [event("m1"), event("m3")])).duplicate_indexes == (0,)
    assert [j.message_id for j in await reopened.lease("moe", 10, 30)] == ["m2", "m3"]
    assert [r.message_id for r in await reopened.list_dead(EVERYTHING)] == ["m1"]
    assert await reopened.resolve_links("moe", ["u1"]) == {"u1": "id-1"}
    assert (await reopened.get_destination_states())["moe"].paused is True


async def test_closed_store_raises_store_error(factory: StoreFactory) -> None:
    store = await factory.new()
    await store.close()
    with pytest.raises(StoreError):
        await store.enqueue("web", [event("m1")])


async def test_a_huge_blocked_backlog_does_not_starve_other_users(factory: StoreFactory) -> None:
    """One user's 30k queued jobs sit behind their own job that waits for a retry; another
    user's single job, queued after all of them, must still be leased."""
    store = await factory.new()
    await store.enqueue("web", [event("hot-0", user="hot")])
    (first,) = await store.lease("moe", 10, 30)
    await store.retry([first.id], time.time() + 3600, "http 503")
    for chunk in range(30):
        await store.enqueue("web", [event(f"hot-{chunk}-{i}", user="hot") for i in range(1000)])
    await store.enqueue("web", [event("cold-0", user="cold")])
    jobs = await store.lease("moe", 500, 30, ordered=True)
    assert [j.message_id for j in jobs] == ["cold-0"]
    await store.close()


async def test_nul_characters_do_not_break_writes(factory: StoreFactory) -> None:
    """A U+0000 in an id, event name or upstream body (PostgreSQL text cannot hold it)
    must neither fail the commit nor the settlement."""
    store = await factory.new()
    result = await store.enqueue("web", [event("m\x00a", user="u\x00"), event("m-ok", user="u")])
    assert result.stored == 2
    assert (await store.enqueue("web", [event("m\x00a", user="u\x00")])).duplicates == 1
    jobs = await store.lease("moe", 10, 30, ordered=False)
    assert len(jobs) == 2
    await store.discard([Discard(jobs[0].id, "anonymous_user", "Bad\x00Name", "detail\x00")])
    await store.dead_letter([DeadLetter(jobs[1].id, "http_400", 400, "body\x00", b"{}", "E\x00")])
    await store.retry([], time.time(), "x\x00")
    assert len(await store.list_discards(EVERYTHING)) == 1
    assert len(await store.list_dead(EVERYTHING)) == 1
    await store.close()


async def test_users_waiting_names_the_users_with_an_older_unsettled_job(store: Store) -> None:
    # What an unordered destination asks before sending a deletion (Store.users_waiting).
    merged = ordering_key("anon-9", "alice")
    await store.enqueue(
        "web",
        [
            event("w1", "alicex"),  # a key that only contains the name is another user
            event("w2", "bob", destinations=("other",)),  # another destination's job
            IncomingEvent("w3", merged, b"{}", ("moe",), ()),  # an alias: both users' job
            event("w4", "bob"),
            event("w5", "alice"),
        ],
    )
    jobs = {j.message_id: j for j in await store.lease("moe", 10, 30, ordered=False)}
    last = jobs["w5"].id
    assert await store.users_waiting("moe", last, ["alice", "bob", "carol"]) == {"alice", "bob"}
    assert await store.users_waiting("moe", last, ["alice"], ignore=[jobs["w3"].id]) == set()
    assert await store.users_waiting("moe", jobs["w3"].id, ["alice", "bob"]) == set()
    assert await store.users_waiting("moe", last, ["anon-9"]) == {"anon-9"}
    # Waiting for a retry counts; settled (delivered or dead-lettered) does not.
    fence = {j.id: j.attempts for j in jobs.values()}
    await store.retry([jobs["w4"].id], store.now() + 60, "http_500", fence=fence)
    assert await store.users_waiting("moe", last, ["bob"]) == {"bob"}
    await store.ack([jobs["w3"].id], fence=fence)
    await store.dead_letter([DeadLetter(jobs["w4"].id, "http_400")], fence=fence)
    assert await store.users_waiting("moe", last, ["alice", "bob", "anon-9"]) == set()


async def test_a_deferred_job_waits_without_spending_an_attempt(store: Store) -> None:
    # A job held back untried (an unordered deletion waiting for its user's earlier jobs):
    # due again later, as a retry is, but its wait is not an attempt (Store.defer).
    await store.enqueue("web", [event("m1", "u1"), event("m2", "u2")])
    m1, m2 = await store.lease("moe", 10, 30, ordered=False)
    await store.retry([m2.id], time.time() + 3600, "http_500")  # m2 had a try: it counts
    for _ in range(3):
        await store.defer([m1.id], time.time() + 3600, "waiting", fence={m1.id: m1.attempts})
        assert await store.lease("moe", 10, 30, ordered=False) == []  # not due before its time
        assert await store.make_due("moe") >= 1
        (m1,) = [j for j in await store.lease("moe", 10, 30, ordered=False) if j.message_id == "m1"]
        assert m1.attempts == 1  # never more than this lease's own
    await store.defer([m1.id], time.time() - 1, "waiting", fence={m1.id: m1.attempts})
    (again,) = [j for j in await store.lease("moe", 10, 30, ordered=False) if j.message_id == "m1"]
    assert again.attempts == 1
