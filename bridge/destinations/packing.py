"""Greedy, order-keeping grouping of items into size- and count-capped requests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from bridge.destinations.base import Item


def chunk(
    items: Iterable[Item],
    *,
    envelope_bytes: int,
    max_bytes: int,
    max_count: int,
    item_bytes: Callable[[Item], int] = lambda item: len(item.encoded),  # Item.size, without its call
    keep_together: Callable[[Item, Item], bool] | None = None,
) -> list[list[Item]]:
    """Consecutive runs of ``items`` whose JSON array (one comma between items) plus
    ``envelope_bytes`` stays within ``max_bytes``, with at most ``max_count`` items.
    An item too large to fit even alone gets a run of its own.

    ``keep_together(previous, item)``: whether ``item`` should share a run with the item
    before it. Where a run would end between the two, ``previous`` starts the next run with
    ``item`` instead, when the two fit in one (order is kept either way). Asked only where a
    run ends, so it costs nothing per item."""
    runs: list[list[Item]] = []
    current: list[Item] = []
    used = envelope_bytes
    for item in items:
        size = item_bytes(item)
        extra = size + (1 if current else 0)
        if current and (used + extra > max_bytes or len(current) >= max_count):
            previous = current[-1]
            if (
                keep_together is not None
                and len(current) > 1
                and max_count >= 2
                and envelope_bytes + item_bytes(previous) + 1 + size <= max_bytes
                and keep_together(previous, item)
            ):
                runs.append(current[:-1])
                current, used, extra = [previous], envelope_bytes + item_bytes(previous), size + 1
            else:
                runs.append(current)
                current, used, extra = [], envelope_bytes, size
        current.append(item)
        used += extra
    if current:
        runs.append(current)
    return runs


def json_array(items: Iterable[Item]) -> bytes:
    """The items' bodies as one JSON array, from their encoded bytes."""
    return b"[" + b",".join([item.encoded for item in items]) + b"]"


def json_object(head: Mapping[str, bytes], tail: Mapping[str, Any] | None = None) -> bytes:
    """A JSON object from members already encoded (``head``), then plain values (``tail``)."""
    parts = [orjson.dumps(key) + b":" + value for key, value in head.items()]
    parts += [orjson.dumps(key) + b":" + orjson.dumps(value) for key, value in (tail or {}).items()]
    return b"{" + b",".join(parts) + b"}"
