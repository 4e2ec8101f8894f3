"""WHERE clauses for dead-letter and discard filters, shared by both SQL stores."""

from __future__ import annotations

from collections.abc import Callable

from bridge.store.base import RecordFilter

Placeholder = Callable[[int], str]

# Record ids are signed 64-bit in both stores: an id outside this names no record, and
# bound as it is, it would overflow the driver (SQLite's OverflowError, a traceback from
# `bridge dlq show`) rather than match nothing.
MAX_RECORD_ID = 2**63 - 1


def qmark(_: int) -> str:
    return "?"


def dollar(n: int) -> str:
    return f"${n}"


def _storable(text: str) -> bool:
    """Whether a text can be stored at all: one with a lone surrogate (what Python makes of
    bytes that are not UTF-8, as in a command line's arguments) cannot, so it names no record,
    where bound as it is, both drivers fail the statement."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_where(
    flt: RecordFilter, time_column: str, placeholder: Placeholder = qmark, first: int = 1, *, arrays: bool = False
) -> tuple[str, list[object]]:
    """Return ``(" WHERE ...", params)`` (or ``("", [])``) selecting what ``flt`` describes.

    ``first`` is the number of the first placeholder, for PostgreSQL's numbered ``$n``.
    ``arrays`` (PostgreSQL) binds the ids and the destinations as one array each: a statement
    takes at most 32767 parameters there, fewer than a replay or purge by ids may name.
    """
    clauses: list[str] = []
    params: list[object] = []

    def add(sql: str, value: object) -> None:
        params.append(value)
        clauses.append(sql.format(placeholder(first + len(params) - 1)))

    def add_any(column: str, values: list[str] | list[int], kind: str) -> None:
        if not values:
            clauses.append("1 = 0")  # an explicit empty list selects nothing, never everything
        elif arrays:
            add(f"{column} = ANY({{}}::{kind}[])", values)
        else:
            marks = []
            for value in values:
                params.append(value)
                marks.append(placeholder(first + len(params) - 1))
            clauses.append(f"{column} IN ({', '.join(marks)})")

    for column, text in (("destination", flt.destination), ("reason", flt.reason)):
        if text is not None:
            if _storable(text):
                add(column + " = {}", text)
            else:
                clauses.append("1 = 0")
    if flt.since is not None:
        add(time_column + " >= {}", flt.since)
    if flt.until is not None:
        add(time_column + " < {}", flt.until)
    if flt.destinations is not None:
        add_any("destination", [name for name in flt.destinations if _storable(name)], "text")
    if flt.ids is not None:
        add_any("id", [int(i) for i in dict.fromkeys(flt.ids) if 1 <= int(i) <= MAX_RECORD_ID], "bigint")
    if not clauses:
        return "", []
    return " WHERE " + " AND ".join(clauses), params
