"""What a config value is, said in words, and a string setting's value as text.

Shared by the config loader (bridge.config) and the destinations' own settings
(bridge.destinations.config): bridge.config imports the destinations, so they cannot
import it back, and both say the same thing of the same value from here.
"""

from __future__ import annotations

import datetime
import unicodedata
from typing import Any

from bridge.destinations.base import ConfigError


class SpeltInt(int):
    """An integer the config file spells otherwise than its decimal digits: ``0123`` (YAML
    1.1 reads it as octal, 83), ``1_000``, ``1:30`` (sexagesimal, 90), ``0x1f``, ``+5``.
    The config loader keeps what was written, so a string setting is the text as written:
    an unquoted workspace id or secret of digits is not turned into another number's."""

    spelt: str


def spelt_int(value: int, text: str) -> int:
    """``value`` as YAML read it from ``text``: a plain int when ``text`` is its digits."""
    if text == str(value):
        return value
    marked = SpeltInt(value)
    marked.spelt = text
    return marked


def plain(value: Any) -> Any:
    """``value`` with every SpeltInt in it a plain int, for what leaves the config (a
    mapping's options are compared by exact type)."""
    if type(value) is SpeltInt:
        return int(value)
    if type(value) is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    if type(value) is list:
        return [plain(v) for v in value]
    return value


def type_name(value: Any) -> str:
    """What YAML made of a value, in words: "a list", "an integer", "a date"."""
    if value is None:
        return "nothing"
    if isinstance(value, datetime.date):  # an unquoted 2024-01-01 is a YAML date
        return "a date"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        return "an integer"
    return "a fractional number" if isinstance(value, float) else type(value).__name__


def as_text(value: Any, where: str) -> str:
    """A string setting's value: a string as is, a number as its text (an unquoted
    ``workspace_id: 12345`` is one in YAML). Anything else is refused, naming ``where``."""
    if isinstance(value, str):
        return value
    if type(value) is SpeltInt:
        return value.spelt  # as written: str() of what YAML made of 0123 is "83"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    hint = " (quote it to make it a string)" if isinstance(value, datetime.date) else ""
    raise ConfigError(f"{where}: expected a string, got {type_name(value)}{hint}")


def check_header_safe(value: str, where: str, consequence: str) -> None:
    """Refuse a setting that goes into an HTTP header as it is, or is compared with one,
    when it starts or ends with whitespace or holds a control character: most often a
    secret file's line break, kept by a quoted ``"${VAR}"``. No header can carry it (a
    client library refuses to send it; a server strips the whitespace it receives), so it
    passed `bridge check` and then failed every request. Never quoted: it is often a
    secret. ``consequence`` says what it would break."""
    # Control characters (Cc) only: str.isprintable() also refused a no-break space, a
    # zero-width one or a private-use character inside a value, which a header carries.
    if value != value.strip() or any(unicodedata.category(c) == "Cc" for c in value):
        raise ConfigError(
            f"{where}: starts or ends with whitespace, or holds a control character (a line break from a "
            f"secret file, say), which no HTTP header carries: {consequence}"
        )
