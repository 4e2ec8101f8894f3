"""packing.chunk against the plain greedy packing it must reproduce."""

from __future__ import annotations

import random
from collections.abc import Callable

import orjson
import pytest

from bridge.destinations.base import Item
from bridge.destinations.packing import chunk, json_array, json_object
from tests.destinations.helpers import make_item


def greedy(
    items: list[Item],
    envelope_bytes: int,
    max_bytes: int,
    max_count: int,
    item_bytes: Callable[[Item], int],
    keep_together: Callable[[Item, Item], bool] | None,
) -> list[list[Item]]:
    """The reference: add items one by one while the next fits; where a run ends between
    two items kept together, the earlier one moves to the next run when the two fit."""
    runs: list[list[Item]] = []
    current: list[Item] = []
    for item in items:
        if current:
            used = envelope_bytes + sum(map(item_bytes, current)) + len(current) - 1
            if used + 1 + item_bytes(item) > max_bytes or len(current) >= max_count:
                previous = current[-1]
                pair = envelope_bytes + item_bytes(previous) + 1 + item_bytes(item)
                if (
                    keep_together is not None
                    and len(current) > 1
                    and max_count >= 2
                    and pair <= max_bytes
                    and keep_together(previous, item)
                ):
                    runs.append(current[:-1])
                    current = [previous]
                else:
                    runs.append(current)
                    current = []
        current.append(item)
    if current:
        runs.append(current)
    return runs


def kept_with_previous(previous: Item, item: Item) -> bool:
    return item.output.kind == "b" and previous.output.kind == "a"


@pytest.mark.parametrize("seed", range(40))
def test_chunk_makes_the_runs_greedy_packing_makes(seed: int) -> None:
    rng = random.Random(seed)
    items = [
        make_item(rng.choice("ab"), {"x": "y" * rng.choice((0, 1, 5, 30, 90, 300))}, job_id=n)
        for n in range(rng.randrange(0, 120))
    ]
    envelope = rng.choice((0, 2, 35))
    max_bytes = rng.choice((10, 50, 100, 400, 2000))
    max_count = rng.choice((1, 2, 3, 7, 500))
    keep = rng.choice((None, kept_with_previous))
    sizing = rng.choice((None, lambda item: len(item.encoded) + 3))
    runs = chunk(
        iter(items),  # any iterable, not only a list
        envelope_bytes=envelope,
        max_bytes=max_bytes,
        max_count=max_count,
        item_bytes=sizing,
        keep_together=keep,
    )
    expected = greedy(items, envelope, max_bytes, max_count, sizing or (lambda item: len(item.encoded)), keep)
    assert runs == expected
    for run in runs:
        if len(run) > 1 and sizing is None:
            # The envelope holds the array's brackets (MoEngage's: {"merge_data":[]}).
            assert len(json_array(run)) - 2 + envelope <= max_bytes


@pytest.mark.parametrize(
    ("head", "tail"),
    [
        ({}, None),
        ({}, {"sentAt": "2026-01-01T00:00:00Z"}),
        ({"batch": b"[]"}, None),
        ({"type": b'"transition"', "elements": b'[{"a":1},{"b":[2,3]}]'}, None),
        ({"batch": '[{"x":"é"}]'.encode()}, {"sentAt": "now", "writeKey": 'k"ey', "n": [1, None]}),
    ],
)
def test_json_object_writes_what_orjson_writes(head: dict[str, bytes], tail: dict[str, object] | None) -> None:
    expected = {key: orjson.loads(value) for key, value in head.items()} | (tail or {})
    assert json_object(head, tail) == orjson.dumps(expected)


def test_json_array_writes_what_orjson_writes() -> None:
    bodies: list[object] = [{"a": 1}, {"b": "c"}, [1, 2], "s"]
    for n in range(len(bodies) + 1):
        items = [make_item("k", body) for body in bodies[:n]]  # type: ignore[arg-type]
        assert json_array(items) == orjson.dumps(bodies[:n])
