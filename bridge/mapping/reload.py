"""Hot reload: an immutable snapshot of all mappings, swapped whole.

A reload compiles the whole directory first; only if every file is valid does the
new snapshot replace the old one, so a broken edit never reaches traffic and an
event is always mapped by one consistent set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from bridge.mapping.api import CompiledMapping, Diagnostic
from bridge.mapping.loader import compile_mapping_dir


@dataclass(frozen=True, slots=True)
class MappingSet:
    mappings: Mapping[str, CompiledMapping] = field(default_factory=lambda: MappingProxyType({}))
    version: str = ""

    @classmethod
    def of(cls, mappings: Mapping[str, CompiledMapping]) -> MappingSet:
        joined = "\n".join(f"{name}={m.version}" for name, m in sorted(mappings.items()))
        return cls(MappingProxyType(dict(mappings)), hashlib.sha256(joined.encode()).hexdigest()[:12])

    def get(self, name: str) -> CompiledMapping | None:
        return self.mappings.get(name)

    def reload(self, directory: str | Path) -> tuple[MappingSet, list[Diagnostic]]:
        """The new set and no diagnostics, or this same set and every diagnostic."""
        try:
            mappings, diagnostics = compile_mapping_dir(Path(directory))
        except Exception as exc:  # a bug in the compiler must not take the live set down with it
            return self, [
                Diagnostic(
                    str(directory), 1, 1, "<root>", f"unexpected error while compiling: {type(exc).__name__}: {exc}"
                )
            ]
        if diagnostics:
            return self, diagnostics
        new = MappingSet.of(mappings)
        # an unchanged directory keeps the same snapshot: nothing downstream sees a change
        return (self, []) if new.version == self.version else (new, [])


class MappingHolder:
    """The live set; ``current`` is replaced by one assignment, so readers never see a mix."""

    def __init__(self, initial: MappingSet | None = None) -> None:
        self.current = initial or MappingSet()

    def mappings(self) -> Mapping[str, CompiledMapping]:
        return self.current.mappings

    def reload(self, directory: str | Path) -> list[Diagnostic]:
        new, diagnostics = self.current.reload(directory)
        self.current = new
        return diagnostics


def directory_fingerprint(directory: str | Path, also: Iterable[str] = ()) -> str:
    """A cheap fingerprint (names, sizes, mtimes) of the mapping and lookup files.

    Poll it to reload on file changes: when it differs from the last value, call
    ``reload``. Fixtures under tests/ are not part of it: they never affect traffic.
    ``also``: more files to watch, e.g. the lookup files the loaded mappings read, which
    may lie anywhere relative to their mapping (a subdirectory, a .json file).
    """
    root = Path(directory)
    parts: list[str] = []
    for sub in (root, root / "lookups"):
        if not sub.is_dir():
            continue
        for p in sorted(sub.iterdir()):
            if p.is_file() and p.suffix in (".yaml", ".yml"):
                st = p.stat()
                parts.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    for name in sorted(set(also)):
        try:
            st = Path(name).stat()
        except OSError:
            parts.append(f"{name}:missing")
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class SettledChange:
    """When a polled fingerprint has changed *and then held still for one more poll*.

    A file caught mid-write can still be valid YAML with its later rules cut off: reloaded
    then, the events it no longer matched would be discarded as ``no_matching_rule``.
    Waiting one poll for the writes to settle costs one interval of delay."""

    def __init__(self, first: str) -> None:
        self._loaded = first
        self._pending: str | None = None

    def due(self, current: str) -> bool:
        """Whether to reload now, given the fingerprint just polled."""
        if current == self._loaded:
            self._pending = None  # changed and changed back: nothing to do
            return False
        if current != self._pending:
            self._pending = current  # still changing: look again next poll
            return False
        self._loaded, self._pending = current, None
        return True
