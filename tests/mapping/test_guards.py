"""Guards: a rule or identity link whose condition needs a top-level string field (e.g.
`match: {type: identify}`) is skipped on that field alone, before any Env is built.

A guard must never change a result, only skip work: every test compares with the same
mapping compiled without guards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bridge.mapping.compiler as compiler
from bridge.mapping import CompiledMapping, MapContext, load_mapping_file
from bridge.mapping.compiler import YamlMapping
from tests.mapping.helpers import write

# Not a Segment source's mapping: one refuses a rule for a type Segment has not (PAGE).
MAPPING = """
source_format: moengage_streams
destination_kind: segment
identity:
  key: $.userId
  link:
    when:
      all:
        - {match: {type: [identify, Identify]}}
        - {exists: $.traits.id}
    from: $.userId
    to: $.traits.id
rules:
  - name: exact
    match: {type: identify}
    kind: identify
    body: {userId: exact}
  - name: folded
    match: {type: PAGE}
    when: {exists: $.name}
    kind: identify
    body: {userId: folded}
  - name: either
    when:
      any:
        - {match: {type: track}}
        - {match: {type: screen}}
    kind: track
    body: {event: either, userId: u}
  - name: either-or-anything
    when:
      any:
        - {match: {type: group}}
        - {value: $.event, equals: Anything}
    kind: track
    body: {event: either-or-anything, userId: u}
  - name: nested
    match: {context.kind: alias}
    kind: track
    body: {event: nested, userId: u}
  - name: numbers
    match: {version: [1, 2]}
    kind: track
    body: {event: numbers, userId: u}
  - name: two-fields
    match: {type: alias, event: Anything}
    kind: track
    body: {event: two-fields, userId: u}
  - name: by-event
    match: {event: Other}
    kind: track
    body: {event: by-event, userId: u}
  - name: rest
    drop: unmatched
"""
# The same rule with the match folded: "page" matches too, so it can have no guard.
FOLDED = MAPPING.replace(
    "match: {type: PAGE}\n    when: {exists: $.name}", "when: {match: {type: PAGE}, ignore_case: true}"
)

TYPES: tuple[Any, ...] = ("identify", "Identify", "page", "PAGE", "track", "screen", "group", "alias", 7, None, [], {})
EVENTS: list[dict[str, Any]] = [
    {"type": t, "userId": "u1", "traits": {"id": "c1"}, "event": e, "version": v, "context": c, **named}
    for t in TYPES
    for e, v, c in (("Anything", 1, {"kind": "alias"}), ("Other", "1", {}), (None, 2, {"kind": ["alias"]}))
    for named in ({"name": "Home"}, {})
]


def _compile(tmp_path: Path, text: str, *, guards: bool, monkeypatch: pytest.MonkeyPatch) -> CompiledMapping:
    with monkeypatch.context() as m:
        if not guards:
            m.setattr(compiler, "guard_of", lambda cond: None)
        return load_mapping_file(write(tmp_path / ("g.yaml" if guards else "plain.yaml"), text))


@pytest.mark.parametrize("text", [MAPPING, FOLDED], ids=["exact", "ignore_case"])
def test_guards_never_change_a_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    guarded = _compile(tmp_path, text, guards=True, monkeypatch=monkeypatch)
    plain = _compile(tmp_path, text, guards=False, monkeypatch=monkeypatch)
    for event in EVENTS:
        assert guarded.apply(event, MapContext()) == plain.apply(event, MapContext()), event
        assert guarded.identity_link(event) == plain.identity_link(event), event


def test_guards_inferred_from_match_all_and_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _compile(tmp_path, MAPPING, guards=True, monkeypatch=monkeypatch)
    assert isinstance(m, YamlMapping)
    assert m._link_guard == ("type", frozenset({"identify", "Identify"}))
    guards = {rule.name: guard for rule, guard in m._rule_guards}
    assert guards == {
        "exact": ("type", frozenset({"identify"})),
        "folded": ("type", frozenset({"PAGE"})),
        "either": ("type", frozenset({"track", "screen"})),
        "either-or-anything": None,  # one branch needs no type
        "nested": None,  # not a top-level field
        "numbers": None,  # not strings
        "two-fields": ("type", frozenset({"alias"})),
        "by-event": ("event", frozenset({"Other"})),
        "rest": None,
    }
    folded = _compile(tmp_path, FOLDED, guards=True, monkeypatch=monkeypatch)
    assert isinstance(folded, YamlMapping)
    assert dict((r.name, g) for r, g in folded._rule_guards)["folded"] is None  # "page" matches too


def test_shipped_identity_link_is_guarded_by_type() -> None:
    m = load_mapping_file(Path(__file__).resolve().parents[2] / "mappings" / "segment-to-moengage.yaml")
    assert isinstance(m, YamlMapping)
    assert m._link_guard is not None and m._link_guard[0] == "type"
    assert m.identity_link({"type": "track", "userId": "a", "traits": {"id": "cust-b"}}) is None
    assert m.identity_link({"type": "identify", "userId": "a", "traits": {"id": "cust-b"}}) == ("a", "cust-b")


def test_rules_listed_by_type_ask_only_what_their_guard_does_not_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply tries the rules listed for the event's `type` (most guards ask it), in order;
    a lone match of strings is its guard, so its condition is not asked again. A rule
    guarded by another field, or by none, is in every list with its whole condition."""
    m = _compile(tmp_path, MAPPING, guards=True, monkeypatch=monkeypatch)
    assert isinstance(m, YamlMapping)
    assert m._dispatch_field == "type"
    asked = {value: [(r.name, when is not None) for r, when in rules] for value, rules in m._dispatch.items()}
    anywhere = [("either-or-anything", True), ("nested", True), ("numbers", True), ("by-event", True), ("rest", True)]
    assert asked["identify"] == [("exact", False), *anywhere]
    assert asked["PAGE"] == [("folded", True), *anywhere]  # match and when: the when still runs
    assert asked["track"] == [("either", True), *anywhere]  # an any of matches: not known to be exact
    assert asked["alias"] == [*anywhere[:3], ("two-fields", True), *anywhere[3:]]  # in the file's order
    assert [(r.name, when is not None) for r, when in m._dispatch_default] == anywhere
