"""Every directive, evaluated through a real compiled mapping."""

import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bridge.mapping import Discarded, Failed, MapContext, MappingError

from .helpers import evaluate, value_mapping, write

EVENT = {
    "type": "track",
    "userId": "u1",
    "anonymousId": "a1",
    "event": "Order Completed",
    "timestamp": "2024-07-04T12:00:00Z",
    "properties": {
        "total": "42.50",
        "count": "3",
        "flag": "yes",
        "name": "  Ada  ",
        "tags": ["a", "b"],
        "nested": {"x": {"y": 1}, "arr": [1, 2]},
        "empty": "",
        "nothing": None,
        "items": [{"sku": "s1", "qty": 1}, {"sku": "s2", "qty": 2}],
        "a b": "spaced",
    },
    "traits": {"first_name": "Ada", "last_name": "Lovelace"},
    "context": {"timezone": "Europe/Berlin", "os": {"name": "iOS"}},
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("$.properties.total", "42.50"),
        ("{path: properties.total}", "42.50"),
        ("{path: \"$.properties['a b']\"}", "spaced"),
        ("$.properties.items[1].sku", "s2"),
        ("$.properties.items[-1].qty", 2),
        ("$.properties.missing", "<absent>"),
        ("$.properties.nothing", None),
        ("{first: [$.properties.empty, $.properties.nothing, $.properties.missing, $.userId]}", "u1"),
        ("{first: [$.properties.empty, $.properties.missing]}", "<absent>"),
        ("plain text", "plain text"),
        ("42", 42),
        ('{literal: "$.not.a.path"}', "$.not.a.path"),
        ("{literal: {a: [1, 2]}}", {"a": [1, 2]}),
        ("'{{traits.first_name}} {{traits.last_name}}'", "Ada Lovelace"),
        ("{template: 'n={{properties.count}} x={{properties.missing}}!'}", "n=3 x=!"),
        ("[$.userId, $.properties.missing, 7]", ["u1", 7]),
    ],
)
def test_values(tmp_path, expr, expected):
    assert evaluate(value_mapping(tmp_path, expr), EVENT) == expected


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ("{exists: $.userId}", True),
        ("{exists: $.properties.nothing}", False),
        ("{empty: $.properties.empty}", True),
        ("{empty: $.userId}", False),
        ("{value: $.event, equals: Order Completed}", True),
        ("{value: $.event, equals: order completed}", False),
        ("{value: $.event, equals: order completed, ignore_case: true}", True),
        ("{value: $.event, not_equals: Other}", True),
        ("{value: $.event, in: [A, Order Completed]}", True),
        ("{value: $.event, not_in: [A, B]}", True),
        ("{value: $.event, prefix: Order}", True),
        ("{value: $.event, suffix: Completed}", True),
        ("{value: $.event, contains: der Co}", True),
        ("{value: $.properties.tags, contains: b}", True),
        ("{value: '$.properties.items[1].qty', gt: 1}", True),
        ("{value: '$.properties.items[1].qty', gte: 3}", False),
        ("{value: '$.properties.items[1].qty', lt: 3}", True),
        ("{value: '$.properties.items[1].qty', lte: 1}", False),
        ("{value: $.properties.count, gt: 1}", False),  # a numeric string is not a number
        ("{value: {path: $.properties.count, pipe: [{to: integer}]}, gt: 1}", True),
        ("{all: [{exists: $.userId}, {value: $.type, equals: track}]}", True),
        ("{all: [{exists: $.userId}, {value: $.type, equals: page}]}", False),
        ("{any: [{value: $.type, equals: page}, {value: $.type, equals: track}]}", True),
        ("{not: {exists: $.userId}}", False),
        ("{match: {type: track, event: [X, Order Completed]}}", True),
        ("{match: {type: page}}", False),
        ("{value: true, equals: 1}", False),  # booleans are not numbers
        # equals another value of the event: a $ path or an expression
        ("{value: $.userId, equals: $.userId}", True),
        ("{value: $.userId, equals: $.anonymousId}", False),
        ("{value: $.userId, not_equals: $.anonymousId}", True),
        ("{value: $.traits.first_name, equals: {path: $.properties.name, pipe: [trim]}}", True),
        ("{value: ADA, equals: $.traits.first_name, ignore_case: true}", True),
        ("{value: 3, equals: $.properties.count}", False),  # types never mix: "3" is not 3
        ("{value: {path: $.properties.count, pipe: [{to: integer}]}, equals: 3}", True),
        ("{value: $.nope, equals: $.also_nope}", False),  # absent never equals absent
        ("{value: $.nope, not_equals: $.also_nope}", True),
        ("{value: $.properties.nothing, equals: $.properties.nothing}", False),  # nor null null
        ("{value: $.properties.tags, equals: $.properties.tags}", False),  # lists are not compared
        ("{value: $.event, equals: {literal: $.event}}", False),  # a literal "$..." string
        ("{match: {event: $.event}}", False),  # match compares with the values as written
        ("true", True),
    ],
)
def test_conditions(tmp_path, cond, expected):
    m = value_mapping(tmp_path, f"{{if: {cond}, then: Y, else: N}}")
    assert evaluate(m, EVENT) == ("Y" if expected else "N")


def test_if_without_else_leaves_field_out(tmp_path):
    m = value_mapping(tmp_path, "{if: {exists: $.nope}, then: x}")
    assert evaluate(m, EVENT) == "<absent>"


def test_cases_first_match_wins(tmp_path):
    m = value_mapping(
        tmp_path,
        """
        cases:
          - {when: {value: $.event, prefix: Product}, then: product}
          - {when: {value: $.event, prefix: Order}, then: order}
          - {when: {value: $.event, prefix: O}, then: other-o}
        else: none
        """,
    )
    assert evaluate(m, EVENT) == "order"
    assert evaluate(m, {**EVENT, "event": "Zzz"}) == "none"


@pytest.mark.parametrize(
    ("steps", "source", "expected"),
    [
        ("[trim]", "$.properties.name", "Ada"),
        ("[trim, {case: upper}]", "$.properties.name", "ADA"),
        ("[{case: lower}]", "$.event", "order completed"),
        ("[{case: title}]", "{literal: hello world}", "Hello World"),
        ("[{replace: ' ', with: _}]", "$.event", "Order_Completed"),
        ("[{replace: ORDER, with: Cart, ignore_case: true}]", "$.event", "Cart Completed"),
        ("[{lookup: {Order Completed: purchase}}]", "$.event", "purchase"),
        ("[{lookup: {X: y}}]", "$.event", "<absent>"),
        ("[{lookup: {X: y}, keep_unmatched: true}]", "$.event", "Order Completed"),
        ("[{lookup: {X: y}, default: other}]", "$.event", "other"),
        ("[{to: number}]", "$.properties.total", 42.5),
        ("[{to: integer}]", "$.properties.count", 3),
        ("[{to: boolean}]", "$.properties.flag", True),
        ("[{to: string}]", "'$.properties.items[0].qty'", "1"),
        ("[{to: string}]", "{literal: true}", "true"),
        ("[{to: string}]", "$.properties.nested.x", '{"y":1}'),
        ("[{to: iso8601}]", "{literal: 1580967474}", "2020-02-06T05:37:54.000Z"),
        ("[{to: iso8601}]", "{literal: 1580967474123}", "2020-02-06T05:37:54.123Z"),
        ("[{to: iso8601}]", "{literal: '2020-02-06T11:07:54+05:30'}", "2020-02-06T05:37:54.000Z"),
        ("[{to: epoch_seconds}]", "$.timestamp", 1720094400),
        ("[{to: epoch_millis}]", "{literal: '2024-07-04T12:00:00.250Z'}", 1720094400250),
        ("[{to: epoch_seconds}]", "{literal: '1720094400000'}", 1720094400),
        ("[{to: integer}]", "{literal: 'abc'}", "<absent>"),
        ("[{to: integer, on_error: drop_field}]", "{literal: 2.5}", "<absent>"),
        ("[{tz_offset: $.timestamp}]", "$.context.timezone", 7200),
        ("[{tz_offset: '2024-01-04T12:00:00Z'}]", "$.context.timezone", 3600),
        ("[{tz_offset: $.timestamp}]", "{literal: Mars/Olympus}", "<absent>"),
        ("[flatten]", "$.properties.nested", {"x.y": 1, "arr.0": 1, "arr.1": 2}),
        ("[{flatten: true, separator: _, arrays: false}]", "$.properties.nested", {"x_y": 1, "arr": [1, 2]}),
        ("[{pick: [total, count, absent]}]", "$.properties", {"total": "42.50", "count": "3"}),
        (
            "[{omit: [items, nested, tags, name, a b]}]",
            "$.properties",
            {"total": "42.50", "count": "3", "flag": "yes", "empty": "", "nothing": None},
        ),
        ("[{rename: {first_name: given}}, {pick: [given]}]", "$.traits", {"given": "Ada"}),
        (
            "[compact, {omit: [items, nested, tags, a b]}]",
            "$.properties",
            {"total": "42.50", "count": "3", "flag": "yes", "name": "  Ada  "},
        ),
        ("[{json: encode}]", "$.properties.tags", '["a","b"]'),
        ("[{json: decode}]", "{literal: '{\"a\": 1}'}", {"a": 1}),
        ("[length]", "$.properties.tags", 2),
        ("[{split: ' '}]", "$.event", ["Order", "Completed"]),
        ("[{join: '|'}]", "$.properties.tags", "a|b"),
        (
            "[{each: {object: {id: $item.sku, n: {path: $item.qty, pipe: [{to: string}]}}}}]",
            "$.properties.items",
            [{"id": "s1", "n": "1"}, {"id": "s2", "n": "2"}],
        ),
        ("[{each: $item.sku}]", "$.properties.items", ["s1", "s2"]),
    ],
)
def test_pipe_steps(tmp_path, steps, source, expected):
    m = value_mapping(tmp_path, "{head: 1}".replace("head: 1", f"first: [{source}], pipe: {steps}"))
    assert evaluate(m, EVENT) == expected


def test_tz_offset_true_means_now(tmp_path):
    m = value_mapping(tmp_path, "{path: $.context.timezone, pipe: [tz_offset]}")
    offset = datetime.now(UTC).astimezone(ZoneInfo("Europe/Berlin")).utcoffset()
    assert offset is not None
    assert evaluate(m, EVENT) == int(offset.total_seconds())


@pytest.mark.parametrize(
    ("at", "offset"), [('"2024-07-01T00:00:00Z"', 7200), ('"2024-01-01"', 3600), ("1719792000", 7200)]
)
def test_tz_offset_at_a_literal_time_takes_that_times_offset(tmp_path: Path, at: str, offset: int) -> None:
    """A literal that reads as a time is an instant like any other; only one that does not
    (`false`, `now`) is refused at load (test_diagnostics)."""
    m = value_mapping(tmp_path, f"{{path: $.context.timezone, pipe: [{{tz_offset: {at}}}]}}")
    assert evaluate(m, EVENT) == offset


def test_not_after_now_caps_a_later_time_at_now_and_leaves_the_rest(tmp_path):
    m = value_mapping(tmp_path, "{path: $.properties.t, pipe: [{not_after: now}]}")

    def capped(t: object) -> object:
        return evaluate(m, {**EVENT, "properties": {"t": t}})

    # A later time becomes now, in its own unit and type (a number >= 1e11 is milliseconds).
    before = time.time()
    seconds, fraction, millis = capped(int(before) + 3600), capped(before + 3600.5), capped(int(before + 3600) * 1000)
    after = time.time()
    assert type(seconds) is int and int(before) <= seconds <= after
    assert type(fraction) is float and before <= fraction <= after
    assert type(millis) is int and int(before * 1000) <= millis <= after * 1000
    # Now and earlier are unchanged, as is every value that is no epoch number.
    for t in (1720094400, 1720094400.25, 1720094400250, -5, 0, "2999-01-01T00:00:00Z", True, {"t": 1}, [1]):
        assert capped(t) == t and type(capped(t)) is type(t)
    assert capped(None) is None
    assert evaluate(m, EVENT) == "<absent>"


def test_on_error_drop_event_and_fail(tmp_path):
    m = value_mapping(tmp_path, "{path: $.event, pipe: [{to: number, on_error: drop_event, reason: not_a_number}]}")
    result = m.apply(EVENT, MapContext())
    assert isinstance(result, Discarded)
    assert result.reason == "not_a_number"
    assert "let.v.pipe[0]" in result.detail and "'Order Completed'" in result.detail
    m = value_mapping(tmp_path, "{path: $.event, pipe: [{to: epoch_seconds, on_error: fail}]}")
    result = m.apply(EVENT, MapContext())
    assert isinstance(result, Failed)
    assert result.reason == "coercion_failed"


def test_object_rest_passes_unmapped_keys(tmp_path):
    m = value_mapping(
        tmp_path,
        """
        object:
          given: $.traits.first_name
        rest: $.traits
        """,
    )
    assert evaluate(m, EVENT) == {"given": "Ada", "last_name": "Lovelace"}
    m = value_mapping(tmp_path, "{object: {}, rest: {from: $.traits, omit: [last_name]}}")
    assert evaluate(m, EVENT) == {"first_name": "Ada"}


def test_object_rest_prefix_names_the_passed_keys_after_omit(tmp_path):
    """A group's traits pass through as group_<trait>: the company's name never lands on
    the user's own name. ``omit`` names the source's keys, before the prefix."""
    m = value_mapping(tmp_path, "{object: {given: $.traits.first_name}, rest: {from: $.traits, prefix: t_}}")
    assert evaluate(m, EVENT) == {"given": "Ada", "t_last_name": "Lovelace"}  # first_name was read: not passed
    m = value_mapping(tmp_path / "o", "{object: {}, rest: {from: $.traits, omit: [last_name], prefix: t_}}")
    assert evaluate(m, EVENT) == {"t_first_name": "Ada"}
    m = value_mapping(tmp_path / "n", "{object: {}, rest: {from: $.nothing, prefix: t_}}")
    assert evaluate(m, EVENT) == {}
    for bad in ("3", "''", "[a]"):
        with pytest.raises(MappingError) as exc:
            value_mapping(tmp_path / "bad", f"{{object: {{}}, rest: {{from: $.traits, prefix: {bad}}}}}")
        assert "rest.prefix: expected a non-empty string" in str(exc.value), str(exc.value)


def test_object_rest_rename_prefix_renames_only_keys_with_that_start(tmp_path):
    """MoEngage keeps moe_ names for itself: a passed key with a listed start gets the
    replacement instead, after ``omit`` and before ``prefix``; a key a field read is not passed."""
    event = {"type": "track", "properties": {"moe_a": 1, "moe_b": 2, "b": 3, "xmoe_c": 4}}
    spec = "{object: {moe_a: $.properties.moe_a}, rest: {from: $.properties, rename_prefix: {moe_: seg_moe_}}}"
    m = value_mapping(tmp_path, spec)
    assert evaluate(m, event) == {"moe_a": 1, "seg_moe_b": 2, "b": 3, "xmoe_c": 4}
    spec = "{object: {}, rest: {from: $.properties, omit: [b], prefix: t_, rename_prefix: {moe_: x_}}}"
    m = value_mapping(tmp_path / "p", spec)
    assert evaluate(m, event) == {"t_x_a": 1, "t_x_b": 2, "t_xmoe_c": 4}
    m = value_mapping(tmp_path / "n", "{object: {}, rest: {from: $.nothing, rename_prefix: {moe_: x_}}}")
    assert evaluate(m, event) == {}
    # Nothing to rename: the keys pass as a copy (the event is never changed); a key with a
    # NUL before moe_ takes the exact path, and is not renamed.
    m = value_mapping(tmp_path / "c", "{object: {k: 1}, rest: {from: $.properties, rename_prefix: {moe_: x_}}}")
    plain = {"type": "track", "properties": {"a": 1, "b\x00moe_c": 2}}
    assert evaluate(m, plain) == {"a": 1, "b\x00moe_c": 2, "k": 1}
    assert plain["properties"] == {"a": 1, "b\x00moe_c": 2}
    for bad in ("{moe_: ''}", "{'': x_}", "{}", "[moe_]", "{moe_: 3}"):
        with pytest.raises(MappingError) as exc:
            value_mapping(tmp_path / "bad", f"{{object: {{}}, rest: {{from: $.properties, rename_prefix: {bad}}}}}")
        assert "rest.rename_prefix" in str(exc.value), str(exc.value)


def test_merge_prefers_last_or_first(tmp_path):
    m = value_mapping(tmp_path, "{merge: [{literal: {a: 1, b: 1}}, $.traits, {object: {a: 2}}]}")
    assert evaluate(m, EVENT) == {"a": 2, "b": 1, "first_name": "Ada", "last_name": "Lovelace"}
    m = value_mapping(tmp_path, "{merge: [{object: {a: 2}}, {literal: {a: 1, b: 1}}], prefer: first}")
    assert evaluate(m, EVENT) == {"a": 2, "b": 1}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("{path: $.properties.nothing, drop_if: null}", "<absent>"),
        ("{path: $.properties.empty, drop_if: null}", ""),
        ("{path: $.properties.empty, drop_if: empty}", "<absent>"),
        ("{path: $.properties.missing, default: fallback}", "fallback"),
        ("{path: $.properties.empty, drop_if: empty, default: fallback}", "fallback"),
    ],
)
def test_drop_if_and_default(tmp_path, expr, expected):
    assert evaluate(value_mapping(tmp_path, expr), EVENT) == expected


def test_link_options_and_source(tmp_path):
    m = value_mapping(tmp_path, "{object: {link: $link, anon: $options.anonymous_ids, src: $source}}")
    ctx = MapContext(linked_id="crm-1", options={"anonymous_ids": True}, source="web")
    assert evaluate(m, EVENT, ctx) == {"link": "crm-1", "anon": True, "src": "web"}
    assert evaluate(m, EVENT) == {"src": ""}


def test_shared_lookup_file_and_set(tmp_path):
    write(tmp_path / "lookups" / "codes.yaml", "ignore_case: true\ntable: {a: Alpha}\ndefault: Unknown\n")
    write(tmp_path / "lookups" / "bad.yaml", "values: [X, y]\nignore_case: true\n")
    top = "lookups:\n  codes: {file: lookups/codes.yaml}\n  bad: {file: lookups/bad.yaml}\n"
    m = value_mapping(tmp_path, "{path: $.properties.code, pipe: [{lookup: codes}]}", top)
    assert evaluate(m, {**EVENT, "properties": {"code": "A"}}) == "Alpha"
    assert evaluate(m, {**EVENT, "properties": {"code": "b"}}) == "Unknown"
    m = value_mapping(tmp_path, "{if: {value: $.properties.code, in: bad}, then: bad, else: ok}", top)
    assert evaluate(m, {**EVENT, "properties": {"code": "Y"}}) == "bad"
    assert evaluate(m, {**EVENT, "properties": {"code": "z"}}) == "ok"


def test_version_covers_shared_lookup_files(tmp_path):
    lookup = write(tmp_path / "lookups" / "codes.yaml", "table: {a: Alpha}\n")
    top = "lookups:\n  codes: {file: lookups/codes.yaml}\n"
    v1 = value_mapping(tmp_path, "$.x", top).version
    assert v1 == value_mapping(tmp_path, "$.x", top).version
    lookup.write_text("table: {a: Beta}\n")
    assert value_mapping(tmp_path, "$.x", top).version != v1


def test_identity_also_and_the_linked_step(tmp_path: Path) -> None:
    from bridge.mapping.links import ids_to_resolve, link_context

    top = """
    identity:
      key: {path: $.userId}
      also: [{path: $.previousId}, $.groupId]
    """
    m = value_mapping(tmp_path, "{path: $.previousId, pipe: [linked]}", extra_top=top)
    event = {"type": "track", "userId": "u1", "previousId": "p1", "groupId": "u1"}
    assert m.identity_ids(event) == ["u1", "p1"]  # the key first, no repeats
    assert ids_to_resolve(m, [event, {"userId": "u2"}, "not an event"], {}) == ["p1", "u1", "u2"]
    links = {"p1": "crm-p1", "u1": "crm-u1", "other": "x"}
    ctx = link_context(m, event, links, options={}, source="web")
    # Only the event's own ids: a link another event of the batch needed is not visible here.
    assert dict(ctx.links) == {"u1": "crm-u1", "p1": "crm-p1"}
    assert evaluate(m, event, ctx) == "crm-p1"
    # $link is the identity key's link, from the same context.
    assert evaluate(value_mapping(tmp_path / "k", "$link", extra_top=top), event, ctx) == "crm-u1"
    assert evaluate(m, {**event, "previousId": "p2"}, MapContext(links={"p1": "crm-p1"})) == "p2"  # no link: as is


def test_identity_also_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as exc:
        value_mapping(tmp_path, "$.userId", extra_top="identity:\n  also: $.previousId\n")
    assert "identity.also: expected a list of ids" in str(exc.value)
