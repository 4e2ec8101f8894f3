"""A mapping's `options:` section: the options it reads, their types and defaults."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from bridge.mapping import MapContext, MappingError, load_mapping_file
from bridge.mapping.cli import cmd_translate
from bridge.mapping.fixtures import run_fixtures
from tests.mapping.helpers import evaluate, value_mapping, write

ROOT = Path(__file__).resolve().parents[2]

OPTIONS = """
options:
  flag: {type: boolean, default: false, description: a switch}
  label: {type: string}
  size: {type: integer, default: 3}
  ratio: {type: number}
  tags: {type: array}
  extra: {type: object}
"""
READ_ALL = (
    "{object: {f: $options.flag, l: $options.label, s: $options.size, r: $options.ratio,"
    " t: $options.tags, e: $options.extra}}"
)


def test_a_declared_option_takes_its_type_and_is_refused_another(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, READ_ALL, OPTIONS)
    assert m.option_names() == frozenset({"flag", "label", "size", "ratio", "tags", "extra"})
    good = {"flag": True, "label": "x", "size": 5, "ratio": 0.5, "tags": ["a"], "extra": {"k": 1}}
    assert m.option_problems(good) == []
    assert m.option_problems({"ratio": 2}) == []  # an integer is a number
    bad = {"flag": "yes", "label": 7, "size": 1.5, "ratio": True, "tags": "a", "extra": [1], "undeclared": 1}
    assert m.option_problems(bad) == [
        ("extra", "expected a mapping, got a list"),
        ("flag", 'expected a boolean (true or false), got the string "yes"'),
        ("label", "expected a string, got the integer 7"),
        ("ratio", "expected a number, got the boolean true"),
        ("size", "expected an integer, got the number 1.5"),
        ("tags", 'expected a list, got the string "a"'),
    ]
    assert m.option_problems({"flag": 1}) == [("flag", "expected a boolean (true or false), got the integer 1")]
    assert m.option_problems({"flag": None}) == [("flag", "expected a boolean (true or false), got null (nothing)")]


def test_a_declared_default_is_read_when_the_option_is_not_given(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, READ_ALL, OPTIONS)
    event = {"type": "track"}
    assert evaluate(m, event) == {"f": False, "s": 3}
    given = {"flag": True, "size": 9}
    assert evaluate(m, event, MapContext(options=given)) == {"f": True, "s": 9}
    assert evaluate(m, event, MapContext(options=given)) == {"f": True, "s": 9}  # the cached merge
    assert evaluate(m, event, MapContext(options={"label": "x"})) == {"f": False, "l": "x", "s": 3}


@pytest.mark.parametrize(
    ("top", "expr", "message"),
    [
        # Read but not declared: it would go unchecked.
        (
            "options:\n  flag: {type: boolean}\n",
            "{object: {a: $options.flag, b: $options.flga}}",
            "let.v.object.b: $options.flga is not declared under 'options' (did you mean 'flag'?); "
            "declare it (options: {flga: {type: ...}}) so a destination's value is checked",
        ),
        # Declared but never read: a setting that would do nothing.
        (
            "options:\n  flag: {type: boolean}\n  other: {type: string}\n",
            "$options.flag",
            "options.other: option 'other' is declared but the mapping never reads $options.other",
        ),
        (
            "options:\n  flag: {type: bool}\n",
            "$options.flag",
            "options.flag.type: expected one of boolean, string, integer, number, array, object, got 'bool'"
            " (did you mean 'boolean'?)",
        ),
        (
            "options:\n  flag: {type: boolean, default: 'no'}\n",
            "$options.flag",
            'options.flag.default: expected a boolean (true or false), got the string "no"',
        ),
        (
            "options:\n  flag: {type: boolean, deafult: true}\n",
            "$options.flag",
            "options.flag.deafult: unknown key 'deafult' in an option (did you mean 'default'?); "
            "expected one of: type, default, description",
        ),
        (
            "options:\n  flag: {default: true}\n",
            "$options.flag",
            "options.flag: an option is missing required key 'type'",
        ),
        (
            "options:\n  flag: boolean\n",
            "$options.flag",
            "options.flag: expected {type: ..., default: ...}, got 'boolean'",
        ),
        (
            "options: [flag]\n",
            "$options.flag",
            "options: expected a mapping of option name to {type: ..., default: ...}, got a list",
        ),
    ],
)
def test_a_bad_options_section_is_a_precise_diagnostic(tmp_path: Path, top: str, expr: str, message: str) -> None:
    with pytest.raises(MappingError) as exc:
        value_mapping(tmp_path, expr, top)
    assert [d.split(": ", 1)[1] for d in str(exc.value).splitlines()] == [message]


def test_a_mapping_reading_options_whole_may_take_only_the_declared_ones(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, "$options", "options:\n  flag: {type: boolean}\n")
    assert m.option_names() == frozenset({"flag"})
    assert m.option_problems({"flag": "true"}) == [
        ("flag", 'expected a boolean (true or false), got the string "true"')
    ]


def test_a_mapping_without_options_declares_nothing_and_checks_nothing(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, "$options.flag")
    assert m.option_names() == frozenset({"flag"})
    assert m.option_problems({"flag": "yes"}) == []


def _translate(option: list[str]) -> tuple[int, str, str]:
    args = argparse.Namespace(
        mapping="segment-to-moengage",
        mappings_dir=str(ROOT / "mappings"),
        option=option,
        linked_id=None,
        source="",
        config=None,
    )
    stdin = io.StringIO('{"type": "track", "event": "x", "anonymousId": "a-1", "messageId": "m-1"}')
    out, err = io.StringIO(), io.StringIO()
    code = cmd_translate(args, stdin=stdin, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("anonymous_ids=yes", 'expected a boolean (true or false), got the string "yes"'),
        ("anonymous_ids=1", "expected a boolean (true or false), got the integer 1"),
        ('anonymous_ids="true"', 'expected a boolean (true or false), got the string "true"'),
    ],
)
def test_translate_refuses_an_option_of_the_wrong_type(option: str, message: str) -> None:
    code, out, err = _translate([option])
    assert (code, out, err) == (1, "", f"error: --option anonymous_ids: {message}\n")


def test_translate_takes_an_option_of_the_declared_type() -> None:
    code, out, err = _translate(["anonymous_ids=true"])
    assert (code, err) == (0, "") and '"customer_id":"a-1"' in out
    code, out, _ = _translate([])
    assert code == 0 and out.startswith("discarded: anonymous_user ")


def test_translate_says_how_to_give_text_that_parses_as_json(tmp_path: Path) -> None:
    write(
        tmp_path / "m.yaml",
        """
        source_format: segment
        destination_kind: segment
        options: {label: {type: string}}
        rules:
          - {name: t, kind: track, body: {event: $options.label, userId: u}}
        """,
    )
    args = argparse.Namespace(
        mapping="m", mappings_dir=str(tmp_path), option=["label=123"], linked_id=None, source="", config=None
    )
    err = io.StringIO()
    assert cmd_translate(args, stdin=io.StringIO("{}"), out=io.StringIO(), err=err) == 1
    assert err.getvalue() == (
        "error: --option label: expected a string, got the integer 123 (a value is read as JSON when it "
        "parses: for the text, quote it: label='\"123\"')\n"
    )


def test_a_fixture_giving_an_option_of_the_wrong_type_fails(tmp_path: Path) -> None:
    write(
        tmp_path / "m.yaml",
        """
        source_format: segment
        destination_kind: segment
        options: {flag: {type: boolean}}
        rules:
          - {name: t, kind: track, body: {event: e, userId: u, properties: {object: {f: $options.flag}}}}
        """,
    )
    write(
        tmp_path / "tests" / "m" / "f.yaml",
        """
        input: {type: track}
        context: {options: {flag: "yes"}}
        expect: {discarded: x}
        """,
    )
    report = run_fixtures(tmp_path)
    assert not report.ok
    assert report.failed[0].message == 'context.options.flag: expected a boolean (true or false), got the string "yes"'


def test_the_shipped_mapping_declares_anonymous_ids() -> None:
    m = load_mapping_file(ROOT / "mappings" / "segment-to-moengage.yaml")
    assert m.option_names() == frozenset({"anonymous_ids"})
    assert m.option_problems({"anonymous_ids": "yes"}) == [
        ("anonymous_ids", 'expected a boolean (true or false), got the string "yes"')
    ]
