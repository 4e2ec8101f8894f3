"""How a probe cuts a request in ordered delivery (worker._apart_by_users): two parts no
user spans, so the second may go out whatever became of the first."""

from __future__ import annotations

import random

from bridge.delivery.worker import _apart_by_users, _Batch
from bridge.destinations.base import Item, Request
from bridge.mapping.api import Output
from bridge.store.base import Job
from bridge.store.ordering import KEY_SEPARATOR


def _batch(keys: dict[int, str]) -> _Batch:
    jobs = {i: Job(i, "d", "s", f"m{i}", key, b"{}", 3, 0.0, 0.0) for i, key in keys.items()}
    return _Batch(jobs, 0.0)


def _request(job_ids: list[int]) -> Request:
    return Request("bulk", [Item(j, Output("event", {}), b"{}") for j in job_ids])


def _users(batch: _Batch, request: Request) -> set[str]:
    return {u for it in request.items for u in batch.jobs[it.job_id].ordering_key.split(KEY_SEPARATOR) if u}


def test_two_events_of_each_user_are_cut_between_users_not_down_the_middle() -> None:
    batch = _batch({i: f"user-{i % 4}" for i in range(8)})
    parts = _apart_by_users(_request(list(range(8))), batch)
    assert parts is not None
    first, second = parts
    assert [it.job_id for it in first.items] == [0, 1, 4, 5]
    assert [it.job_id for it in second.items] == [2, 3, 6, 7]


def test_no_cut_when_one_user_or_a_chain_of_users_spans_the_request() -> None:
    assert _apart_by_users(_request([0, 1, 2]), _batch({0: "a", 1: "a", 2: "a"})) is None
    chain = {0: "a", 1: f"a{KEY_SEPARATOR}b", 2: f"b{KEY_SEPARATOR}c", 3: "c"}  # merges link them all
    assert _apart_by_users(_request([0, 1, 2, 3]), _batch(chain)) is None


def test_random_requests_are_cut_into_parts_sharing_no_user_in_their_order() -> None:
    rng = random.Random(11)
    cut = 0
    for _ in range(300):
        n = rng.randrange(2, 30)
        keys = {
            i: KEY_SEPARATOR.join(f"u{rng.randrange(12)}" for _ in range(rng.choice((0, 1, 1, 1, 2)))) for i in range(n)
        }
        batch = _batch(keys)
        request = _request([j for j in range(n) for _ in range(rng.choice((1, 1, 2)))])  # some jobs twice
        parts = _apart_by_users(request, batch)
        if parts is None:
            continue
        first, second = parts
        assert first.items and second.items
        assert _users(batch, first).isdisjoint(_users(batch, second))
        assert sorted(map(id, first.items + second.items)) == sorted(map(id, request.items))
        where = {id(it): n for n, it in enumerate(request.items)}
        for part in parts:  # each in the request's order
            positions = [where[id(it)] for it in part.items]
            assert positions == sorted(positions)
        cut += 1
    assert cut > 100  # most random requests have a cut
