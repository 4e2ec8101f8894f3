"""The worker's fast paths against the general code they stand in for."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from bridge.config.model import build_config
from bridge.delivery.policy import Action
from bridge.delivery.worker import DestinationWorker, Verdict, _all_delivered, _Batch, _judge, _judge_first
from bridge.destinations.base import Item, Request
from bridge.mapping.api import CompiledMapping, Output
from bridge.store.base import DeadLetter, Discard, Job, Store
from tests.e2e.harness import config_dict


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


class _Mapping:
    """A stand-in compiled mapping: each event's ``outputs`` field is its outputs."""

    version = "v1"

    def identity_ids(self, event: dict[str, Any], options: Any = None) -> list[str]:
        return []

    def apply(self, event: dict[str, Any], ctx: Any) -> list[Output]:
        return [Output(kind, body) for kind, body in event["outputs"]]


class _Store:
    def __init__(self) -> None:
        self.dead: list[DeadLetter] = []
        self.discarded: list[int] = []

    async def dead_letter(self, entries: list[DeadLetter], *, fence: Any = None) -> None:
        self.dead.extend(entries)

    async def discard(self, entries: list[Discard], *, fence: Any = None) -> None:
        self.discarded.extend(d.job_id for d in entries)


def _job(job_id: int, payload: bytes) -> Job:
    return Job(job_id, "moengage", "web", f"m{job_id}", f"u{job_id}", payload, 1, 0.0, 0.0, b"")


@pytest.mark.parametrize("corrupt", [False, True])
async def test_mapping_a_lease_makes_an_item_an_output_with_one_output_or_several(
    tmp_path: Path, corrupt: bool
) -> None:
    """_map's shortcuts (a lease's payloads parsed at once, an event's one output made
    without a comprehension) against what the general ways give (a corrupt payload among
    good ones parses them one by one), with events of none, one and several outputs."""
    config = build_config(config_dict(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9"))
    store = _Store()
    worker = DestinationWorker(config.destinations[0], cast(Store, store), lambda: {})
    outputs: dict[int, list[tuple[str, dict[str, Any]]]] = {
        1: [("customer", {"customer_id": "a"})],
        2: [("customer", {"customer_id": "b"}), ("event", {"customer_id": "b", "actions": []})],
        4: [("event", {"customer_id": "d", "actions": [{"action": "x"}]})],
        5: [],
    }
    payloads = {job_id: orjson.dumps({"outputs": outs}) for job_id, outs in outputs.items()}
    if corrupt:
        payloads[3] = b"{not json"
    jobs = [_job(job_id, payloads[job_id]) for job_id in sorted(payloads)]
    batch = worker._batch(jobs, after=None)
    items, job_items = await worker._map(batch, cast(CompiledMapping, _Mapping()))
    expected = {
        job_id: [Item(job_id, Output(kind, body), orjson.dumps(body)) for kind, body in outs]
        for job_id, outs in outputs.items()
        if outs
    }
    assert job_items == expected
    assert items == [item for job_id in (1, 2, 4) for item in expected[job_id]]
    assert batch.items_left == {1: 1, 2: 2, 4: 1}
    assert list(batch.events) == [1, 2, 4, 5]  # in lease order, the corrupt one left out
    assert [(d.job_id, d.reason) for d in store.dead] == ([(3, "corrupt_payload")] if corrupt else [])
    assert store.discarded == [5]  # no output
