"""Review fixes: hostile YAML, wrong-type values, null fields, coercion limits, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.mapping import MappingError, load_mapping_dir, load_mapping_file

from .helpers import HEADER, RULES, errors, write

# --- 1. anchors, aliases and nesting depth -----------------------------------


def test_alias_bomb_is_rejected_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    text = HEADER + "let:\n" + "\n".join("  " + x for x in lines) + "\n" + RULES
    diags = errors(tmp_path, text)
    assert diags
    d = diags[0]
    assert (d.line, d.column) == (4, 7)
    assert d.yaml_path == "let.a0"
    assert "anchor" in d.message and "let:" in d.message and "lookups" in d.message


def test_self_referencing_alias_is_a_diagnostic(tmp_path: Path) -> None:
    diags = errors(tmp_path, HEADER + "let:\n  x: &a [*a]\n" + RULES)
    assert diags and diags[0].yaml_path == "let.x"
    assert "anchor" in diags[0].message


def test_alias_alone_is_a_diagnostic(tmp_path: Path) -> None:
    text = HEADER + RULES + "    detail: *nowhere\n"
    diags = errors(tmp_path, text)
    assert diags and "alias" in diags[0].message


def test_deep_nesting_is_a_diagnostic(tmp_path: Path) -> None:
    text = HEADER + "let:\n  x: {literal: " + "[" * 3000 + "]" * 3000 + "}\n" + RULES
    diags = errors(tmp_path, text)
    assert diags and "deep" in diags[0].message
    assert diags[0].yaml_path.startswith("let.x.literal[0]")


def test_shipped_mappings_and_lookups_load_with_the_strict_loader() -> None:
    # the shipped files use no anchors and are not nested too deep
    assert set(load_mapping_dir(Path(__file__).resolve().parents[2] / "mappings")) >= {"segment-to-moengage"}


# --- 2. wrong-type values are diagnostics; reloads survive surprises ----------


@pytest.mark.parametrize(
    ("snippet", "ypath"),
    [
        ("kind: [event]", "rules[0].kind"),
        ("kind: {a: 1}", "rules[0].kind"),
        ("body: {customer_id: {path: $.userId, pipe: [{case: [lower]}]}}", "rules[0].body.customer_id.pipe[0].case"),
        ("body: {customer_id: {path: $.userId, pipe: [{to: {a: 1}}]}}", "rules[0].body.customer_id.pipe[0].to"),
    ],
)
def test_wrong_type_values_are_diagnostics(tmp_path: Path, snippet: str, ypath: str) -> None:
    rule = {"kind": "kind: customer", "body": "body: {customer_id: $.userId}"}
    rule[snippet.split(":")[0]] = snippet
    text = HEADER + "rules:\n  - name: r\n    " + rule["kind"] + "\n    " + rule["body"] + "\n"
    diags = errors(tmp_path, text)
    assert [d.yaml_path for d in diags] == [ypath]
    assert diags[0].line == (5 if ypath.endswith("kind") else 6)
    assert "YNode" not in diags[0].message
    assert "expected" in diags[0].message


def test_lookup_values_must_be_scalars(tmp_path: Path) -> None:
    diags = errors(tmp_path, HEADER + "lookups:\n  s: {values: [a, [b]]}\n" + RULES)
    assert [(d.yaml_path, d.line) for d in diags] == [("lookups.s.values", 4)]


def test_unexpected_compiler_error_is_a_diagnostic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.mapping import compiler

    def boom(*args: object) -> None:
        raise RuntimeError("compiler bug")

    monkeypatch.setattr(compiler.FileCompiler, "compile", boom)
    diags = errors(tmp_path, HEADER + RULES)
    assert len(diags) == 1 and "RuntimeError: compiler bug" in diags[0].message


def test_mapping_set_reload_keeps_old_set_on_unexpected_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.mapping import reload

    write(tmp_path / "m.yaml", HEADER + RULES)
    first = reload.MappingSet.of(load_mapping_dir(tmp_path))

    def boom(directory: Path) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reload, "compile_mapping_dir", boom)
    new, diags = first.reload(tmp_path)
    assert new is first
    assert len(diags) == 1 and "RecursionError: maximum recursion depth exceeded" in diags[0].message


async def test_file_watcher_survives_a_failing_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import itertools
    from types import SimpleNamespace

    from bridge import runtime

    counter = itertools.count()
    calls: list[int] = []

    async def reload_mappings() -> runtime.MappingReload:
        calls.append(1)
        raise RuntimeError("unexpected")

    fake = SimpleNamespace(
        config=SimpleNamespace(mappings=SimpleNamespace(watch_interval=0.001)),
        mappings_dir=Path("."),
        reload_mappings=reload_mappings,
        _loaded_fingerprint="",
        # every fingerprint holds for two polls: a change that settled, each time
        _watched_fingerprint=lambda: str(next(counter) // 2),
    )
    task = asyncio.create_task(runtime.Runtime._watch_mappings(fake))  # type: ignore[arg-type]
    for _ in range(200):
        await asyncio.sleep(0.005)
        if len(calls) >= 3:
            break
    assert len(calls) >= 3 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_watcher_reloads_a_change_only_once_it_has_settled() -> None:
    """A file caught mid-write may parse with its later rules cut off: a change is loaded
    once the fingerprint held still for one more poll."""
    from bridge.mapping.reload import SettledChange

    change = SettledChange("a")
    polled = ["a", "b", "c", "c", "c", "d", "c", "e", "e"]
    # b was still changing; c settled; d changed back to the loaded c before settling
    assert [p for p in polled if change.due(p)] == ["c", "e"]


def test_runtime_reload_turns_unexpected_errors_into_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from bridge import runtime

    def boom(directory: Path) -> None:
        raise RuntimeError("surprise")

    old_set = SimpleNamespace(reload=boom)
    seen: list[bool] = []
    fake = SimpleNamespace(_set=old_set, mappings_dir=Path("mappings"), on_reload=seen.append)
    compiled = runtime.Runtime._compile_reload(fake)  # type: ignore[arg-type]
    problems = runtime.Runtime._apply_reload(fake, compiled).problems  # type: ignore[arg-type]
    assert problems and "RuntimeError: surprise" in problems[0]
    assert fake._set is old_set and seen == [False]


def test_a_reload_counts_added_removed_and_new_versions_as_changed() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from bridge.runtime import changed_mappings

    def at(**versions: str) -> Any:
        return {name: SimpleNamespace(version=v) for name, v in versions.items()}

    before = cast(Any, at(kept="1", edited="1", removed="1"))
    after = cast(Any, at(kept="1", edited="2", added="1"))
    assert changed_mappings(before, after) == ["added", "edited", "removed"]
    assert changed_mappings(before, before) == []


# --- 4. every coercion failure follows on_error -------------------------------

DEEP: dict[str, object] = {}
_d = DEEP
for _ in range(300):
    _d["a"] = {}
    _d = _d["a"]  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("pipe", "value"),
    [
        ("[{to: epoch_seconds}]", "²"),
        ("[{to: iso8601}]", "1" * 5000),
        ("[{to: epoch_millis}]", 10**400),
        ("[{to: integer}]", "²"),
        ("[{to: number}]", "1" * 5000),
        ("[{to: string}]", 10**5000),
        ("[{to: string}]", DEEP),
        ("[{lookup: {a: b}}]", DEEP),
        ("[{json: encode}]", DEEP),
    ],
    ids=[
        "superscript-time",
        "5000-digit-time",
        "huge-int-time",
        "superscript-int",
        "5000-digit-number",
        "huge-int-string",
        "deep-string",
        "deep-lookup",
        "deep-json",
    ],
)
def test_coercion_failures_follow_on_error(tmp_path: Path, pipe: str, value: object) -> None:
    from bridge.mapping import MapContext
    from bridge.mapping.api import Discarded

    from .helpers import evaluate, value_mapping

    m = value_mapping(tmp_path, f"{{path: $.x, pipe: {pipe}}}")
    assert evaluate(m, {"type": "track", "x": value}) == "<absent>"
    if pipe.startswith("[{to"):
        step = pipe[2:-2]
        m = value_mapping(tmp_path, f"{{path: $.x, pipe: [{{{step}, on_error: drop_event, reason: bad}}]}}")
        result = m.apply({"type": "track", "x": value}, MapContext())
        assert isinstance(result, Discarded) and result.reason == "bad"


def test_template_with_deep_object_renders_without_it(tmp_path: Path) -> None:
    from .helpers import evaluate, value_mapping

    m = value_mapping(tmp_path, '"id-{{x}}"')
    assert evaluate(m, {"type": "track", "x": DEEP}) == "id-"


@pytest.mark.parametrize("index", ["²", "1" * 5000, "--1"])
def test_bad_path_index_is_a_diagnostic(tmp_path: Path, index: str) -> None:
    diags = errors(tmp_path, HEADER + RULES.replace("$.userId", f"'$.a[{index}]'"))
    assert len(diags) == 1 and "bad index" in diags[0].message and diags[0].line == 8


# --- 8. identity_key and identity_link never raise -----------------------------


def test_identity_functions_return_none_on_any_error(tmp_path: Path) -> None:
    text = HEADER + "identity:\n  key: $.userId\n  link: {from: $.userId, to: $.traits.id}\n" + RULES
    m = load_mapping_file(write(tmp_path / "m.yaml", text))
    event = {"type": "identify", "userId": "a", "traits": {"id": "b"}}
    assert m.identity_key(event) == "a" and m.identity_link(event) == ("a", "b")

    def boom(env: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    m._identity_key = boom  # type: ignore[attr-defined]
    when, _, dst = m._identity_link  # type: ignore[attr-defined]
    m._identity_link = (when, boom, dst)  # type: ignore[attr-defined]
    assert m.identity_key(event) is None
    assert m.identity_link(event) is None


# --- 6. boolean options take only true or false --------------------------------


@pytest.mark.parametrize(
    ("top", "expr", "ypath"),
    [
        ("", '{path: $.x, pipe: [{lookup: {a: b}, keep_unmatched: "no"}]}', "let.v.pipe[0].keep_unmatched"),
        ("", "{path: $.x, pipe: [{lookup: {a: b}, ignore_case: off}]}", "let.v.pipe[0].ignore_case"),
        ("", '{path: $.x, pipe: [{replace: a, with: b, ignore_case: "false"}]}', "let.v.pipe[0].ignore_case"),
        (
            "lookups:\n  t: {table: {a: b}, ignore_case: no}\n",
            "{path: $.x, pipe: [{lookup: t}]}",
            "lookups.t.ignore_case",
        ),
        ("lookups:\n  t: {values: [a], ignore_case: 1}\n", "{path: $.x, pipe: [trim]}", "lookups.t.ignore_case"),
    ],
)
def test_boolean_options_need_true_or_false(tmp_path: Path, top: str, expr: str, ypath: str) -> None:
    from .helpers import value_mapping

    with pytest.raises(MappingError) as exc:
        value_mapping(tmp_path, expr, top)
    diags = exc.value.diagnostics
    assert [d.yaml_path for d in diags] == [ypath]
    assert "expected true or false" in diags[0].message


def test_boolean_options_accept_true_and_false(tmp_path: Path) -> None:
    from .helpers import evaluate, value_mapping

    m = value_mapping(tmp_path, "{path: $.x, pipe: [{lookup: {a: b}, keep_unmatched: false, ignore_case: true}]}")
    assert evaluate(m, {"type": "track", "x": "A"}) == "b"
    assert evaluate(m, {"type": "track", "x": "z"}) == "<absent>"


# --- 9. replace with ignore_case keeps the original text intact ----------------


@pytest.mark.parametrize(
    ("old", "new", "text", "want"),
    [
        ("x", "-", "İİxyz", "İİ-yz"),
        ("X", "-", "İxİx", "İ-İ-"),
        ("a.b", r"\1", "A.B aXb", r"\1 aXb"),
        ("ß", "ss", "Straße", "Strasse"),
    ],
)
def test_replace_ignore_case_with_case_length_changes(tmp_path: Path, old: str, new: str, text: str, want: str) -> None:
    import json

    from .helpers import evaluate, value_mapping

    expr = f"{{path: $.x, pipe: [{{replace: {json.dumps(old)}, with: {json.dumps(new)}, ignore_case: true}}]}}"
    m = value_mapping(tmp_path, expr)
    assert evaluate(m, {"type": "track", "x": text}) == want


# --- 5. overrides never write into the event -----------------------------------


def test_override_set_does_not_mutate_the_event_or_later_rules(tmp_path: Path) -> None:
    import copy

    from bridge.mapping import MapContext

    from .helpers import outputs

    text = (
        HEADER
        + """\
let:
  props: $.properties
rules:
  - name: first
    match: {type: track}
    kind: event
    continue: true
    body:
      customer_id: $.userId
      actions:
        - object:
            action: $.event
            attributes: {path: $.properties}
    overrides:
      by: $.event
      cases:
        Order Completed:
          set:
            actions[0].attributes.revenue: 99
            actions[0].attributes.nested.deep: 1
            actions[0].attributes.items[0]: replaced
            actions[0].attributes.gone: null
  - name: second
    match: {type: track}
    kind: event
    body:
      customer_id: $.userId
      actions:
        - object: {action: second, attributes: $let.props}
"""
    )
    m = load_mapping_file(write(tmp_path / "m.yaml", text))
    event = {
        "type": "track",
        "userId": "u1",
        "event": "Order Completed",
        "properties": {"total": 5, "nested": {"x": 1}, "items": ["a", "b"], "gone": 1},
    }
    before = copy.deepcopy(event)
    first, second = outputs(m.apply(event, MapContext()))
    assert event == before
    assert first.body["actions"][0]["attributes"] == {
        "total": 5,
        "nested": {"x": 1, "deep": 1},
        "items": ["replaced", "b"],
        "gone": None,
        "revenue": 99,
    }
    assert second.body["actions"][0]["attributes"] == before["properties"]


# --- 7. fixtures compare JSON types strictly -------------------------------------


@pytest.mark.parametrize(
    ("expected", "ok"),
    [
        ("{flag: true, n: 12, f: 1.5}", True),
        ("{flag: 1, n: 12, f: 1.5}", False),
        ("{flag: true, n: 12.0, f: 1.5}", False),
        ("{flag: true, n: 12, f: 1.5, extra: [1]}", False),
    ],
)
def test_fixture_comparison_is_type_strict(tmp_path: Path, expected: str, ok: bool) -> None:
    from bridge.mapping.fixtures import run_fixtures

    write(
        tmp_path / "m.yaml",
        """\
        source_format: segment
        destination_kind: segment
        rules:
          - name: t
            kind: track
            body: {event: e, userId: u, properties: {literal: {flag: true, n: 12, f: 1.5}}}
        """,
    )
    write(
        tmp_path / "tests" / "m" / "case.yaml",
        "input: {type: track}\n"
        "expect:\n  outputs:\n"
        f"    - {{kind: track, body: {{type: track, event: e, userId: u, properties: {expected}}}}}\n",
    )
    report = run_fixtures(tmp_path)
    assert report.ok is ok, report.render()
    if not ok:
        assert "--- expected" in report.render() and "+++ actual" in report.render()


def test_fixture_comparison_nested_lists(tmp_path: Path) -> None:
    from bridge.mapping.fixtures import same

    assert same({"a": [1, {"b": False}]}, {"a": [1, {"b": False}]})
    assert not same({"a": [1, {"b": False}]}, {"a": [1, {"b": 0}]})
    assert not same([1], [1.0]) and not same(None, False)


# --- 3. the shipped mapping leaves out optional fields that are null or empty ----


@pytest.mark.parametrize("device_id", [None, {}, [], ""])
def test_shipped_track_omits_null_or_empty_optional_fields(device_id: object) -> None:
    from bridge.mapping import MapContext

    from .helpers import outputs

    root = Path(__file__).resolve().parents[2] / "mappings"
    m = load_mapping_dir(root)["segment-to-moengage"]
    event = {
        "type": "track",
        "userId": "u-1",
        "event": "E",
        "properties": None,
        "context": {"device": {"id": device_id}, "app": {"version": None}, "timezone": None},
    }
    (out,) = outputs(m.apply(event, MapContext()))
    assert out.body == {"type": "event", "customer_id": "u-1", "actions": [{"action": "E", "attributes": {}}]}
