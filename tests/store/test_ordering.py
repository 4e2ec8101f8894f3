"""OrderedSelection, the per-user ordered walk shared by the stores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bridge.store.ordering import LEASED, QUEUED, OrderedSelection

NOW = 1000.0


def _rows(n: int, start: int = 1) -> list[tuple[Any, ...]]:
    # (id, ordering_key, state, available_at, lease_until); users u0..u9 in turn
    return [(i, f"u{i % 10}", QUEUED, NOW - 1, None) for i in range(start, start + n)]


def test_a_lazy_cursor_is_not_read_past_the_limit() -> None:
    read: list[int] = []

    def cursor() -> Iterator[tuple[Any, ...]]:
        for row in _rows(100):
            read.append(row[0])
            yield row

    selection = OrderedSelection(5, NOW)
    query = selection.next_query()
    assert query is not None
    selection.take(cursor())
    assert selection.chosen == [1, 2, 3, 4, 5]
    assert read == [1, 2, 3, 4, 5]
    assert selection.next_query() is None


def test_lists_and_iterators_give_the_same_walk() -> None:
    rows = _rows(40)
    # u1's first job is leased: all of u1's later jobs wait behind it.
    rows[0] = (1, "u1", LEASED, NOW - 1, NOW + 60)
    by_list, by_iter = OrderedSelection(30, NOW), OrderedSelection(30, NOW)
    by_list.window = by_iter.window = 40
    by_list.take(rows)
    by_iter.take(iter(rows))
    assert by_list.chosen == by_iter.chosen
    assert by_list.blocked == by_iter.blocked == {"u1"}
    assert all(job_id % 10 != 1 for job_id in by_list.chosen)


def test_a_full_window_moves_the_walk_on_and_a_short_one_ends_it() -> None:
    selection = OrderedSelection(1000, NOW)
    selection.window = 10
    blocked = [(i, "u1", LEASED, NOW - 1, NOW + 60) for i in range(1, 11)]
    selection.take(iter(blocked))
    assert selection.next_query() == (10, ["u1"], 10)
    selection.take(iter(_rows(3, start=11)))
    assert selection.next_query() is None
    assert selection.chosen == [12, 13]  # 11 is u1's, which is blocked


def test_a_job_of_two_users_waits_for_either_and_holds_both() -> None:
    """An alias (anon -> user) is keyed by both: it waits behind anon's leased event and
    behind user's, and the later jobs of both users wait behind it."""
    from bridge.store.ordering import ordering_key

    merge = ordering_key("anon", "user")
    assert merge == "anon\x1fuser" and ordering_key("same", "same") == "same" and ordering_key("a", "") == "a"
    rows = [
        (1, "anon", LEASED, NOW - 1, NOW + 60),  # anon's event, being sent
        (2, merge, QUEUED, NOW - 1, None),  # the alias: must wait for it
        (3, "user", QUEUED, NOW - 1, None),  # user's later event: must wait for the alias
        (4, "other", QUEUED, NOW - 1, None),
    ]
    selection = OrderedSelection(10, NOW)
    selection.take(rows)
    assert selection.chosen == [4]
    # user's earlier event retrying holds the alias back just the same.
    rows = [(1, "user", QUEUED, NOW + 30, None), (2, merge, QUEUED, NOW - 1, None), (3, "anon", QUEUED, NOW - 1, None)]
    selection = OrderedSelection(10, NOW)
    selection.take(rows)
    assert selection.chosen == []
    # Nothing earlier pending: the alias and both users' later events go, in order.
    rows = [(2, merge, QUEUED, NOW - 1, None), (3, "anon", QUEUED, NOW - 1, None), (5, "user", QUEUED, NOW - 1, None)]
    selection = OrderedSelection(10, NOW)
    selection.take(rows)
    assert selection.chosen == [2, 3, 5]
