"""Greedy, order-keeping grouping of items into size- and count-capped requests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bridge.destinations.base import Item


def chunk(
    items: Iterable[Item],
    *,
    envelope_bytes: int,
    max_bytes: int,
    max_count: int,
    item_bytes: Callable[[Item], int] = lambda item: item.size,
) -> list[list[Item]]:
    """Consecutive runs of ``items`` whose JSON array (one comma between items) plus
    ``envelope_bytes`` stays within ``max_bytes``, with at most ``max_count`` items.
    An item too large to fit even alone gets a run of its own."""
    runs: list[list[Item]] = []
    current: list[Item] = []
    used = envelope_bytes
    for item in items:
        size = item_bytes(item)
        extra = size + (1 if current else 0)
        if current and (used + extra > max_bytes or len(current) >= max_count):
            runs.append(current)
            current, used, extra = [], envelope_bytes, size
        current.append(item)
        used += extra
    if current:
        runs.append(current)
    return runs
