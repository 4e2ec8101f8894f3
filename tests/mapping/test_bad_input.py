"""Bad input to the mapping tools and steps: a precise error or the documented result,
never a traceback."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest

from bridge.mapping import MapContext
from bridge.mapping.api import Discarded
from bridge.mapping.loader import compile_mapping_file
from tests.mapping.helpers import evaluate, value_mapping, write

ROOT = Path(__file__).resolve().parents[2]

SEG_TRACK = (
    "source_format: segment\n"
    "destination_kind: segment\n"
    "rules:\n"
    "  - name: t\n"
    "    kind: track\n"
    "    body:\n"
    "      event: e\n"
    "      userId: u\n"
    "      properties: {object: {n: {path: $.n, pipe: [{to: integer}]}}}\n"
)


# -- `bridge translate` crashes on what it cannot print ---------------------------


def test_translate_of_a_body_too_deep_for_json_does_not_crash(tmp_path: Path) -> None:
    from bridge.mapping.cli import cmd_translate

    deep = '{"a":' * 300 + "1" + "}" * 300
    event = '{"type":"track","userId":"u1","event":"x","properties":' + deep + "}"
    out, err = io.StringIO(), io.StringIO()
    args = _translate_args(ROOT / "mappings", "segment-to-moengage")
    code = cmd_translate(args, stdin=io.StringIO(event), out=out, err=err)  # raised TypeError
    assert code == 1 or "failed" in out.getvalue()


def test_translate_of_an_integer_beyond_64_bits_does_not_crash(tmp_path: Path) -> None:
    from bridge.mapping.cli import cmd_translate

    write(tmp_path / "m" / "t.yaml", SEG_TRACK)
    out, err = io.StringIO(), io.StringIO()
    args = _translate_args(tmp_path / "m", "t")
    code = cmd_translate(
        args, stdin=io.StringIO('{"type":"track","userId":"x","event":"e","n":"1e30"}'), out=out, err=err
    )  # raised TypeError
    # Past 64 bits `to: integer` fails like any bad value: on_error's default drops the field.
    assert code == 0 and out.getvalue() == 'track {"type":"track","event":"e","userId":"u","properties":{}}\n'


def test_translate_of_non_utf8_stdin_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.mapping.cli import cmd_translate

    raw = io.BytesIO(b'{"type":"track","userId":"u\xff","event":"x"}')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape"))
    out, err = io.StringIO(), io.StringIO()
    code = cmd_translate(_translate_args(ROOT / "mappings", "segment-to-moengage"), out=out, err=err)
    assert code == 1 and "error:" in err.getvalue()  # raised UnicodeEncodeError


def _translate_args(directory: Path, mapping: str) -> argparse.Namespace:
    return argparse.Namespace(
        mapping=mapping, mappings_dir=str(directory), option=[], linked_id=None, source="", config=None
    )


# -- overrides.set writes fields the destination does not have, unchecked ----------


def test_override_set_paths_are_checked_against_the_destination(tmp_path: Path) -> None:
    text = (
        "source_format: segment\n"
        "destination_kind: moengage\n"
        "rules:\n"
        "  - name: t\n"
        "    match: {type: track}\n"
        "    kind: event\n"
        "    body:\n"
        "      customer_id: $.userId\n"
        "      actions: [{object: {action: $.event}}]\n"
        "    overrides:\n"
        "      by: $.event\n"
        "      cases:\n"
        "        Order Completed:\n"
        "          set:\n"
        "            custmer_id: x\n"
    )
    mapping, diags = compile_mapping_file(write(tmp_path / "m.yaml", text))
    assert mapping is None, "an override setting the unknown field 'custmer_id' was accepted"
    assert any("custmer_id" in d.yaml_path and d.line == 15 for d in diags)


# -- tz_offset at an instant given in integer epoch milliseconds ----------------------


def test_tz_offset_reads_integer_epoch_millis_as_milliseconds(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, "{path: $.tz, pipe: [{tz_offset: $.ts}]}")
    # 2024-07-04T12:00:00Z: New York is on EDT, -4 h. As a float the same instant works.
    assert evaluate(m, {"type": "track", "tz": "America/New_York", "ts": 1720094400000.0}) == -14400
    assert evaluate(m, {"type": "track", "tz": "America/New_York", "ts": 1720094400000}) == -14400  # got 0


# -- `bridge mappings test` crashes on a malformed fixture -----------------------------


def _fixture_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fx"
    write(d / "t.yaml", SEG_TRACK)
    return d


def test_fixture_with_options_not_a_mapping_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    from bridge.mapping.fixtures import run_fixtures

    d = _fixture_dir(tmp_path)
    write(
        d / "tests" / "t" / "a.yaml",
        "input: {type: track}\ncontext: {options: anonymous_ids}\nexpect: {discarded: x}\n",
    )
    report = run_fixtures(d)  # raised ValueError from dict("anonymous_ids")
    assert not report.ok and "options" in report.failed[0].message


def test_non_utf8_fixture_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    from bridge.mapping.fixtures import run_fixtures

    d = _fixture_dir(tmp_path)
    (d / "tests" / "t").mkdir(parents=True)
    (d / "tests" / "t" / "a.yaml").write_bytes(b'input: {type: track, n: "caf\xe9"}\nexpect: {discarded: x}\n')
    report = run_fixtures(d)  # raised UnicodeDecodeError
    assert not report.ok and "cannot read fixture" in report.failed[0].message


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        # An alias to an enclosing anchor: the JSON check recursed without end.
        (
            "input: &e {type: track, properties: {again: *e}}\nexpect: {discarded: x}\n",
            "input.properties.again is an alias of a collection that contains it",
        ),
        (
            "input: {type: track}\nexpect: &x {discarded: x, identity_link: [*x]}\n",
            "expect.identity_link[0] is an alias of a collection that contains it",
        ),
        # YAML types JSON has no counterpart for: json.dumps raised TypeError on bytes.
        (
            "input: {type: track, properties: {b: !!binary aGVsbG8=}}\nexpect: {discarded: x}\n",
            "input.properties.b is a YAML bytes",
        ),
        ("input: {type: track, properties: !!set {a}}\nexpect: {discarded: x}\n", "input.properties is a YAML set"),
        # Thousands of levels: PyYAML's composer overflowed the stack.
        (
            "input: {type: track, n: " + "[" * 3000 + "]" * 3000 + "}\nexpect: {discarded: x}\n",
            "cannot read fixture: its YAML is nested too deeply",
        ),
    ],
    ids=["input-alias-cycle", "expect-alias-cycle", "binary", "set", "deep"],
)
def test_a_fixture_that_is_not_json_data_is_a_failure_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixture: str, message: str
) -> None:
    from bridge.cli import main

    d = _fixture_dir(tmp_path)
    write(d / "tests" / "t" / "a.yaml", fixture)
    assert main(["mappings", "test", "--mappings-dir", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {d / 'tests' / 't' / 'a.yaml'}" in out and message in out, out
    assert "0 passed, 1 failed" in out


@pytest.mark.parametrize("command", [["mappings", "test"], ["translate", "--mapping", "t"]])
def test_a_mappings_dir_that_is_a_file_is_named_as_such_not_as_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    from bridge.cli import main

    file = write(tmp_path / "fx" / "t.yaml", SEG_TRACK)
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    assert main([*command, "--mappings-dir", str(file)]) == 1
    printed = capsys.readouterr()
    assert f"{file}:1:1: <root>: mappings directory is not a directory" in printed.out + printed.err
    assert main([*command, "--mappings-dir", str(tmp_path / "gone")]) == 1
    printed = capsys.readouterr()
    assert f"{tmp_path / 'gone'}:1:1: <root>: mappings directory does not exist" in printed.out + printed.err


def test_translate_with_stdin_closed_says_there_is_no_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.cli import main

    d = _fixture_dir(tmp_path)
    monkeypatch.setattr(sys, "stdin", None)  # as Python starts with fd 0 closed (`bridge translate <&-`)
    assert main(["translate", "--mapping", "t", "--mappings-dir", str(d)]) == 1
    assert capsys.readouterr().err.startswith("error: no input: expected a JSON event")


@pytest.mark.parametrize(
    ("mappings", "error"),
    [
        ("{dir: [a, b]}", "config error: mappings.dir: expected a string, got a list"),
        ("[a]", "config error: mappings: expected a mapping, got a list"),  # was: ./mappings, silently
    ],
)
@pytest.mark.parametrize("command", [["mappings", "test"], ["mappings", "check"], ["translate", "--mapping", "t"]])
def test_a_config_mappings_dir_that_is_not_a_string_is_the_config_error_bridge_check_gives(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    mappings: str,
    error: str,
) -> None:
    from bridge.cli import main

    config = write(tmp_path / "c.yaml", f"mappings: {mappings}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    assert main([*command, "--config", str(config)]) == 2
    assert capsys.readouterr().err == error + "\n"


# -- a lookup file that is not UTF-8 is silently accepted ------------------------------


def test_non_utf8_lookup_file_is_a_diagnostic(tmp_path: Path) -> None:
    (tmp_path / "lookups").mkdir()
    (tmp_path / "lookups" / "l.yaml").write_bytes(b"table: {caf\xe9: x}\n")
    text = (
        "source_format: segment\n"
        "destination_kind: segment\n"
        "lookups:\n"
        "  l: {file: lookups/l.yaml}\n"
        "rules:\n"
        "  - name: t\n"
        "    kind: track\n"
        "    body: {event: {path: $.e, pipe: [{lookup: l}]}, userId: u}\n"
    )
    mapping, diags = compile_mapping_file(write(tmp_path / "m.yaml", text))
    assert mapping is None and any("UTF-8" in d.message for d in diags)
    # Reported where the byte is, in the lookup file, as its YAML errors are.
    [diag] = [d for d in diags if "UTF-8" in d.message]
    assert (diag.file, diag.line, diag.column) == (str(tmp_path / "lookups" / "l.yaml"), 1, 12), diag
    assert "byte 0xe9" in diag.message and "save the file as UTF-8" in diag.message, diag


def test_a_mapping_file_that_is_not_utf8_is_reported_where_the_byte_is(tmp_path: Path) -> None:
    """A mapping saved as Latin-1 (say, by an editor) is wrong at its first accented letter,
    maybe far down the file: the diagnostic names that line and column, not 1:1 and a
    byte offset."""
    text = (
        "source_format: segment\n"
        "destination_kind: segment\n"
        "rules:\n"
        "  - name: t\n"
        "    kind: track\n"
        "    body: {event: \u00abS\u00e3o Paulo\u00bb, userId: u}\n"
    )
    path = tmp_path / "m.yaml"
    path.write_bytes(text.encode("latin-1"))
    mapping, diags = compile_mapping_file(path)
    assert mapping is None
    [diag] = diags
    assert (diag.line, diag.column) == (6, 19), diag
    assert "not UTF-8: byte 0xab" in diag.message and "save the file as UTF-8" in diag.message, diag
    # A character before it on its line counts as one column, however many bytes it takes.
    path.write_bytes(text.replace("body", "b\u00f6dy").encode("utf-8").replace(b"\xc2\xab", b"\xab"))
    [diag] = compile_mapping_file(path)[1]
    assert (diag.line, diag.column) == (6, 19), diag


# -- `to: integer` gives an integer no JSON writer takes, whatever on_error says -------


def test_to_integer_beyond_64_bits_follows_on_error(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, "{path: $.n, pipe: [{to: integer}]}")
    assert evaluate(m, {"type": "track", "n": 1e30}) == "<absent>"  # got 10**30 (+ noise), unsendable
    m = value_mapping(tmp_path, "{path: $.n, pipe: [{to: integer, on_error: drop_event, reason: bad}]}")
    result = m.apply({"type": "track", "n": "1e30"}, MapContext())
    assert isinstance(result, Discarded) and result.reason == "bad"


# -- `{flatten: false}` (and {trim: false}, ...) still run the step --------------------


def test_flatten_false_is_not_silently_a_flatten(tmp_path: Path) -> None:
    mapping, _ = compile_mapping_file(
        write(
            tmp_path / "m.yaml",
            "source_format: segment\ndestination_kind: segment\nlet:\n  v: {path: $.o, pipe: [{flatten: false}]}\n"
            "rules:\n  - name: t\n    kind: track\n    body: {event: e, userId: u, properties: $let.v}\n",
        )
    )
    if mapping is not None:  # accepted: then it must not flatten (a diagnostic is the fix)
        out = mapping.apply({"type": "track", "o": {"a": {"b": 1}}}, MapContext())
        assert isinstance(out, list) and out[0].body["properties"] == {"a": {"b": 1}}  # got {'a.b': 1}


@pytest.mark.parametrize("text", ["\u0661\u0662", "1_000", "\uff11\uff12"])
def test_numbers_are_read_in_ascii_digits_only(tmp_path: Path, text: str) -> None:
    """docs/mappings.md: a non-ASCII digit is a conversion error (Python's int() reads
    Arabic-Indic and full-width digits, and 1_000; no sender means them)."""
    for to in ("integer", "number"):
        m = value_mapping(tmp_path / to, f"{{path: $.n, pipe: [{{to: {to}}}]}}")
        assert evaluate(m, {"type": "track", "n": text}) == "<absent>", (to, text)
        assert evaluate(m, {"type": "track", "n": " 12 "}) == 12


def test_times_are_read_in_ascii_digits_only(tmp_path: Path) -> None:
    m = value_mapping(tmp_path, "{path: $.t, pipe: [{to: epoch_seconds}]}")
    assert evaluate(m, {"type": "track", "t": "2024-01-01T00:00:00Z"}) == 1704067200
    arabic = "".join(chr(0x660 + int(c)) if c.isdigit() else c for c in "2024-01-01T00:00:00")
    assert evaluate(m, {"type": "track", "t": arabic}) == "<absent>"
    assert evaluate(m, {"type": "track", "t": "\u0661\u0667\u0660\u0664"}) == "<absent>"
