""" "Did you mean" hints for misspelled keys, names and directives, said the same way everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close.

    A choice one keystroke away (a letter missed, added, changed, or two swapped) comes
    first: difflib's similarity alone finds nothing for a slip in a two-letter name (`fi`
    for `if`, `ni` for `in`) and prefers another name to the one meant (`ot` gave `omit`)."""
    ordered = sorted(choices)
    slips = [c for c in ordered if _one_keystroke(word, c)]
    if slips:
        best = max(slips, key=lambda c: difflib.SequenceMatcher(None, word, c).ratio())
        return f" (did you mean {best!r}?)"
    close = difflib.get_close_matches(word, ordered, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_keystroke(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by one inserted, deleted or changed character, or by
    two neighbouring characters swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) < len(b):
        return a[i:] == b[i + 1 :]
    swapped = i + 1 < len(a) and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    return swapped or a[i + 1 :] == b[i + 1 :]
