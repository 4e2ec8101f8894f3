"""What a config value is, said in words, and a string setting's value as text.

Shared by the config loader (bridge.config) and the destinations' own settings
(bridge.destinations.config): bridge.config imports the destinations, so they cannot
import it back, and both say the same thing of the same value from here.
"""

from __future__ import annotations

import datetime
from typing import Any

from bridge.destinations.base import ConfigError


def type_name(value: Any) -> str:
    """What YAML made of a value, in words: "a list", "an integer", "a date"."""
    if value is None:
        return "nothing"
    if isinstance(value, datetime.date):  # an unquoted 2024-01-01 is a YAML date
        return "a date"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return names.get(type(value), "a fractional number" if isinstance(value, float) else type(value).__name__)


def as_text(value: Any, where: str) -> str:
    """A string setting's value: a string as is, a number as its text (an unquoted
    ``workspace_id: 12345`` is one in YAML). Anything else is refused, naming ``where``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    hint = " (quote it to make it a string)" if isinstance(value, datetime.date) else ""
    raise ConfigError(f"{where}: expected a string, got {type_name(value)}{hint}")
