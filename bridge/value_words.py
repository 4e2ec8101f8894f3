"""A value given in a config or mapping file, in words, quoted: what an error says was given.

Imports nothing of the bridge: the config loader and the mapping compiler both use it.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import orjson

# Longer strings are cut when quoted in a message: the point is which value, not all of it.
_SHOWN = 60


def describe(value: Any) -> str:
    """'the string "yes"', 'the integer 1', 'the number 1.5', 'the boolean true', 'a list'."""
    if value is None:
        return "null (nothing)"
    if type(value) is bool:
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        spelt = getattr(value, "spelt", None)  # a config's SpeltInt: as written, then as read
        return f"the integer {spelt} ({int(value)})" if spelt else f"the integer {int(value)}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= _SHOWN else value[:_SHOWN] + "..."
        return f"the string {quoted(shown)}"
    if isinstance(value, datetime.date):  # an unquoted 2024-01-01 in a YAML file
        return f"the date {value.isoformat()} (quote it to mean the text)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def quoted(text: str) -> str:
    """``text`` in double quotes, escaped as JSON. A lone surrogate (an environment byte
    that is no UTF-8 reaches Python as one) is no UTF-8, which orjson refuses with a
    TypeError: such a text is written with \\u escapes instead."""
    try:
        return orjson.dumps(text).decode()
    except orjson.JSONEncodeError:
        return json.dumps(text)
