"""Load mapping files from disk: parse, compile, version.

Convention: every ``*.yaml`` directly inside the mappings directory is a mapping named
after its file stem. Shared lookup tables live in ``lookups/`` and fixtures in
``tests/<mapping name>/``; neither is a mapping.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from bridge.mapping.api import CompiledMapping, Diagnostic, MappingError
from bridge.mapping.compiler import FileCompiler
from bridge.mapping.yamlnodes import Diagnostics, YNode, parse_yaml

MAPPING_SUFFIXES = (".yaml", ".yml")

# Far above any real mapping or lookup file (the shipped ones are a few kB). A reload compiles
# on the server's event loop, at roughly 10 s a megabyte of rules: a larger file is a mistake
# (a log or a dump saved under the wrong name) that would stall every request meanwhile.
MAX_FILE_BYTES = 1024 * 1024


class FileRefused(Exception):
    """A mapping or lookup file that is not read; the message says why."""


def read_bounded(path: Path) -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES. A FIFO or a device (a lookup path may
    name anything, /dev/zero included) would block or never end: refused before reading."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused("it is a directory" if stat.S_ISDIR(mode) else "it is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise FileRefused(f"it is larger than {MAX_FILE_BYTES} bytes (1 MiB), the most a mapping or lookup file may be")
    return data


def not_utf8(raw: bytes, exc: UnicodeDecodeError) -> tuple[tuple[int, int], str]:
    """Where in ``raw`` the byte that is not UTF-8 is (1-based line and column, counted in
    characters as an editor counts them), and what to do: a file saved in another encoding
    (Latin-1, Windows-1252) is wrong at its first accented letter, maybe lines down."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    line = raw.count(b"\n", 0, exc.start) + 1
    column = len(raw[line_start : exc.start].decode("utf-8", errors="replace")) + 1
    return (line, column), f"byte 0x{raw[exc.start]:02x} ({exc.reason}); save the file as UTF-8"


def load_mapping_file(path: str | Path) -> CompiledMapping:
    """Load and compile one mapping file; raises MappingError with every diagnostic."""
    mapping, diagnostics = compile_mapping_file(Path(path))
    if mapping is None:
        raise MappingError(diagnostics)
    return mapping


def compile_mapping_file(path: Path) -> tuple[CompiledMapping | None, list[Diagnostic]]:
    """The compiled mapping, or None and every diagnostic; never raises."""
    try:
        return _compile_mapping_file(path)
    except Exception as exc:  # an unforeseen input must give a diagnostic, never a traceback
        message = f"unexpected error while compiling this file: {type(exc).__name__}: {exc}"
        return None, [Diagnostic(str(path), 1, 1, "<root>", message)]


def _compile_mapping_file(path: Path) -> tuple[CompiledMapping | None, list[Diagnostic]]:
    diags = Diagnostics(str(path))
    try:
        raw = read_bounded(path)
    except FileRefused as exc:
        diags.add(None, "", f"cannot read mapping file: {exc}")
        return None, diags.items
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at, problem = not_utf8(raw, exc)
        diags.add_at(at, "", f"mapping file is not UTF-8: {problem}")
        return None, diags.items
    root = parse_yaml(text, diags)
    if root is None:
        return None, diags.items
    hashed: list[bytes] = [raw]

    def load_lookup_file(fpath: Path, at: YNode, ypath: str) -> YNode | None:
        try:
            data = read_bounded(fpath)
        except FileRefused as exc:
            diags.add(at, ypath, f"cannot read lookup file {fpath}: {exc}")
            return None
        hashed.append(str(fpath.name).encode() + b"\0" + data)
        file_diags = Diagnostics(str(fpath))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Where the byte is, in the lookup file: as its YAML errors are reported.
            where, problem = not_utf8(data, exc)
            file_diags.add_at(where, "", f"lookup file is not UTF-8: {problem}")
            diags.items.extend(file_diags.items)
            return None
        node = parse_yaml(text, file_diags)
        diags.items.extend(file_diags.items)
        return node

    compiler = FileCompiler(diags, path, load_lookup_file)
    mapping = compiler.compile(root, path.stem, "")
    if mapping is None or diags.items:
        return None, diags.items
    # lookup files are read during compile, so the version is fixed only afterwards
    mapping.version = hashlib.sha256(b"\0".join(hashed)).hexdigest()[:12]
    return mapping, []


def mapping_files(directory: Path) -> list[Path]:
    """Every entry named as a mapping file. Not only the regular files: a directory or a
    dangling link with such a name is most likely a mapping that was meant to be there, and
    reading it reports what is wrong, where skipping it dropped the mapping unsaid."""
    return sorted(p for p in directory.iterdir() if p.suffix in MAPPING_SUFFIXES)


def load_mapping_dir(path: str | Path) -> dict[str, CompiledMapping]:
    """Load every mapping in a directory, keyed by file stem.

    Raises MappingError carrying the diagnostics of all broken files, so one run of
    ``bridge mappings check`` shows everything there is to fix.
    """
    mappings, diagnostics = compile_mapping_dir(Path(path))
    if diagnostics:
        raise MappingError(diagnostics)
    return mappings


def compile_mapping_dir(directory: Path) -> tuple[dict[str, CompiledMapping], list[Diagnostic]]:
    if not directory.is_dir():
        # A mapping file given where its directory belongs exists: say what is wrong with it.
        problem = "is not a directory" if directory.exists() else "does not exist"
        return {}, [Diagnostic(str(directory), 1, 1, "<root>", f"mappings directory {problem}")]
    mappings: dict[str, CompiledMapping] = {}
    diagnostics: list[Diagnostic] = []
    seen: dict[str, Path] = {}
    for file in mapping_files(directory):
        if file.stem in seen:
            diagnostics.append(
                Diagnostic(str(file), 1, 1, "<root>", f"mapping name {file.stem!r} is also used by {seen[file.stem]}")
            )
            continue
        seen[file.stem] = file
        mapping, diags = compile_mapping_file(file)
        diagnostics.extend(diags)
        if mapping is not None:
            mappings[file.stem] = mapping
    return mappings, diagnostics
