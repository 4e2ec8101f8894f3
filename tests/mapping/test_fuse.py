"""Fused mappings: rule bodies, lets and condition operands compiled into one generated
function each must give exactly what the closures give, on every event.

Every test compiles the same file twice, with fusing on and off, and compares.
"""

from __future__ import annotations

import copy
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

import bridge.mapping.fuse as fuse
from bridge.mapping import CompiledMapping, MapContext, load_mapping_file
from bridge.mapping.api import Discarded
from bridge.mapping.compiler import YamlMapping
from bridge.mapping.runtime import MISSING, Env, is_empty
from tests.mapping.helpers import track_rule, write

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "mappings").glob("*.yaml"))

# Every node kind that has an emitter, with odd shapes around it.
ALL_NODES = """
source_format: segment
destination_kind: segment
identity:
  key: {first: [$.userId, $.traits.id], pipe: [{to: string}]}
  also: [$.previousId, {path: "$.context.ids[1]"}, {if: {value: $options.anon, equals: true}, then: $.anonymousId}]
let:
  who: {first: [$link, $.userId, {if: {value: $options.anon, equals: true}, then: $.anonymousId}]}
  tags: {path: $.properties.tags, drop_if: empty, default: {literal: [none]}}
  size: {path: $let.tags, pipe: [length, {to: string}, trim]}
  first_tag: "$let.tags[0]"
  last_tag: "$let.tags[-1]"
  zone: {path: $.context.timezone, pipe: [trim, {to: string}], drop_if: null}
drop:
  - when:
      all:
        - {value: $.properties.plain, equals: drop-me}
        - not: {empty: $.properties.items}
    reason: all_of
  - when:
      any:
        - {value: $.event, in: [Ignored, Skipped]}
        - {value: $.event, in: [LOUD], ignore_case: true}
        - {value: $.properties.a, gt: 100}
        - {value: $.properties.a, lte: -100}
        - {value: {path: $let.who, pipe: [trim, length]}, lt: 2}
    reason: any_of
rules:
  - name: everything
    kind: track
    when:
      all:
        - {exists: $let.who}
        - not: {match: {type: [identify, alias]}}
    body:
      userId: $let.who
      event: {first: [$.event, $.name, {literal: unnamed}]}
      properties:
        object:
          plain: $.properties.plain
          deep: $.context.device.model
          indexed: "$.properties.items[0].sku"
          back: "$.properties.items[-1].sku"
          source: $source
          option: $options.region
          list: [$.properties.a, $.properties.b, fixed, 3, true, null]
          first_tag: $let.first_tag
          last_tag: $let.last_tag
          size: $let.size
          zone: $let.zone
          colour: {path: $.properties.colour, pipe: [{lookup: {red: R, blue: B}}]}
          folded: {path: $.properties.colour, pipe: [{lookup: {red: R, Blue: B}, ignore_case: true}]}
          nested_table: {path: $.properties.colour, pipe: [{lookup: {red: {code: 1}}, keep_unmatched: true}]}
          maybe:
            if: {value: $.properties.flag, equals: true}
            then: yes
            else: {path: $.properties.other, default: no}
          only_then: {if: {exists: $.properties.flag}, then: flagged}
          typed: {if: {value: $.properties.a, is: [string, integer]}, then: id-like, else: other}
          untyped: {if: {value: $.properties.flag, is: boolean}, then: flag}
          literal: {literal: {a: [1, {b: 2}]}}
          nulls: {path: $.properties.nothing, drop_if: null}
          empties: {path: $.properties.blank, drop_if: empty, default: filled}
          7: a key that is not a string
          nested:
            object:
              inner: {first: [$.properties.missing, $.properties.plain]}
          prefixed: {if: {value: $.event, prefix: Cli}, then: starts, else: no}
          suffixed: {if: {value: $.event, suffix: ked}, then: ends, else: no}
          folded_prefix: {if: {value: $.event, prefix: cli, ignore_case: true}, then: starts}
          renamed:
            object: {moe_kept: $.properties.moe_kept}
            rest: {from: $.properties, rename_prefix: {moe_: seg_moe_}}
          renamed_two: {object: {}, rest: {from: $.properties, omit: [a], rename_prefix: {moe_: x_, ta: y_}}}
          renamed_prefixed: {object: {}, rest: {from: $.context, prefix: c_, rename_prefix: {dev: d_}}}
        rest: {from: $.properties, omit: [secret]}
"""

TEMPLATE_EVENT: dict[str, Any] = {
    "type": "track",
    "userId": "u-1",
    "anonymousId": "anon-1",
    "previousId": "p-1",
    "event": "Clicked",
    "name": "Page",
    "traits": {"id": "c-1"},
    "properties": {
        "plain": "x",
        "items": [{"sku": "a"}, {"sku": "b"}],
        "tags": ["red", "blue"],
        "a": 1,
        "b": None,
        "flag": True,
        "colour": "Red",
        "other": "o",
        "nothing": None,
        "blank": "",
        "secret": "s",
        "extra": {"k": [1, 2]},
        "moe_x": 1,
        "moe_kept": 2,
        "a\x00moe_b": 3,  # a NUL in a key: the search of the joined keys sees a start
    },
    "context": {"device": {"model": "m"}, "timezone": " Europe/Lisbon ", "ids": ["i0", "i1"]},
}

ODD_VALUES: tuple[Any, ...] = (None, "", " ", "0", 0, 1, 1.5, True, False, [], [None], {}, {"x": 1}, ["a", "b"])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _replace(event: Any, path: tuple[Any, ...], new: Any) -> Any:
    out = copy.deepcopy(event)
    target = out
    for key in path[:-1]:
        target = target[key]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return out


_DELETE = object()


def odd_events(base: dict[str, Any], n: int, seed: int) -> list[Any]:
    """The event, then variants with one or two values replaced by odd ones or removed."""
    rng = random.Random(seed)
    events: list[Any] = [base, {}, [], "text", None]
    for _ in range(n):
        event: Any = base
        for _ in range(rng.choice((1, 1, 2))):
            now = list(_paths(event))
            if not now:
                break
            event = _replace(event, rng.choice(now), rng.choice((*ODD_VALUES, _DELETE)))
        events.append(event)
    return events


CONTEXTS = (
    MapContext(),
    MapContext(linked_id="linked-1", options={"anon": True, "region": "eu"}, source="web"),
    MapContext(options={"anon": True}, links={"u-1": "c-9", "p-1": "c-8"}),
)


def _both(monkeypatch: pytest.MonkeyPatch, path: Path) -> tuple[CompiledMapping, CompiledMapping]:
    fused = load_mapping_file(path)
    with monkeypatch.context() as m:
        m.setattr(fuse, "ENABLED", False)
        plain = load_mapping_file(path)
    return fused, plain


def _same_everywhere(fused: CompiledMapping, plain: CompiledMapping, events: list[Any]) -> None:
    # repr, not ==: True, 1 and 1.0 are equal in Python but not in the JSON sent upstream
    for event in events:
        for ctx in CONTEXTS:
            assert repr(fused.apply(event, ctx)) == repr(plain.apply(event, ctx)), (event, ctx)
        if isinstance(event, dict):
            assert repr(fused.identity_ids(event)) == repr(plain.identity_ids(event)), event
            for ctx in CONTEXTS:
                got = fused.identity_ids(event, ctx.options)
                assert repr(got) == repr(plain.identity_ids(event, ctx.options)), (event, ctx)
            assert repr(fused.identity_link(event)) == repr(plain.identity_link(event)), event


def test_every_emitted_node_kind_gives_what_its_closure_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, plain = _both(monkeypatch, write(tmp_path / "all.yaml", ALL_NODES))
    assert isinstance(fused, YamlMapping) and isinstance(plain, YamlMapping)
    [(rule, _)] = fused._rule_guards
    assert fuse.is_fused(rule.body), "the rule body was not fused"
    [(plain_rule, _)] = plain._rule_guards
    assert not fuse.is_fused(plain_rule.body)
    expected = plain.apply(TEMPLATE_EVENT, CONTEXTS[1])
    assert isinstance(expected, list) and expected[0].body["properties"]["last_tag"] == "blue"  # the file is live
    _same_everywhere(fused, plain, odd_events(TEMPLATE_EVENT, 3000, seed=7))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_mappings_give_the_same_results_fused(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, plain = _both(monkeypatch, path)
    assert isinstance(fused, YamlMapping)
    assert all(fuse.is_fused(rule.body) for rule, _ in fused._rule_guards if rule.body is not None)
    # The top-level drops are asked in one generated function, not one each.
    assert fused._first_drop is None or fuse.is_fused(fused._first_drop)
    assert fused._identity_key is None or fuse.is_fused(fused._ids)  # identity_ids, likewise
    fixtures = sorted((ROOT / "mappings" / "tests" / path.stem).glob("*.yaml"))
    assert fixtures
    events: list[Any] = []
    for i, fixture in enumerate(fixtures):
        base = yaml.safe_load(fixture.read_text())["input"]
        events += odd_events(base, 60, seed=i) if isinstance(base, dict) else [base]
    _same_everywhere(fused, plain, events)


def test_a_step_that_fails_the_event_fails_it_fused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps stay closures inside fused code: their drop and fail policies still apply."""
    text = track_rule("""
        userId: {path: $.userId, pipe: [{to: integer, on_error: fail}]}
        event: {path: $.event, pipe: [{to: number, on_error: drop_event}]}
    """)
    fused, plain = _both(monkeypatch, write(tmp_path / "steps.yaml", text))
    for event in ({"userId": "12", "event": "3"}, {"userId": "x", "event": "3"}, {"userId": "1", "event": "y"}):
        assert fused.apply(event, MapContext()) == plain.apply(event, MapContext())
    assert type(fused.apply({"userId": "x", "event": "3"}, MapContext())).__name__ == "Failed"
    assert type(fused.apply({"userId": "1", "event": "y"}, MapContext())).__name__ == "Discarded"


def test_deep_nesting_falls_back_to_closures_and_still_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python refuses source nested about 100 levels deep: nodes past fuse.MAX_DEPTH are
    called, not inlined, so a deeply nested expression is still fused, and still agrees."""
    cap = 4
    monkeypatch.setattr(fuse, "MAX_DEPTH", cap)
    expr = "$.v"
    for i in range(20):
        expr = f"{{first: [$.a{i}, {expr}]}}"
    text = f"""
    source_format: segment
    destination_kind: segment
    rules:
      - name: t
        kind: track
        body: {{userId: u, event: {expr}}}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "deep.yaml", text))
    assert isinstance(fused, YamlMapping)
    body = fused._rule_guards[0][0].body
    assert fuse.is_fused(body)
    source = str(body.__doc__)
    deepest = max(len(line) - len(line.lstrip(" ")) for line in source.splitlines()) // 4
    assert deepest <= cap + 2, source  # the inner firsts are calls, not inlined
    for event in ({"v": "deep"}, {"a0": "outer"}, {"a19": "inner", "v": "x"}, {}):
        assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext()))


def test_lets_are_inlined_once_per_function_and_still_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A let's statements are written into the first fused function that reads it, once;
    later reads on the same path take the local the first read left (no second look-up)."""
    text = """
    source_format: segment
    destination_kind: segment
    let:
      uid: {path: $.userId, pipe: [{to: integer, on_error: fail}]}
      label: {path: $let.uid, pipe: [{to: string}]}
    rules:
      - name: t
        kind: track
        body:
          userId: $let.label
          event: $let.label
          properties: {object: {again: $let.uid}}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "lets.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    # label: read once, its second read takes the local. uid: first read inside label's
    # block, so the read after it looks it up again, and calls the fused let.
    for name, calls in (("label", 0), ("uid", 1)):
        inline = re.findall(rf"L\['{name}'\] = v\d+$", source, re.MULTILINE)
        called = re.findall(rf"L\['{name}'\] = b\d+\(env\)$", source, re.MULTILINE)
        assert (len(inline), len(called)) == (1, calls), source
        assert len(re.findall(rf"if '{name}' in L:", source)) == 1 + calls, source
    for event in ({"userId": "12"}, {"userId": 7}, {"userId": "x"}, {}):
        assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext()))
    assert type(fused.apply({"userId": "x"}, MapContext())).__name__ == "Failed"
    [out] = fused.apply({"userId": "12"}, MapContext())  # type: ignore[misc]
    assert out.body == {"type": "track", "userId": "12", "event": "12", "properties": {"again": 12}}


def test_a_let_read_in_a_branch_is_read_again_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A let first read inside an `if` branch was read only on that path: a read after the
    `if` (or in its `else`) looks it up again, and a read inside the same branch does not."""
    text = """
    source_format: segment
    destination_kind: segment
    let:
      uid: {path: $.userId, pipe: [{to: string}]}
    rules:
      - name: t
        kind: track
        body:
          event: {if: {exists: $.flag}, then: $let.uid, else: {first: [$let.uid, none]}}
          properties: {object: {same: {if: {exists: $.flag}, then: {first: [$let.uid, $let.uid]}}}}
          userId: $let.uid
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "branch.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    # The `then` and the `else` of the first `if`, the second `if`'s branch, the last read.
    assert len(re.findall(r"if 'uid' in L:", source)) == 4, source
    for event in ({"userId": "u1"}, {"userId": "u1", "flag": 1}, {"userId": 5, "flag": True}, {}):
        assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext())), event
    [out] = fused.apply({"userId": "u1"}, MapContext())  # type: ignore[misc]
    assert out.body == {"type": "track", "event": "u1", "properties": {}, "userId": "u1"}


def test_not_after_inlined_gives_what_the_step_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused code inlines `not_after: now` for whole seconds not ahead of the clock and calls
    the step for the rest: both give the same for every kind of value."""
    text = """
    source_format: segment
    destination_kind: segment
    rules:
      - name: t
        kind: track
        body:
          event: E
          userId: $.userId
          properties: {object: {at: {path: $.t, pipe: [{not_after: now}]}}}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "cap.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    assert "type(" in source and "() else b" in source, source  # the inline test, then the call
    now = time.time()
    for t in (1_700_000_000, 1_700_000_000.5, 1_700_000_000_000, -5, "2099-01-01T00:00:00Z", True, None):
        event = {"type": "track", "userId": "u", "t": t}
        assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext())), t
    for ahead, unit in ((int(now) + 86_400, 1), (int(now * 1000) + 86_400_000, 1000)):
        [out] = fused.apply({"type": "track", "userId": "u", "t": ahead}, MapContext())  # type: ignore[misc]
        capped = out.body["properties"]["at"]
        assert type(capped) is int and now * unit - unit <= capped <= time.time() * unit, (ahead, capped)


def test_a_let_too_deep_to_inline_is_called_and_the_body_still_fuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inlined, this let's `first` of 96 paths would nest past Python's limit on nesting
    where the body reads it: the body is generated again with the let called."""
    paths = ", ".join(f"$.a{i}" for i in range(96))
    text = f"""
    source_format: segment
    destination_kind: segment
    let:
      x: {{first: [{paths}]}}
    rules:
      - name: t
        kind: track
        body:
          userId: u
          event:
            if: {{exists: $.go}}
            then: {{if: {{exists: $.go}}, then: {{object: {{a: {{object: {{b: $let.x}}}}}}}}}}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "deep-let.yaml", text))
    assert isinstance(fused, YamlMapping)
    body = fused._rule_guards[0][0].body
    assert fuse.is_fused(body)
    assert re.search(r"L\['x'\] = b\d+\(env\)$", str(body.__doc__), re.MULTILINE), "the let is called"
    for event in ({"go": 1, "a95": "last"}, {"go": 1, "a0": "first"}, {"go": 1}, {"a3": "no go"}):
        assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext()))


def _outcome(fn: Any, env: Env) -> str:
    try:
        return repr(fn(env))
    except Exception as exc:  # the closures' own verdict, whatever it is
        return f"raised {type(exc).__name__}"


def test_a_fused_function_given_an_event_that_is_no_object_runs_the_closures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fused code reads the event's first key without checking its type (every caller maps
    # a JSON object); anything else must still get exactly what the closures give.
    fused, plain = _both(monkeypatch, write(tmp_path / "all.yaml", ALL_NODES))
    assert isinstance(fused, YamlMapping) and isinstance(plain, YamlMapping)
    [(rule, _)] = fused._rule_guards
    [(plain_rule, _)] = plain._rule_guards
    assert rule.body is not None and plain_rule.body is not None
    assert "if type(e) is not dict: return" in str(rule.body.__doc__)
    for event in ([], ["userId"], "text", None, 5, TEMPLATE_EVENT):
        assert _outcome(rule.body, Env(event, "linked-1", {}, "web")) == _outcome(
            plain_rule.body, Env(event, "linked-1", {}, "web")
        ), event


PREFIXES = track_rule("""
    userId: {first: [$.context.device.id, $.context.device.advertisingId, $.userId]}
    event: {first: [$.context.page.title, $.event]}
    properties:
      object:
        model: $.context.device.model
        zone: {path: $.context.timezone, drop_if: empty}
        first_item: "$.context.items[0].sku"
        plan: $.traits.plan
""")


def test_event_prefixes_read_more_than_once_are_read_once_and_still_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused, plain = _both(monkeypatch, write(tmp_path / "prefixes.yaml", PREFIXES))
    assert isinstance(fused, YamlMapping)
    [(rule, _)] = fused._rule_guards
    source = str(rule.body.__doc__)
    # `context` (six paths) and `context.device` (three) are read once each, at the start;
    # `context.page` and `traits` (one path each) where they are used.
    assert source.count("'context'") == 1 and source.count("'device'") == 1, source
    assert "h0 = e.get('context', M)" in source and "h1 = d0.get('device', M)" in source, source
    # Their keys are read from a view tested once for being a dict (Gen.hoisted_keys).
    assert "d0 = h0 if type(h0) is dict else NO_KEYS" in source and "d1.get('id', M)" in source, source
    assert "type(h0) is dict else M" not in source and "type(h1) is dict else M" not in source, source
    assert source.count("'page'") == 1 and "h2" not in source, source
    base = {
        "type": "track",
        "userId": "u-1",
        "event": "Clicked",
        "traits": {"plan": "pro"},
        "context": {
            "device": {"id": "", "advertisingId": "ad-1", "model": "m"},
            "page": {"title": "Home"},
            "timezone": "UTC",
            "items": [{"sku": "a"}],
        },
    }
    expected = plain.apply(base, MapContext())
    assert isinstance(expected, list) and expected[0].body["userId"] == "ad-1"  # "" is empty
    _same_everywhere(fused, plain, odd_events(base, 2000, seed=11))


@pytest.mark.parametrize("flag", [True, False])
def test_equals_a_boolean_holds_for_that_boolean_only(
    flag: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inlined as `is`: 1, 0, 1.0, "true" or a missing value never equal a boolean (JSON
    types differ), fused or not."""
    hit = f"{{if: {{value: $.properties.x, equals: {str(flag).lower()}}}, then: y}}"
    rule = track_rule(f"event: e\nuserId: u\nproperties: {{object: {{hit: {hit}}}}}")
    fused, plain = _both(monkeypatch, write(tmp_path / "eq.yaml", rule))
    for value in (*ODD_VALUES, 0.0, 1.0, "true", "false", _DELETE):
        props = {} if value is _DELETE else {"x": value}
        event = {"type": "track", "userId": "u", "event": "E", "properties": props}
        want = {"hit": "y"} if type(value) is bool and value is flag else {}
        for mapping in (fused, plain):
            result = mapping.apply(event, MapContext())
            assert isinstance(result, list) and result[0].body["properties"] == want, (value, result)


@pytest.mark.parametrize("value", (*ODD_VALUES, MISSING))
def test_the_inline_empty_test_is_is_empty(value: Any) -> None:
    gen = fuse.Gen()
    code = f"def check(v):\n    return {gen.empty('v')}\n"
    namespace = dict(gen.bound)
    exec(code, namespace)
    assert namespace["check"](value) is is_empty(value)


def test_fresh_containers_and_constants_are_stored_without_a_test_for_missing() -> None:
    """An object or list stores a value only when it is not M; a container the body has
    just made, or a constant (the rule's kind), never is, so it is stored untested. What
    is read from the event is still tested (the differential tests above check results)."""
    mapping = load_mapping_file(ROOT / "mappings" / "segment-to-moengage.yaml")
    assert isinstance(mapping, YamlMapping)
    track = next(rule for rule, _ in mapping._rule_guards if rule.name == "track")
    source = str(track.body.__doc__)
    made = set(re.findall(r"^\s*(v\d+) = (?:\{\}|\[\])$", source, re.M))
    assert len(made) == 3, source  # the body, its actions list and the action
    tested = set(re.findall(r"if (\w+) is not M: \w+(?:\[|\.append)", source))
    assert not made & tested and not any(name.startswith("b") for name in tested), source
    assert len(tested) >= 5, source  # customer_id, device_id, the action's fields from the event


REREADS = """
source_format: segment
destination_kind: segment
let:
  tid: {if: {all: [{match: {type: identify}}, {value: $.traits.id, is: [string, number]}]}, then: $.traits.id}
rules:
  - name: t
    kind: track
    body:
      userId: {first: [$let.tid, $.userId]}
      event: {if: {exists: $.properties.a}, then: {path: $.properties.a, pipe: [{to: string}]}, else: $.event}
      properties:
        object:
          again: $.properties.a
          inner: $.properties.a.b
          twice: {first: [$.properties.c, $.properties.c]}
          branch_only: {if: {exists: $.flag}, then: $.properties.d}
          after_branch: $.properties.d
          whole: $.properties
        rest: {from: $.properties, omit: [secret]}
"""


def test_a_path_read_on_every_way_to_a_read_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event never changes while it is mapped: a path read before, on every way the code
    can come to a read of it (the same block, or one around it), is taken from the local
    the first read left; a read only one branch made is made again after the branch."""
    fused, plain = _both(monkeypatch, write(tmp_path / "rereads.yaml", REREADS))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    # `properties.a`: the `if` tests it, its `then` and the field after it take the local;
    # `properties.a.b` goes on from it. `properties.c`: the `first`'s second try is the
    # local. `properties.d`: read in the `then`, read again after it.
    assert len(re.findall(r"\.get\('a', M\)", source)) == 1, source
    assert len(re.findall(r"\.get\('c', M\)", source)) == 1, source
    assert len(re.findall(r"\.get\('d', M\)", source)) == 2, source
    assert re.search(r"(v\d+) = v\d+\.get\('b', M\) if type\(v\d+\) is dict else M", source), source
    # traits.id: tested inside the `all`, given in the `if`'s then: another block, read again.
    assert len(re.findall(r"\.get\('id', M\)", source)) == 2, source
    base = {
        "type": "identify",
        "userId": "u-1",
        "event": "E",
        "flag": True,
        "traits": {"id": "t-1"},
        "properties": {"a": {"b": 1}, "c": "", "d": "dee", "secret": "s", "e": [1]},
    }
    expected = plain.apply(base, MapContext())
    assert isinstance(expected, list) and expected[0].body["properties"]["inner"] == 1  # the file is live
    _same_everywhere(fused, plain, odd_events(base, 2000, seed=5))


def test_only_functions_that_read_lets_take_the_lets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
    source_format: segment
    destination_kind: segment
    let:
      uid: {path: $.userId, pipe: [{to: string}]}
    rules:
      - name: t
        kind: track
        when: {value: $.event, prefix: Cli}
        body: {userId: $let.uid, event: $.event}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "cache.yaml", text))
    assert isinstance(fused, YamlMapping)
    [(rule, _)] = fused._rule_guards
    assert fuse.is_fused(rule.when) and "env.lets" not in str(rule.when.__doc__), rule.when.__doc__
    assert "L = env.lets" in str(rule.body.__doc__)
    base = {"type": "track", "userId": 7, "event": "Clicked"}
    _same_everywhere(fused, plain, odd_events(base, 300, seed=3))


def test_tz_offset_inlined_gives_what_the_step_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused code takes an hour's memoised offset inline (steps._HOUR_OFFSETS) and hands the
    rest to the step with the instant it read: both give the same for every kind of value."""
    text = """
    source_format: segment
    destination_kind: segment
    let:
      at: {first: [$.timestamp], pipe: [{to: epoch_seconds}]}
    rules:
      - name: t
        kind: track
        body:
          event: E
          userId: u
          properties:
            object:
              offset: {path: $.zone, pipe: [{tz_offset: $let.at}]}
              strict: {path: $.zone, pipe: [{tz_offset: $.when, on_error: fail}]}
              now: {path: $.zone, pipe: [tz_offset]}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "tz.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    assert source.count(" // 3600))) is int else b") == 2, source  # the two with an instant
    zones = ("Europe/Lisbon", "America/New_York", "Asia/Kolkata", "UTC", "No/Such_Zone", "", 5, None, ["UTC"])
    instants = (
        "2024-03-31T00:30:00Z",  # Lisbon's clocks go forward at 01:00 UTC: an hour not memoised
        "2024-03-31T01:00:00Z",
        "2024-11-03T06:30:00Z",
        "2024-07-01T12:00:00+05:30",
        1_700_000_000,
        1_700_000_000_000,  # milliseconds
        -99_999_999_999,
        1.5,
        "yesterday",
        None,
        True,
    )
    for _ in range(2):  # the first round fills the memo, the second reads it inline
        for zone in zones:
            for at in instants:
                event = {"type": "track", "zone": zone, "timestamp": at, "when": at}
                for ctx in CONTEXTS:
                    assert repr(fused.apply(event, ctx)) == repr(plain.apply(event, ctx)), event
    [out] = fused.apply({"type": "track", "zone": "Asia/Kolkata", "when": 1_700_000_000}, MapContext())  # type: ignore[misc]
    assert out.body["properties"]["strict"] == 19_800
    assert type(fused.apply({"type": "track", "zone": 5, "when": 0}, MapContext())).__name__ == "Failed"


def test_drops_are_asked_nested_then_flat_and_still_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first few drops are asked each in the `else` of the one before (a let the first
    read is known to the next); past compiler.NESTED_DROPS, flat, under one `if` each."""
    from bridge.mapping.compiler import NESTED_DROPS

    count = NESTED_DROPS + 3
    drops = "\n".join(
        f"  - when: {{value: {{path: $let.uid, pipe: [trim]}}, equals: d{i}}}\n    reason: r{i}" for i in range(count)
    )
    text = f"""
source_format: segment
destination_kind: segment
let:
  uid: {{path: $.userId, pipe: [{{to: string}}]}}
drop:
{drops}
rules:
  - name: t
    kind: track
    body: {{userId: $let.uid, event: E}}
"""
    fused, plain = _both(monkeypatch, write(tmp_path / "drops.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._first_drop.__doc__) if fused._first_drop is not None else ""
    assert fuse.is_fused(fused._first_drop), source
    # Four drops in the `else` of the one before, the fifth in a flat `if`, the sixth in
    # its `else`; the let, read before the first `if`, is looked up once.
    assert len(re.findall(r": v0 = \d+\n\s+else:", source)) == NESTED_DROPS + 1, source
    assert source.count("if v0 < 0:") == 1 and source.count("'uid' in L") == 1, source
    for i in range(count + 1):
        for uid in (f"d{i}", f" d{i} ", i, None):
            event = {"type": "track", "userId": uid}
            assert repr(fused.apply(event, MapContext())) == repr(plain.apply(event, MapContext())), event
    assert fused.apply({"type": "track", "userId": f" d{count - 1}"}, MapContext()) == Discarded(f"r{count - 1}")


def test_a_prefix_only_one_let_reads_is_not_read_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads inside one inlined let count once for hoisting: the drops compute the let, so
    the copy in the rule body never runs, and reading its prefix first would read it for
    every event. Prefixes that several lets read (`context`) are still read first."""
    text = """
    source_format: segment
    destination_kind: segment
    let:
      cid: {first: [{if: {value: $.traits.id, is: [string]}, then: $.traits.id}, $.userId]}
      device: {first: [$.context.device.id]}
      zone: {first: [$.context.timezone]}
    drop:
      - when: {empty: $let.cid}
        reason: anonymous
    rules:
      - name: t
        kind: track
        body: {userId: $let.cid, event: E, properties: {object: {d: $let.device, z: $let.zone}}}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "scopes.yaml", text))
    assert isinstance(fused, YamlMapping)
    for fn in (fused._first_drop, fused._rule_guards[0][0].body):
        source = str(fn.__doc__)
        assert "= e.get('traits', M)" in source and "h0 = e.get('traits'" not in source, source
    body = str(fused._rule_guards[0][0].body.__doc__)
    assert "h0 = e.get('context', M)" in body, body
    base = {
        "type": "track",
        "userId": "u",
        "traits": {"id": "t"},
        "context": {"device": {"id": "d"}, "timezone": "UTC"},
    }
    _same_everywhere(fused, plain, odd_events(base, 500, seed=9))


def test_the_shipped_mapping_fused_agrees_on_the_bench_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery benchmark's events (identify, track and page, as the bridge stores
    them), and variants of them, map the same fused and not."""
    import orjson

    from bench.payloads import batch_workload
    from bridge.sources.segment.spec import normalise

    fused, plain = _both(monkeypatch, ROOT / "mappings" / "segment-to-moengage.yaml")
    workload = batch_workload("key")
    events: list[Any] = []
    for _ in range(4):
        for item in orjson.loads(workload.next_request()[1])["batch"]:
            stored = normalise(item, call_type=None, received_at=datetime(2026, 1, 1, tzinfo=UTC))[0]
            events.append(orjson.loads(orjson.dumps(stored)))
    assert {e["type"] for e in events} == {"identify", "track", "page"}
    _same_everywhere(fused, plain, events)
    for i, base in enumerate(events[:30]):
        _same_everywhere(fused, plain, odd_events(base, 40, seed=i))


def test_conversions_called_in_place_give_what_the_step_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused code calls a conversion in place and hands a value it refuses to the step,
    whose policy (drop the field, drop or fail the event) decides, with its own detail."""
    targets = ("number", "integer", "boolean", "iso8601", "epoch_seconds", "epoch_millis")
    policies = ("drop_field", "drop_event", "fail")
    # Alternate targets ask fail before drop_event, so some values fail the event and
    # others drop it.
    fields = "\n".join(
        f"              {t}_{p}: {{path: $.v, pipe: [{{to: {t}, on_error: {p}}}]}}"
        for i, t in enumerate(targets)
        for p in (policies if i % 2 else policies[::-1])
    )
    text = f"""
    source_format: segment
    destination_kind: segment
    rules:
      - name: t
        kind: track
        body:
          event: E
          userId: u
          properties:
            object:
{fields}
    """
    fused, plain = _both(monkeypatch, write(tmp_path / "to.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    assert source.count("try:") == len(targets) * len(policies), source
    values = (*ODD_VALUES, "12", " 7 ", "1e3", "2024-02-29T12:00:00.5+01:00", 1_700_000_000_000, -1, "yes", "x", 2**70)
    verdicts = set()
    for v in values:
        event = {"type": "track", "v": v}
        got = fused.apply(event, MapContext())
        assert repr(got) == repr(plain.apply(event, MapContext())), v
        verdicts.add(type(got).__name__)
    assert verdicts == {"list", "Discarded", "Failed"}  # every policy was asked


def test_a_field_that_is_a_first_is_set_where_its_value_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = track_rule("""
        userId: {first: [$.userId, $.anonymousId]}
        event: E
        properties:
          object:
            title: {first: [$.properties.title, $.context.page.title, {literal: untitled}]}
            name: {first: [$.properties.name]}
            piped: {first: [$.properties.name], pipe: [trim]}
    """)
    fused, plain = _both(monkeypatch, write(tmp_path / "first.yaml", text))
    assert isinstance(fused, YamlMapping)
    source = str(fused._rule_guards[0][0].body.__doc__)
    # Set in each branch that finds it; never through a local tested for M afterwards.
    assert len(re.findall(r"^\s+v\d+\['title'\] = ", source, re.M)) == 3, source
    assert len(re.findall(r"^\s+v\d+\['userId'\] = ", source, re.M)) == 2, source
    assert not re.search(r"is not M: v\d+\['(title|name|userId)'\]", source), source
    assert re.search(r"is not M: v\d+\['piped'\]", source), source  # a pipe after it: a value
    base = {
        "type": "track",
        "userId": "u",
        "anonymousId": "a",
        "properties": {"title": "T", "name": " n "},
        "context": {"page": {"title": "P"}},
    }
    _same_everywhere(fused, plain, odd_events(base, 600, seed=13))


@pytest.mark.parametrize("renames", ["", ", rename_prefix: {moe_: seg_moe_}"])
def test_a_rest_that_leaves_out_keys_read_elsewhere_keeps_the_others_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames: str
) -> None:
    """A passed object none of whose keys is renamed is copied without the keys the object
    reads itself or omits, the others in the order they came, fused or not."""
    text = track_rule(f"""
        userId: u
        event: E
        properties:
          object:
            email: $.properties.email
            gone: $.properties.absent
          rest: {{from: $.properties, omit: [id, _id]{renames}}}
    """)
    fused, plain = _both(monkeypatch, write(tmp_path / "rest.yaml", text))
    props = {"plan": "pro", "id": 7, "email": "e@x", "age": 3, "_id": 1, "nested": {"email": "kept"}, "z": None}
    for mapping in (fused, plain):
        [out] = mapping.apply({"type": "track", "properties": props}, MapContext())  # type: ignore[misc]
        assert list(out.body["properties"].items()) == [
            ("plan", "pro"),
            ("age", 3),
            ("nested", {"email": "kept"}),
            ("z", None),
            ("email", "e@x"),
        ]
    assert list(props) == ["plan", "id", "email", "age", "_id", "nested", "z"]  # the event is untouched
