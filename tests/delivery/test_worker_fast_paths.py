"""The worker's fast paths against the general code they stand in for."""

from __future__ import annotations

import random

from bridge.delivery.policy import Action
from bridge.delivery.worker import Verdict, _all_delivered, _Batch, _judge, _judge_first
from bridge.destinations.base import Request


def verdict(action: Action) -> Verdict:
    return Verdict(action, None, Request("bulk", []))


def test_judging_a_request_of_fresh_jobs_in_c_is_judging_it_item_by_item() -> None:
    rng = random.Random(3)
    for _ in range(200):
        fast, slow = _Batch({}, 0.0), _Batch({}, 0.0)
        job_ids = rng.sample(range(50), rng.randrange(0, 20))  # one item a job, none judged yet
        for batch in (fast, slow):
            # Some jobs have several items (2 left), some none recorded (the default, 1).
            batch.items_left.update({j: random.Random(j).choice((1, 2)) for j in job_ids[::2]})
            batch.verdicts.update({j: verdict(Action.RETRY) for j in range(50, 60)})  # other jobs
        given = verdict(rng.choice(list(Action)))
        _judge_first(fast, job_ids, given)
        _judge(slow, job_ids, given)
        assert fast.items_left == slow.items_left
        assert fast.verdicts == slow.verdicts


def settled_one_by_one(batch: _Batch, job_items: list[int]) -> bool:
    """What _settle's job-by-job look makes of the jobs: all acked?"""
    for job_id in job_items:
        v = batch.verdicts.get(job_id)
        if job_id in batch.deferred and (v is None or v.action is Action.DELIVERED):
            return False  # deferred
        if v is None or (job_id in batch.unsent and v.action is Action.DELIVERED):
            return False  # released
        if v.action is not Action.DELIVERED:
            return False  # retried, dead-lettered or held
    return True


def test_all_delivered_is_what_settling_job_by_job_finds() -> None:
    rng = random.Random(5)
    seen = set()
    for _ in range(500):
        batch = _Batch({}, 0.0)
        job_items = list(range(rng.randrange(0, 6)))
        for job_id in job_items:
            roll = rng.random()
            if roll < 0.85:
                batch.verdicts[job_id] = verdict(Action.DELIVERED)
            elif roll < 0.95:
                batch.verdicts[job_id] = verdict(rng.choice([a for a in Action if a is not Action.DELIVERED]))
            if rng.random() < 0.05:
                batch.unsent.add(job_id)
            if rng.random() < 0.05:
                batch.deferred.add(job_id)
        expected = settled_one_by_one(batch, job_items)
        assert _all_delivered(batch, job_items) == expected
        seen.add(expected)
    assert seen == {True, False}
