"""Path syntax: ``$.a.b``, ``a.b``, ``a[0]``, ``a['key with spaces']`` and reserved roots.

Roots: ``$`` (the event), ``$link`` (the resolved identity link), ``$options`` (the
destination's mapping options), ``$source`` (the source name), ``$item`` (the current
array item inside ``each``) and ``$let`` (named values from the ``let`` section).
"""

from __future__ import annotations

from dataclasses import dataclass

ROOTS = ("$", "$link", "$options", "$source", "$item", "$let")

Segment = str | int


class PathError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParsedPath:
    root: str
    segments: tuple[Segment, ...]
    text: str


def parse_path(text: str, default_root: str = "$") -> ParsedPath:
    """Parse a path; a path without a ``$`` root is relative to ``default_root``."""
    if not isinstance(text, str):
        raise PathError(f"expected a path string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise PathError("empty path")
    pos = 0
    if s.startswith("$"):
        root = "$"
        for candidate in sorted(ROOTS, key=len, reverse=True):
            end = len(candidate)
            if s.startswith(candidate) and (len(s) == end or s[end] in ".["):
                root = candidate
                break
        else:
            name = s[1:].split(".", 1)[0].split("[", 1)[0]
            raise PathError(f"unknown path root '${name}'; expected one of: {', '.join(ROOTS)}")
        pos = len(root)
        if pos < len(s) and s[pos] == ".":
            pos += 1
            if pos == len(s):
                raise PathError(f"path {text!r} ends with '.'")
    else:
        root = default_root
    segments: list[Segment] = []
    expect_name = pos < len(s) and s[pos] not in "["
    while pos < len(s):
        ch = s[pos]
        if ch == "[":
            close = _find_bracket_end(s, pos, text)
            inner = s[pos + 1 : close].strip()
            if len(inner) >= 2 and inner[0] in "'\"" and inner[-1] == inner[0]:
                segments.append(inner[1:-1])
            elif inner.lstrip("-").isascii() and inner.lstrip("-").isdigit() and len(inner) <= 20:
                try:
                    segments.append(int(inner))
                except ValueError:  # "--1"
                    raise PathError(f"bad index [{inner}] in path {text!r}: expected a number") from None
            else:
                raise PathError(f"bad index [{inner}] in path {text!r}: expected a number or a quoted key like ['a b']")
            pos = close + 1
            if pos < len(s):
                if s[pos] == ".":
                    pos += 1
                    expect_name = True
                    if pos == len(s):
                        raise PathError(f"path {text!r} ends with '.'")
                elif s[pos] != "[":
                    raise PathError(f"unexpected {s[pos]!r} after ']' at character {pos + 1} in path {text!r}")
            continue
        if not expect_name:
            raise PathError(f"unexpected {ch!r} at character {pos + 1} in path {text!r}")
        end = pos
        while end < len(s) and s[end] not in ".[":
            end += 1
        name = s[pos:end]
        if not name:
            raise PathError(f"empty key at character {pos + 1} in path {text!r}")
        segments.append(name)
        pos = end
        expect_name = False
        if pos < len(s) and s[pos] == ".":
            pos += 1
            expect_name = True
            if pos == len(s):
                raise PathError(f"path {text!r} ends with '.'")
    if root in ("$let",) and (not segments or not isinstance(segments[0], str)):
        raise PathError(f"{root} needs a name, e.g. {root}.customer_id")
    return ParsedPath(root, tuple(segments), text)


def _find_bracket_end(s: str, start: int, text: str) -> int:
    quote = ""
    for i in range(start + 1, len(s)):
        ch = s[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "]":
            return i
    raise PathError(f"unclosed '[' at character {start + 1} in path {text!r}")


def format_path(root: str, segments: tuple[Segment, ...]) -> str:
    out = root
    for seg in segments:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif seg.replace("_", "a").replace("-", "a").isalnum():
            out += f".{seg}"
        else:
            out += f"[{seg!r}]"
    return out
