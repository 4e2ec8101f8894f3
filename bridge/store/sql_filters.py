"""WHERE clauses for dead-letter and discard filters, shared by both SQL stores."""

from __future__ import annotations

from collections.abc import Callable

from bridge.store.base import RecordFilter

Placeholder = Callable[[int], str]


def qmark(_: int) -> str:
    return "?"


def dollar(n: int) -> str:
    return f"${n}"


def record_where(
    flt: RecordFilter, time_column: str, placeholder: Placeholder = qmark, first: int = 1
) -> tuple[str, list[object]]:
    """Return ``(" WHERE ...", params)`` (or ``("", [])``) selecting what ``flt`` describes.

    ``first`` is the number of the first placeholder, for PostgreSQL's numbered ``$n``.
    """
    clauses: list[str] = []
    params: list[object] = []

    def add(sql: str, value: object) -> None:
        params.append(value)
        clauses.append(sql.format(placeholder(first + len(params) - 1)))

    if flt.destination is not None:
        add("destination = {}", flt.destination)
    if flt.reason is not None:
        add("reason = {}", flt.reason)
    if flt.since is not None:
        add(time_column + " >= {}", flt.since)
    if flt.until is not None:
        add(time_column + " < {}", flt.until)
    if flt.destinations is not None:
        if not flt.destinations:
            clauses.append("1 = 0")
        else:
            marks = []
            for name in flt.destinations:
                params.append(name)
                marks.append(placeholder(first + len(params) - 1))
            clauses.append(f"destination IN ({', '.join(marks)})")
    if flt.ids is not None:
        if not flt.ids:
            clauses.append("1 = 0")  # an explicit empty id list selects nothing, never everything
        else:
            marks = []
            for record_id in flt.ids:
                params.append(int(record_id))
                marks.append(placeholder(first + len(params) - 1))
            clauses.append(f"id IN ({', '.join(marks)})")
    if not clauses:
        return "", []
    return " WHERE " + " AND ".join(clauses), params
