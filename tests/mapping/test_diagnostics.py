"""Validation: precise positions, did-you-mean, unknown keys, destination shape checks."""

import pytest

from bridge.mapping import MapContext, MappingError, load_mapping_dir, load_mapping_file

from .helpers import outputs, write

HEADER = "source_format: segment\ndestination_kind: moengage\n"


def errors(tmp_path, text, name="m.yaml"):
    path = write(tmp_path / name, text)
    with pytest.raises(MappingError) as exc:
        load_mapping_file(path)
    return exc.value.diagnostics, str(path)


def test_misspelled_directive_has_position_path_and_suggestion(tmp_path):
    diags, path = errors(
        tmp_path,
        HEADER
        + """\
rules:
  - name: identify
    match: {type: identify}
    kind: customer
    body:
      customer_id: {pth: $.userId}
""",
    )
    (d,) = diags
    assert (d.file, d.line, d.column) == (path, 8, 21)
    assert d.yaml_path == "rules[0].body.customer_id.pth"
    assert d.message.startswith("unknown key 'pth' (did you mean 'path'?)")
    assert str(d).startswith(f"{path}:8:21: rules[0].body.customer_id.pth: unknown key 'pth'")


def test_unknown_top_level_key_and_rule_key(tmp_path):
    diags, _ = errors(
        tmp_path,
        HEADER
        + """\
rulez: []
rules:
  - name: x
    kind: customer
    bdy: {}
""",
    )
    messages = [str(d) for d in diags]
    assert any(":3:1: rulez: unknown key 'rulez'" in m and "did you mean 'rules'?" in m for m in messages), messages
    assert any(":7:5: rules[0].bdy: unknown key 'bdy' in a rule (did you mean 'body'?)" in m for m in messages)


def test_misspelled_output_field_is_caught_with_suggestion(tmp_path):
    diags, _ = errors(
        tmp_path,
        HEADER
        + """\
rules:
  - name: t
    match: {type: track}
    kind: event
    body:
      customer_idd: $.userId
      actions:
        - object: {action: $.event, atributes: $.properties}
""",
    )
    messages = [str(d) for d in diags]
    assert any(
        ":8:7: rules[0].body.customer_idd: moengage 'event' has no field 'customer_idd' (did you mean 'customer_id'?)"
        in m
        for m in messages
    ), messages
    assert any("a moengage 'event' rule must set 'customer_id'" in m for m in messages)
    assert any("rules[0].body.actions[0].object.atributes" in m and "did you mean 'attributes'?" in m for m in messages)


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("event", "{customer_id: $.userId, actions: [{object: {attributes: $.properties}}]}", "must set 'action'"),
        ("event", "{customer_id: $.userId, actions: $.x}", "expected a list of actions"),
        ("event", "{customer_id: $.userId}", "a moengage 'event' rule must set 'actions'"),
        ("customer", "{attributes: $.traits}", "a moengage 'customer' rule must set 'customer_id'"),
        ("merge", "{merged_user: $.previousId}", "a moengage 'merge' rule must set 'retained_user'"),
        ("device", "{customer_id: $.userId}", "a moengage 'device' rule must set 'attributes'"),
        (
            "device",
            "{customer_id: $.userId, attributes: {object: {platform: ANDROID}}}",
            "a moengage 'device' rule's attributes must set 'push_id'",
        ),
        ("device", "{customer_id: $.userId, attributes: {}, platform: x}", "moengage 'device' has no field 'platform'"),
        ("customer", "{type: customer, customer_id: $.userId}", "'type' is set from the rule's kind"),
        ("evnt", "{customer_id: $.userId}", "moengage has no output kind 'evnt' (did you mean 'event'?)"),
    ],
)
def test_moengage_structural_checks(tmp_path, kind, body, message):
    diags, _ = errors(tmp_path, HEADER + f"rules:\n  - name: r\n    kind: {kind}\n    body: {body}\n")
    assert any(message in str(d) for d in diags), [str(d) for d in diags]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{userId: $.uid}", "a segment 'track' rule must set 'event'"),
        ("{event: x}", "a segment 'track' rule must set userId or anonymousId"),
        ("{event: x, userid: $.uid}", "did you mean 'userId'?"),
    ],
)
def test_segment_structural_checks(tmp_path, body, message):
    text = (
        "source_format: moengage_streams\ndestination_kind: segment\n"
        f"rules:\n  - name: r\n    kind: track\n    body: {body}\n"
    )
    diags, _ = errors(tmp_path, text)
    assert any(message in str(d) for d in diags), [str(d) for d in diags]


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("{path: $.a, pipe: [{to: intger}]}", "unknown type 'intger' (did you mean 'integer'?)"),
        ("{path: $.a, pipe: [{too: integer}]}", "did you mean 'to'?"),
        ("{path: $.a, pipe: [{to: integer, on_error: dropevent}]}", "did you mean 'drop_event'?"),
        ("{path: $.a, pipe: [{lookup: platfroms}]}", "unknown lookup 'platfroms'"),
        ("{path: $.a, pipe: [trimm]}", "unknown step 'trimm' (did you mean 'trim'?)"),
        ("{path: $.a, pipe: [{case: lowr}]}", "did you mean 'lower'?"),
        ("{path: $.a, pipe: [{not_after: tomorrow}]}", "expected now (the moment of mapping), got 'tomorrow'"),
        ("{path: $.a, pipe: [{not_after: true}]}", "expected now (the moment of mapping), got True"),
        ("{path: $.a, pipe: [{not_after: now, on_error: fail}]}", "unknown key 'on_error' in the 'not_after' step"),
        # A step that takes a value, written bare, is no typo: no "did you mean" itself.
        ("{path: $.a, pipe: [not_after]}", "the 'not_after' step needs a value; write it as {not_after: now}"),
        ("{path: $.a, pipe: [lookup]}", "the 'lookup' step needs a value; write it as {lookup: NAME}"),
        ("{path: $.a, pipe: [trim, case]}", "pipe[1]: the 'case' step needs a value; write it as {case: lower}"),
        ("{frist: [$.a]}", "did you mean 'first'?"),
        # One keystroke off a two-letter name, or nearer one name than difflib finds.
        ("{fi: {exists: $.a}, then: x}", "unknown key 'fi' (did you mean 'if'?)"),
        ("{if: {value: $.a, ni: [x]}, then: x}", "unknown key 'ni' in a condition (did you mean 'in'?)"),
        ("{path: $.a, pipe: [{ot: integer}]}", "a step needs exactly one of: case, trim"),
        ("{path: $.a, pipe: [{ot: integer}]}", "(did you mean 'to'?)"),
        ("{if: {exsts: $.a}, then: x}", "unknown key 'exsts' in a condition (did you mean 'exists'?)"),
        ("{if: {value: $.a, equal: x}, then: x}", "did you mean 'equals'?"),
        ("{if: {value: $.a, gt: high}, then: x}", "'gt' expects a number"),
        # .nan fails every comparison and .inf passes or fails them all: never what was meant.
        ("{if: {value: $.a, lt: .nan}, then: x}", "'lt' expects a finite number, got nan"),
        ("{if: {value: $.a, gte: -.inf}, then: x}", "'gte' expects a finite number, got -inf"),
        ("{if: {value: $.a}, then: x}", "'value' needs exactly one operator"),
        ("{if: {value: $.a, is: text}, then: x}", "'is' expects JSON type names (string, number"),
        ("{if: {value: $.a, is: [string, 3]}, then: x}", "got 3"),
        # A nested value is quoted as written, not as the parser's node.
        ("{if: {value: $.a, is: [[string]]}, then: x}", "got ['string']"),
        ("{path: $.a, pipe: [{json: [1]}]}", "expected encode or decode, got [1]"),
        # Objects and lists equal nothing: listed, they would match every object or list.
        ("{if: {value: $.a, in: [a, {k: 1}]}, then: x}", "'in' expects a list of strings, numbers, booleans or null"),
        ("{if: {value: $.a, not_in: [[1]]}, then: x}", "'not_in' expects a list of strings, numbers"),
        ("{if: {exists: $.a, empty: $.b}, then: x}", "a condition needs exactly one of"),
        ("$let.custmer_id", "unknown let name 'custmer_id' (did you mean 'customer_id'?)"),
        ("'$.a['", "unclosed '['"),
        ("{path: $.a, first: [$.b]}", "one expression may use only one of path, first"),
        ("{template: 'hi {{name'}", "unclosed '{{'"),
        ("{object: {a: 1}, rest: $.traits, extra: 1}", "unknown key 'extra' in a 'object' expression"),
        ("$item.x", "$item is only defined inside an 'each' step"),
        ("{path: $.a, drop_if: nothing}", "expected 'null' or 'empty'"),
        ("{merge: [$.a], prefer: middle}", "expected 'first' or 'last'"),
        # What was found, in the file's words: never Python's ("got NoneType None", "got dict").
        ("{path: {a: 1}}", "v.path: expected a path string such as $.a.b, got a mapping"),
        ("{path: 5}", "v.path: expected a path string such as $.a.b, got the number 5"),
        ("{path: $.a, pipe: [{lookup: {a: b}, ignore_case: 'no'}]}", "expected true or false, got 'no'"),
        ("{object: null}", "v.object: expected a mapping of field name to value, got null"),
        ("{object: true}", "v.object: expected a mapping of field name to value, got true"),
        ("{object: 2024-01-01}", "got the date 2024-01-01 (quote it to mean the text)"),
        ("{path: $.a, pipe: [{lookup: 1.5}]}", "expected a lookup name or an inline table, got the number 1.5"),
        # A literal that is no time fell back to now at run time: `false` meant "now".
        ("{path: $.a, pipe: [{tz_offset: false}]}", "v.pipe[0].tz_offset: expected the instant to take the offset at"),
        ("{path: $.a, pipe: [{tz_offset: now}]}", "or the bare step `tz_offset` for now; got 'now'"),
        ("{path: $.a, pipe: [{tz_offset: null}]}", "for now; got null"),
    ],
)
def test_expression_errors(tmp_path, snippet, message):
    text = (
        HEADER
        + "let:\n  customer_id: $.userId\n"
        + "rules:\n  - name: r\n    kind: customer\n    body:\n      customer_id: $.userId\n"
        + f"      attributes: {{object: {{v: {snippet}}}}}\n"
    )
    diags, _ = errors(tmp_path, text)
    assert any(message in str(d) for d in diags), [str(d) for d in diags]
    assert all(d.line >= 1 and d.column >= 1 for d in diags)


def test_yaml_syntax_error_and_duplicate_key_positions(tmp_path):
    diags, path = errors(tmp_path, HEADER + "rules: [\n")
    assert diags[0].file == path and "invalid YAML" in diags[0].message and diags[0].line >= 3
    diags, _ = errors(tmp_path, HEADER + "source_format: segment\nrules: []\n")
    assert any(d.line == 3 and "duplicate key 'source_format'" in d.message for d in diags)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        # A `{` never closed: the parser gives up on the next line; the brace is named.
        (
            "rules:\n  - name: t\n    match: {type: track\n    kind: event\n",
            (6, 9),
            "expected ',' or '}', but got ':' (while parsing a flow mapping that starts at line 5, column 12)",
        ),
        # A quote never closed: the parser gives up at the end of the file.
        (
            "rules:\n  - name: t\n    drop: x\n    detail: 'no rule\n\n",
            (8, 1),
            "found unexpected end of stream (while scanning a quoted scalar that starts at line 6, column 13)",
        ),
        ("rules:\n  - name: t\n\tdrop: x\n", (5, 1), "indent with spaces"),
    ],
)
def test_yaml_syntax_errors_say_where_the_unfinished_construct_starts(tmp_path, text, where, message):
    (d,), _ = errors(tmp_path, HEADER + text)
    assert (d.line, d.column) == where
    assert d.message.startswith("invalid YAML: ") and message in d.message, d.message


def test_missing_required_and_bad_enums(tmp_path):
    diags, _ = errors(tmp_path, "source_format: segmnt\ndestination_kind: moengage\n")
    messages = [str(d) for d in diags]
    assert any("missing required key 'rules'" in m for m in messages)
    assert any("source_format: expected one of segment, moengage_streams, got 'segmnt'" in m for m in messages)
    assert any("did you mean 'segment'?" in m for m in messages)


def test_missing_lookup_file(tmp_path):
    diags, _ = errors(
        tmp_path,
        HEADER + "lookups:\n  p: {file: lookups/nope.yaml}\nrules:\n  - {name: r, drop: x}\n",
    )
    assert any("lookups.p.file" in d.yaml_path and "cannot read lookup file" in d.message for d in diags)


@pytest.mark.parametrize("lookup", ["{file: lookups/nope.yaml}", "{file: lookups/broken.yaml}", "{tabel: {a: b}}"])
def test_a_lookup_that_did_not_load_is_reported_once_not_as_unknown_at_each_use(tmp_path, lookup):
    # "unknown lookup 'p'; define it under 'lookups'" at every use sent the author to add a
    # lookup that is there: only its own problem is said.
    write(tmp_path / "lookups" / "broken.yaml", "table: [a, b]\n")
    diags, _ = errors(
        tmp_path,
        HEADER
        + f"lookups:\n  p: {lookup}\n"
        + "rules:\n  - name: r\n    kind: customer\n    when: {value: $.x, in: p}\n    body:\n"
        + "      customer_id: {path: $.userId, pipe: [{lookup: p}]}\n"
        + "      attributes: {object: {a: {path: $.a, pipe: [{lookup: p}]}}}\n",
    )
    assert len(diags) == 1, [str(d) for d in diags]
    assert "unknown lookup" not in diags[0].message


def test_broken_lookup_file_is_reported_in_that_file(tmp_path):
    lookup = write(tmp_path / "lookups" / "p.yaml", "tabel: {a: b}\n")
    diags, _ = errors(tmp_path, HEADER + "lookups:\n  p: {file: lookups/p.yaml}\nrules:\n  - {name: r, drop: x}\n")
    assert any(d.file == str(lookup.resolve()) and "did you mean 'table'?" in d.message for d in diags), diags


def test_dir_reports_all_files_and_skips_lookups_and_tests(tmp_path):
    write(tmp_path / "a.yaml", HEADER + "rules:\n  - {name: r, kind: customer, body: {customer_id: {pth: x}}}\n")
    write(tmp_path / "b.yaml", HEADER + "rulez: []\n")
    write(tmp_path / "ok.yaml", HEADER + "rules:\n  - {name: r, drop: x}\n")
    write(tmp_path / "lookups" / "x.yaml", "table: {a: b}\n")
    write(tmp_path / "tests" / "ok" / "t.yaml", "input: {}\nexpect: {discarded: x}\n")
    with pytest.raises(MappingError) as exc:
        load_mapping_dir(tmp_path)
    files = {d.file.rsplit("/", 1)[1] for d in exc.value.diagnostics}
    assert files == {"a.yaml", "b.yaml"}
    (tmp_path / "a.yaml").unlink()
    (tmp_path / "b.yaml").unlink()
    assert set(load_mapping_dir(tmp_path)) == {"ok"}


def test_yaml_12_booleans(tmp_path):
    path = write(
        tmp_path / "m.yaml",
        HEADER
        + "lookups:\n  c: {table: {no: Norway, yes: Yes}}\n"
        + "rules:\n  - name: r\n    kind: customer\n    body:\n      customer_id: $.userId\n"
        + "      attributes: {object: {country: {path: $.c, pipe: [{lookup: c}]}, on: on}}\n",
    )
    m = load_mapping_file(path)
    (out,) = outputs(m.apply({"type": "identify", "userId": "user-1", "c": "no"}, MapContext()))
    assert out.body["attributes"] == {"country": "Norway", "on": "on"}


def test_values_python_cannot_hold_are_diagnosed_where_they_are(tmp_path):
    """An integer of more than 4,300 digits, a lookup file path with a NUL byte: each a
    diagnostic at its own line, not an "unexpected error" at the top of the file."""
    huge = "9" * 5000
    text = (
        HEADER
        + 'lookups:\n  t: {file: "a\\0b.yaml"}\n'
        + "let:\n  customer_id: $.userId\n"
        + "rules:\n  - name: r\n    kind: customer\n    body:\n      customer_id: $.userId\n"
        + f"      attributes: {{object: {{v: {{if: {{value: $.a, gt: {huge}}}, then: x}}}}}}\n"
    )
    diags, _ = errors(tmp_path, text)
    found = [(d.line, str(d)) for d in diags]
    assert not any("unexpected error" in text for _, text in found), found
    assert any(line == 4 and "lookups.t.file: expected a path relative to the mapping file" in t for line, t in found)
    assert any(line == 12 and "if.gt: cannot read this value" in t and "4300" in t for line, t in found), found


def test_a_rule_below_the_rule_for_its_whole_type_is_reported_as_never_matching(tmp_path):
    # The first matching rule decides: a rule for one event added below the rule for every
    # track would silently never run.
    diags, _ = errors(
        tmp_path,
        HEADER
        + """\
rules:
  - name: track
    match: {type: track}
    kind: customer
    body: {customer_id: $.userId}
  - name: order-completed
    match: {type: track, event: Order Completed}
    kind: customer
    body: {customer_id: $.userId}
""",
    )
    (d,) = diags
    assert (d.line, d.column, d.yaml_path) == (8, 11, "rules[1].name")
    assert d.message.startswith(
        "rule 'order-completed' can never match: rule 'track' (rules[0]) above it matches every event this one would"
    )
    assert "give 'track' 'continue: true'" in d.message


def test_every_rule_below_a_catch_all_is_reported_as_never_matching(tmp_path):
    diags, _ = errors(
        tmp_path,
        HEADER
        + """\
rules:
  - {name: other-calls, drop: unsupported_type}
  - {name: identify, match: {type: identify}, kind: customer, body: {customer_id: $.userId}}
  - {name: any-track, when: {exists: $.event}, drop: x}
""",
    )
    assert [d.yaml_path for d in diags] == ["rules[1].name", "rules[2].name"]
    assert "rule 'other-calls' (rules[0]) above it matches every event," in diags[0].message
    assert "continue" not in diags[0].message  # a drop rule cannot go on


@pytest.mark.parametrize(
    "first",
    [
        "{name: a, match: {type: track}, kind: customer, continue: true, body: {customer_id: $.userId}}",
        "{name: a, match: {type: track}, when: {exists: $.userId}, drop: x}",
        "{name: a, match: {type: track, event: A}, drop: x}",
        "{name: a, match: {type: [track, screen]}, drop: x}",  # not the later rule's page events
        "{name: a, match: {type: identify}, drop: x}",
    ],
)
def test_rules_an_earlier_rule_does_not_always_decide_are_accepted(tmp_path, first):
    path = write(
        tmp_path / "m.yaml",
        HEADER
        + f"rules:\n  - {first}\n"
        + "  - {name: b, match: {type: [track, page]}, drop: y}\n  - {name: c, drop: z}\n",
    )
    assert load_mapping_file(path).name == "m"


@pytest.mark.parametrize("name", ["", "{a: 1}", "[track]", "true", "''"])
def test_a_rule_name_that_is_no_name_is_an_error(tmp_path, name):
    # It names the rule in discards, dead letters and diagnostics: it was written as "None".
    diags, _ = errors(tmp_path, HEADER + f"rules:\n  - name: {name}\n    drop: x\n")
    (d,) = diags
    assert (d.line, d.yaml_path) == (4, "rules[0].name")
    assert d.message.startswith("expected a rule name such as track, got ")


@pytest.mark.parametrize(
    ("match", "at", "message"),
    [
        ("match: {type: Track}", (5, 19), "of type 'Track' (did you mean 'track'?)"),
        ("when: {match: {type: identity}}", (4, 5), "of type 'identity' (did you mean 'identify'?)"),
    ],
)
def test_a_rule_for_a_type_no_segment_source_stores_is_an_error(tmp_path, match, at, message):
    # Ingest refuses any other type, so the rule could never match an event.
    diags, _ = errors(tmp_path, HEADER + f"rules:\n  - name: r\n    {match}\n    drop: x\n  - {{name: z, drop: y}}\n")
    (d,) = diags
    assert (d.line, d.column) == at
    assert d.message.startswith("rule 'r' can never match: a Segment source stores no event " + message)
    assert d.message.endswith("its types are alias, delete, group, identify, page, screen, track")


def test_a_rule_with_some_types_stored_is_not_said_never_to_match(tmp_path):
    # It matches page events: only 'Screen' is dead. "Can never match" would have the
    # author delete a rule that maps every page call.
    text = HEADER + "rules:\n  - name: r\n    match: {type: [page, Screen]}\n    drop: x\n  - {name: z, drop: y}\n"
    diags, _ = errors(tmp_path, text)
    (d,) = diags
    assert (d.line, d.column) == (5, 19)
    assert d.message.startswith(
        "rule 'r' lists a type that never matches: a Segment source stores no event of type 'Screen'"
        " (did you mean 'screen'?)"
    )


def test_a_streams_mapping_may_match_any_type(tmp_path):
    text = "source_format: moengage_streams\ndestination_kind: segment\n"
    text += "rules:\n  - {name: r, match: {type: Track}, drop: x}\n"
    assert load_mapping_file(write(tmp_path / "m.yaml", text)).name == "m"


def test_a_let_used_before_it_is_defined_says_where_it_is(tmp_path):
    """A cycle in `let` (or a let below its use) was "unknown let name 'b'" of a let the
    author can see in the file: it says which one is below, or that it uses itself."""
    text = (
        "source_format: segment\ndestination_kind: segment\n"
        "let:\n"
        "  a: {first: [$let.b, $.x]}\n"
        "  b: {first: [$let.b]}\n"
        "  c: $let.customer\n"
        "  customer_id: $.userId\n"
        "rules:\n  - name: t\n    kind: track\n    body: {event: $let.nope, userId: $let.a}\n"
    )
    diags, _ = errors(tmp_path, text)
    assert [(d.line, d.column, d.yaml_path, d.message) for d in diags] == [
        (
            4,
            15,
            "let.a.first[0]",
            "let 'b' is defined below 'a'; a let may only use the lets above it (move 'b' above 'a')",
        ),
        (5, 15, "let.b.first[0]", "let 'b' uses itself; a let may only use the lets above it"),
        (
            6,
            6,
            "let.c",
            "unknown let name 'customer' (did you mean 'customer_id'?); a let may only use names defined above it",
        ),
        (11, 19, "rules[0].body.event", "unknown let name 'nope'; the lets are: a, b, c, customer_id"),
    ]


def test_a_bad_enum_name_or_flag_is_said_in_yaml_words(tmp_path):
    """null and true as written, not Python's None and True ("got {'a': None}" for a name)."""
    text = (
        "source_format: segment\ndestination_kind: null\n"
        "lookups:\n  x: {table: {a: b}, ignore_case: null}\n"
        "rules:\n  - name: {a: null}\n    drop: x\n"
    )
    diags, _ = errors(tmp_path, text)
    assert [(d.yaml_path, d.message) for d in diags] == [
        ("destination_kind", "expected one of moengage, segment, got null"),
        ("lookups.x.ignore_case", "expected true or false, got null"),
        ("rules[0].name", "expected a rule name such as track, got a mapping"),
    ]


def test_an_override_case_sets_or_drops_never_neither_nor_both(tmp_path):
    """`C: {}` changed nothing and `{set: ..., drop: ...}` never set: both loaded silently."""
    text = (
        "source_format: segment\ndestination_kind: segment\n"
        "rules:\n  - name: t\n    kind: track\n    body: {event: $.event, userId: u}\n"
        "    overrides:\n      by: $.event\n      cases:\n"
        "        A: {set: {event: x}}\n        B: {drop: b}\n        C: {}\n        D: {set: {event: y}, drop: d}\n"
    )
    diags, _ = errors(tmp_path, text)
    message = "an override needs exactly one of 'set' (change the output) or 'drop' (discard the event)"
    assert [(d.line, d.column, d.yaml_path, d.message) for d in diags] == [
        (12, 12, "rules[0].overrides.cases.C", message),
        (13, 12, "rules[0].overrides.cases.D", message),
    ]
