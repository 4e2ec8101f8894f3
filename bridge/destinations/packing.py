"""Greedy, order-keeping grouping of items into size- and count-capped requests."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate, repeat
from operator import add, attrgetter
from typing import Any

import orjson

from bridge.destinations.base import Item

_ENCODED = attrgetter("encoded")


def chunk(
    items: Iterable[Item],
    *,
    envelope_bytes: int,
    max_bytes: int,
    max_count: int,
    item_bytes: Callable[[Item], int] | None = None,
    keep_together: Callable[[Item, Item], bool] | None = None,
) -> list[list[Item]]:
    """Consecutive runs of ``items`` whose JSON array (one comma between items) plus
    ``envelope_bytes`` stays within ``max_bytes``, with at most ``max_count`` items.
    An item too large to fit even alone gets a run of its own. ``item_bytes``: an item's
    size in the request (default: its encoded body's).

    ``keep_together(previous, item)``: whether ``item`` should share a run with the item
    before it. Where a run would end between the two, ``previous`` starts the next run with
    ``item`` instead, when the two fit in one (order is kept either way). Asked only where a
    run ends, so it costs nothing per item.

    Each run is the longest that fits from where it starts, as adding items one by one
    until the next does not fit would make it. Found by a binary search over the items'
    running sizes, all computed in C: a Python step an item cost more than the rest of
    packing (a lease is hundreds of items, a run about a hundred)."""
    items = list(items)
    sizes = list(map(len, map(_ENCODED, items)) if item_bytes is None else map(item_bytes, items))
    # ends[k]: the bytes of items[:k], each followed by a comma. A run items[i:j] takes
    # envelope_bytes + ends[j] - ends[i] - 1 bytes (no comma after its last item).
    ends = list(accumulate(map(add, sizes, repeat(1)), initial=0))
    room = max_bytes - envelope_bytes + 1
    runs: list[list[Item]] = []
    start, count = 0, len(items)
    while start < count:
        # The last end that fits, within max_count; one item at least, however large.
        end = bisect_right(ends, ends[start] + room, start + 1, min(start + max_count, count) + 1) - 1
        end = max(end, start + 1)
        if (
            keep_together is not None
            and end < count
            and end - start > 1
            and max_count >= 2
            and envelope_bytes + sizes[end - 1] + 1 + sizes[end] <= max_bytes
            and keep_together(items[end - 1], items[end])
        ):
            end -= 1  # the run's last item starts the next run, with the item it keeps with
        runs.append(items[start:end])
        start = end
    return runs


def json_array(items: Iterable[Item]) -> bytes:
    """The items' bodies as one JSON array, from their encoded bytes."""
    # Joined in C, no Python step an item; and joined, not concatenated: each ``+`` copied
    # the whole request again (a Bulk Import is up to 100 KB).
    return b"".join((b"[", b",".join(map(_ENCODED, items)), b"]"))


def json_object(head: Mapping[str, bytes], tail: Mapping[str, Any] | None = None) -> bytes:
    """A JSON object from members already encoded (``head``), then plain values (``tail``)."""
    # One join of every piece: a member's value (a whole request's array, for the
    # destinations) is copied once, where concatenating copied it at every ``+``.
    pieces: list[bytes] = []
    for key, value in head.items():
        pieces += (b",", orjson.dumps(key), b":", value)
    for key, value in (tail or {}).items():
        pieces += (b",", orjson.dumps(key), b":", orjson.dumps(value))
    if not pieces:
        return b"{}"
    pieces[0] = b"{"  # the first member's comma
    pieces.append(b"}")
    return b"".join(pieces)
