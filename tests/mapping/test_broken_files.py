"""Mapping files broken in ways a careless edit (or a wrong path) produces: each is a
diagnostic at file:line:column saying what is wrong, never a hang, a traceback, or a file
read as something its author did not write."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import load_mapping_file
from bridge.mapping.cli import cmd_check

from .helpers import HEADER, RULES, errors, write

MAX_FILE_BYTES = 1024 * 1024  # the documented limit


def test_a_lookup_file_that_is_a_device_is_refused_not_read(tmp_path: Path) -> None:
    """A lookup path may name anything: /dev/zero (or a FIFO) never ends, and the reload
    reading it held the server's event loop for good."""
    text = HEADER + "lookups:\n  p: {file: /dev/null}\n" + RULES
    [d] = errors(tmp_path, text)
    assert (d.line, d.column, d.yaml_path) == (4, 13, "lookups.p.file")
    assert d.message == "cannot read lookup file /dev/null: it is not a regular file"


def test_a_file_larger_than_the_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """A log or a dump saved as a mapping compiled for minutes on the event loop."""
    text = HEADER + RULES + "#" + "x" * MAX_FILE_BYTES + "\n"
    [d] = errors(tmp_path, text)
    assert (d.line, d.column, d.yaml_path) == (1, 1, "<root>")
    assert "larger than 1048576 bytes (1 MiB)" in d.message and d.message.startswith("cannot read mapping file")
    lookups = tmp_path / "lookups"
    write(lookups / "big.yaml", "table: {a: b}\n#" + "x" * MAX_FILE_BYTES + "\n")
    [d] = errors(tmp_path, HEADER + "lookups:\n  p: {file: lookups/big.yaml}\n" + RULES)
    assert d.yaml_path == "lookups.p.file" and "larger than 1048576 bytes" in d.message


def test_a_control_character_is_placed_at_its_line_and_column(tmp_path: Path) -> None:
    """PyYAML refuses it before parsing, with a character offset: that came out as an
    'unexpected error ... ReaderError' at 1:1 spread over two lines."""
    [d] = errors(tmp_path, HEADER + "description: a\x00b\n" + RULES)
    assert (d.line, d.column) == (3, 15)
    assert d.message.startswith("invalid YAML: character U+0000 is not allowed") and "\n" not in d.message


@pytest.mark.parametrize(
    ("snippet", "at", "tag"),
    [
        ('description: !!python/object/apply:os.system ["true"]\n', (3, 14), "!!python/object/apply:os.system"),
        ("lookups:\n  p: !!python/object:x.Y {table: {a: b}}\n", (4, 6), "!!python/object:x.Y"),
        ("description: !!binary aGVsbG8=\n", (3, 14), "!!binary"),
        ("description: !env TEXT\n", (3, 14), "!env"),
    ],
)
def test_a_yaml_tag_is_refused_where_it_is_written(tmp_path: Path, snippet: str, at: tuple[int, int], tag: str) -> None:
    """A tag on a list or mapping was silently dropped (the file loaded as if unwritten), and
    !!binary made bytes no output can carry."""
    [d] = errors(tmp_path, HEADER + snippet + RULES)
    assert (d.line, d.column) == at
    assert d.message.startswith(f"YAML tag '{tag}' is not allowed")


def test_the_plain_tags_still_read(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", HEADER + "description: !!str 5\n" + RULES)
    assert load_mapping_file(path).version


@pytest.mark.parametrize(("key", "got"), [("[a, b]", "a list"), ("{a: 1}", "a mapping"), ("~", "null")])
def test_a_key_that_is_no_name_is_refused_not_made_a_name(tmp_path: Path, key: str, got: str) -> None:
    """Such keys became the lookups "['a', 'b']", "{'a': 1}" and "None"."""
    text = HEADER + f"lookups:\n  {key}: {{table: {{a: b}}}}\n" + RULES
    [d] = errors(tmp_path, text)
    assert (d.line, d.column, d.yaml_path) == (4, 3, "lookups")
    assert d.message.startswith(f"expected a key that is a name, got {got}")


def test_check_prints_the_refusal_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "m.yaml", HEADER + "lookups:\n  p: {file: /dev/null}\n" + RULES)
    assert cmd_check(argparse.Namespace(paths=[], mappings_dir=str(tmp_path), config=None)) == 1
    out = capsys.readouterr().out
    assert (
        f"{tmp_path / 'm.yaml'}:4:13: lookups.p.file: cannot read lookup file /dev/null: it is not a regular file"
        in out
    )


def test_a_directory_or_dangling_link_named_as_a_mapping_is_reported_not_skipped(tmp_path: Path) -> None:
    """A mapping file replaced by a directory, or a link to a file since moved, was skipped
    without a word: the reload went through without that mapping's rules (and a destination
    naming it was refused only by the config check, if at all)."""
    from bridge.mapping.loader import compile_mapping_dir

    directory = tmp_path / "mappings"
    write(directory / "good.yaml", HEADER + RULES)
    (directory / "folder.yaml").mkdir()
    (directory / "moved.yml").symlink_to(tmp_path / "gone.yaml")
    (directory / "notes.txt").write_text("not a mapping")
    mappings, diags = compile_mapping_dir(directory)
    assert list(mappings) == ["good"]
    assert sorted((Path(d.file).name, d.message) for d in diags) == [
        ("folder.yaml", "cannot read mapping file: it is a directory"),
        ("moved.yml", "cannot read mapping file: No such file or directory"),
    ]


def _compile_steps(tmp_path: Path, rules: int, rule: str) -> int:
    """How many lines of the compiler run to load a file of ``rules`` rules, each ``rule``
    for a type of its own (a generated file, or rules pasted in bulk): counted, not timed."""
    import sys

    import bridge.mapping.compiler as compiler

    text = "source_format: moengage_streams\ndestination_kind: segment\nrules:\n" + "".join(
        f"  - {{name: r{i}, match: {{event_type: t{i}}}, {rule}}}\n" for i in range(rules)
    )
    path = write(tmp_path / f"m{rules}.yaml", text)
    steps = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if frame.f_code.co_filename != compiler.__file__:
            return None
        if event == "line":
            steps += 1
        return trace

    sys.settrace(trace)
    try:
        load_mapping_file(path)
    finally:
        sys.settrace(None)
    return steps


@pytest.mark.parametrize(
    "rule",
    [
        "drop: x",
        # and each `continue: true` rule with every rule below it (which may follow it?)
        "kind: track, continue: true, body: {event: e, userId: u}",
    ],
)
def test_checking_a_file_of_many_rules_grows_with_the_rules_not_their_square(tmp_path: Path, rule: str) -> None:
    """Each rule was compared with every rule above it (can it ever match?) and with every
    value another rule matches (which rules to try for it): a 1 MiB file of such rules took
    many minutes to load, on `bridge mappings check`, at start and in a reload's thread."""
    small, large = _compile_steps(tmp_path, 300, rule), _compile_steps(tmp_path, 600, rule)
    assert large < 2.5 * small, (small, large)
