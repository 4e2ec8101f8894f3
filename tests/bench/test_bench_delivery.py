"""The in-process delivery bench: real store, mapping and worker; the upstream answered in-process.

No timing assertions: only that every stored event is delivered once, that delivery
settings reach the worker, and that the step costs are measured on mapped events.
"""

from __future__ import annotations

import argparse

import pytest

from bench.bench_delivery import _setting, bench_events, deliver_run, step_costs


def test_bench_events_are_the_batch_mix_with_fresh_ids() -> None:
    events = bench_events(250)
    assert len(events) == 250
    assert len({e["messageId"] for e in events}) == 250
    assert {e["type"] for e in events} == {"identify", "track", "page"}


async def test_every_stored_event_is_delivered_once() -> None:
    run = await deliver_run(600)
    assert run.items == 600  # the in-process upstream counted each event's item once
    assert 1 <= run.requests < 600  # items went out packed into bulk requests
    assert run.cpu_us_per_event > 0


async def test_delivery_settings_reach_the_worker() -> None:
    # A lease of 50 jobs is packed and sent on its own: at least one request per lease.
    run = await deliver_run(600, {"batch_size": 50})
    assert run.items == 600
    assert run.requests >= 600 // 50


async def test_step_costs_are_measured_on_mapped_events() -> None:
    steps = await step_costs(120)
    assert steps.parse > 0 and steps.map > 0 and steps.encode > 0


def test_settings_parse_json_values_and_refuse_a_missing_value() -> None:
    assert _setting("concurrency=3") == ("concurrency", 3)
    assert _setting("ordered=false") == ("ordered", False)
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _setting("concurrency")
