"""Rule selection, drops, overrides, integrations semantics, identity, run-time output checks."""

import dataclasses
import random
from datetime import UTC, datetime
from types import MappingProxyType

import pytest

from bridge.mapping import Discarded, Failed, MapContext, Output, load_mapping_file
from bridge.mapping.compiler import _output
from bridge.mapping.runtime import MISSING, Env, event_env, to_iso8601

from .helpers import evaluate, outputs, value_mapping, write

MAPPING = """\
source_format: segment
destination_kind: moengage
integrations: [MoEngage, "MoEngage (Actions)"]
identity:
  key: $.userId
  link:
    when: {match: {type: identify}}
    from: $.userId
    to: $.traits.id
let:
  cid: {first: [$link, $.userId]}
drop:
  - when: {value: $.context.integration.name, equals: relay}
    reason: loop
  - when: {empty: $let.cid}
    reason: anonymous_user
rules:
  - name: internal
    match: {type: track}
    when: {value: $.event, prefix: "internal:"}
    drop: internal_event
    detail: "internal event {{event}}"
  - name: track-copy-as-customer
    match: {type: track}
    when: {exists: $.properties.plan}
    kind: customer
    continue: true
    body:
      customer_id: $let.cid
      attributes: {object: {plan: $.properties.plan}}
  - name: track
    match: {type: track}
    kind: event
    body:
      customer_id: $let.cid
      actions:
        - object: {action: $.event, attributes: {path: $.properties, default: {literal: {}}}}
    overrides:
      by: $.event
      cases:
        Order Completed:
          set:
            actions[0].action: Purchase
            actions[0].attributes.revenue: {path: $.properties.total, pipe: [{to: number}]}
            actions[0].attributes.total: $.nothing
        Heartbeat:
          drop: heartbeat
  - name: fallback
    drop: unsupported_type
"""


def load(tmp_path):
    return load_mapping_file(write(tmp_path / "m.yaml", MAPPING))


def track(**kw):
    return {"type": "track", "userId": "u1", "event": "E", **kw}


def test_first_matching_rule_decides_and_continue_adds_outputs(tmp_path):
    m = load(tmp_path)
    result = m.apply(track(properties={"plan": "pro"}), MapContext())
    assert result == [
        Output("customer", {"type": "customer", "customer_id": "u1", "attributes": {"plan": "pro"}}),
        Output(
            "event", {"type": "event", "customer_id": "u1", "actions": [{"action": "E", "attributes": {"plan": "pro"}}]}
        ),
    ]
    assert m.apply({"type": "screen", "userId": "u1"}, MapContext()) == Discarded("unsupported_type", "")


def test_drop_rules_and_global_drops(tmp_path):
    m = load(tmp_path)
    assert m.apply(track(event="internal:ping"), MapContext()) == Discarded(
        "internal_event", "internal event internal:ping"
    )
    assert m.apply(track(context={"integration": {"name": "relay"}}), MapContext()) == Discarded("loop", "")
    assert m.apply({"type": "track", "event": "E"}, MapContext()) == Discarded("anonymous_user", "")


def test_per_event_overrides(tmp_path):
    m = load(tmp_path)
    (out,) = outputs(m.apply(track(event="Order Completed", properties={"total": "9.5", "sku": "a"}), MapContext()))
    assert out.body["actions"] == [{"action": "Purchase", "attributes": {"revenue": 9.5, "sku": "a"}}]
    assert m.apply(track(event="Heartbeat"), MapContext()) == Discarded(
        "heartbeat", "override for 'Heartbeat' in rule 'track'"
    )


def test_linked_id_is_used(tmp_path):
    (out,) = outputs(load(tmp_path).apply(track(), MapContext(linked_id="crm-9")))
    assert out.body["customer_id"] == "crm-9"


def test_integrations_semantics(tmp_path):
    m = load(tmp_path)
    off = Discarded("integrations_disabled", "integrations['MoEngage'] is false")
    assert m.apply(track(integrations={"MoEngage": False}), MapContext()) == off
    assert m.apply(track(integrations={"All": False}), MapContext()) == Discarded(
        "integrations_disabled", "integrations.All is false"
    )
    # the first listed name present decides, even against All
    assert isinstance(m.apply(track(integrations={"All": False, "MoEngage": True}), MapContext()), list)
    assert isinstance(m.apply(track(integrations={"All": False, "MoEngage (Actions)": {"x": 1}}), MapContext()), list)
    assert m.apply(track(integrations={"MoEngage": False, "MoEngage (Actions)": True}), MapContext()) == off
    assert isinstance(m.apply(track(integrations={"Other": False}), MapContext()), list)
    # names are case-sensitive, as in Segment
    assert isinstance(m.apply(track(integrations={"moengage": False}), MapContext()), list)


def test_identity(tmp_path):
    m = load(tmp_path)
    assert m.identity_link({"type": "identify", "userId": "u1", "traits": {"id": "t1"}}) == ("u1", "t1")
    assert m.identity_link({"type": "identify", "userId": "u1"}) is None
    assert m.identity_link({"type": "track", "userId": "u1", "traits": {"id": "t1"}}) is None
    assert m.identity_key(track()) == "u1"


def test_runtime_output_check_fails_instead_of_sending_garbage(tmp_path):
    result = load(tmp_path).apply(track(event=None), MapContext())
    assert isinstance(result, Failed)
    assert result.reason == "invalid_output"
    assert "actions[0].action" in result.detail


def test_non_object_event_fails_cleanly(tmp_path):
    result = load(tmp_path).apply(["not", "an", "object"], MapContext())
    assert isinstance(result, Failed) and result.reason == "invalid_event"


def test_outputs_do_not_share_literal_objects(tmp_path):
    text = MAPPING.replace("default: {literal: {}}", "default: {literal: {k: [1]}}")
    m = load_mapping_file(write(tmp_path / "n.yaml", text))
    (a,) = outputs(m.apply(track(), MapContext()))
    a.body["actions"][0]["attributes"]["k"].append(2)
    (b,) = outputs(m.apply(track(), MapContext()))
    assert b.body["actions"][0]["attributes"] == {"k": [1]}


@pytest.mark.parametrize(
    ("types", "truths"),
    [
        # values:  "a"    7      7.5    True   None   [1]    {}     absent
        ("string", [True, False, False, False, False, False, False, False]),
        ("number", [False, True, True, False, False, False, False, False]),
        ("integer", [False, True, False, False, False, False, False, False]),
        ("boolean", [False, False, False, True, False, False, False, False]),
        ("null", [False, False, False, False, True, False, False, False]),
        ("[array, object]", [False, False, False, False, False, True, True, False]),
    ],
)
def test_is_tests_the_json_type(tmp_path, types, truths):
    mapping = value_mapping(tmp_path, f"{{if: {{value: $.x, is: {types}}}, then: yes, else: no}}")
    values: list[object] = ["a", 7, 7.5, True, None, [1], {}]
    got = [evaluate(mapping, {"type": "track", "x": x}) == "yes" for x in values]
    got.append(evaluate(mapping, {"type": "track"}) == "yes")
    assert got == truths


@pytest.mark.parametrize("to", ["iso8601", "epoch_seconds", "epoch_millis"])
@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_time_past_the_calendar_is_a_conversion_error_that_on_error_governs(tmp_path, to, when):
    dropped = value_mapping(tmp_path / "drop", f"{{path: $.x, pipe: [{{to: {to}}}]}}")
    assert evaluate(dropped, {"type": "track", "x": when}) == "<absent>"
    failing = value_mapping(tmp_path / "fail", f"{{path: $.x, pipe: [{{to: {to}, on_error: fail, reason: bad_time}}]}}")
    result = failing.apply({"type": "track", "x": when}, MapContext())
    assert isinstance(result, Failed) and result.reason == "bad_time", result


@pytest.mark.parametrize(
    ("to", "when", "edge", "edge_value"),
    [
        # From the year 5138 on, epoch seconds are 1e11 or more: a number every reader of
        # epoch times (the time steps, MoEngage) takes for milliseconds, a time in the 1970s.
        ("epoch_seconds", "5138-11-16T09:46:40Z", "5138-11-16T09:46:39Z", 99_999_999_999),
        ("epoch_seconds", "9999-12-31T23:59:59Z", "5138-11-16T09:46:39Z", 99_999_999_999),
        # Before 1973-03-03T09:46:40Z, epoch milliseconds are below 1e11: a number every
        # reader that tells the units apart by size takes for seconds, thousands of years on.
        ("epoch_millis", "1973-03-03T09:46:39.999Z", "1973-03-03T09:46:40Z", 100_000_000_000),
        ("epoch_millis", "1970-01-01T00:00:00Z", "1973-03-03T09:46:40Z", 100_000_000_000),
        ("epoch_millis", "1960-01-01T00:00:00Z", "1973-03-03T09:46:40Z", 100_000_000_000),
        ("epoch_millis", 86400, "1973-03-03T09:46:40Z", 100_000_000_000),
    ],
)
def test_an_epoch_number_read_back_in_the_other_unit_is_a_conversion_error(tmp_path, to, when, edge, edge_value):
    dropped = value_mapping(tmp_path / "drop", f"{{path: $.x, pipe: [{{to: {to}}}]}}")
    assert evaluate(dropped, {"type": "track", "x": when}) == "<absent>"
    assert evaluate(dropped, {"type": "track", "x": edge}) == edge_value
    failing = value_mapping(tmp_path / "fail", f"{{path: $.x, pipe: [{{to: {to}, on_error: fail}}]}}")
    result = failing.apply({"type": "track", "x": when}, MapContext())
    assert isinstance(result, Failed) and result.reason == "coercion_failed", result
    assert ("too early" if to == "epoch_millis" else "epoch") in result.detail, result


def test_a_track_timed_after_the_year_5138_is_sent_without_a_time_not_in_the_1970s():
    """The shipped mapping sends a time ahead of the bridge's clock as now (MoEngage drops
    future-dated events). Epoch seconds of a time from the year 5138 on were read as
    milliseconds, a time in the past, so one went out as a date in the 1970s. Now the time
    is left out, and MoEngage takes the time it receives the event."""
    import time
    from pathlib import Path

    from bridge.testing.moengage_standin import _is_future

    shipped = Path(__file__).resolve().parents[2] / "mappings" / "segment-to-moengage.yaml"
    m = load_mapping_file(shipped)
    event = {"type": "track", "userId": "u1", "event": "E", "context": {"timezone": "Europe/Lisbon"}}
    for when in ("2099-01-01T00:00:00Z", "9999-12-31T23:59:59Z"):
        [out] = outputs(m.apply({**event, "timestamp": when}, MapContext()))
        [action] = out.body["actions"]
        # Absent, MoEngage takes the time it receives the event; a number, as it reads one.
        sent = action.get("current_time", time.time())
        read = sent / 1000 if sent >= 1e11 else sent
        assert read > 1_700_000_000 and not _is_future(sent, time.time()), (when, action)
        assert action["user_timezone_offset"] in (0, 3600), (when, action)  # Lisbon, now
    [out] = outputs(m.apply({**event, "timestamp": "9999-12-31T23:59:59Z"}, MapContext()))
    assert "current_time" not in out.body["actions"][0], out


def test_a_lookup_of_values_keeps_true_apart_from_1(tmp_path):
    for values in ("[1, true]", "[true, 1]"):
        mapping = value_mapping(
            tmp_path / values.strip("[]").replace(", ", "-"),
            "{if: {value: $.x, in: flags}, then: yes, else: no}",
            extra_top=f"lookups:\n  flags: {{values: {values}}}\n",
        )
        got = {repr(x): evaluate(mapping, {"type": "track", "x": x}) for x in (1, True, "1", 1.0, False, 0)}
        assert got == {"1": "yes", "True": "yes", "'1'": "no", "1.0": "yes", "False": "no", "0": "no"}, (values, got)


GOES_ON = """\
source_format: segment
destination_kind: moengage
rules:
  - name: identify
    match: {type: identify}
    kind: customer
    continue: true
    body: {customer_id: $.userId}
  - name: track
    match: {type: track}
    kind: event
    body: {customer_id: $.userId, actions: [{object: {action: $.event}}]}
  - name: identify-vip
    match: {type: identify}
    when: {value: $.traits.plan, equals: vip}
    kind: customer
    continue: true
    body: {customer_id: $.userId, attributes: {object: {vip: true}}}
  - name: track-or-identify-test
    match: {type: [track, identify]}
    when: {value: $.traits.plan, equals: test}
    drop: test_user
  - name: anything-else
    when: {not: {match: {type: identify}}}
    drop: unsupported_type
"""


def test_after_a_rule_that_goes_on_every_later_rule_its_event_may_match_is_tried_in_order(tmp_path):
    """A rule with continue: true goes on to the rules below it that its events can match
    (the other types' rules are passed over without asking them): a later output, a later
    drop and a later rule that goes on again all count, in file order."""
    m = load_mapping_file(write(tmp_path / "m.yaml", GOES_ON))
    user = Output("customer", {"type": "customer", "customer_id": "u1"})
    vip = Output("customer", {"type": "customer", "customer_id": "u1", "attributes": {"vip": True}})
    assert m.apply({"type": "identify", "userId": "u1"}, MapContext()) == [user]
    assert m.apply({"type": "identify", "userId": "u1", "traits": {"plan": "vip"}}, MapContext()) == [user, vip]
    assert m.apply({"type": "identify", "userId": "u1", "traits": {"plan": "test"}}, MapContext()) == Discarded(
        "test_user", ""
    )
    assert m.apply({"type": "page", "userId": "u1"}, MapContext()) == Discarded("unsupported_type", "")


def test_a_device_without_its_platform_or_push_id_fails_instead_of_being_sent(tmp_path):
    """Track Device requires attributes.platform and attributes.push_id: an output without
    either (here read from paths the event lacks) is a mapping failure, never sent."""
    text = """\
source_format: segment
destination_kind: moengage
rules:
  - name: device
    kind: device
    body:
      customer_id: $.userId
      attributes: {object: {platform: $.context.device.type, push_id: $.context.device.token}}
"""
    m = load_mapping_file(write(tmp_path / "m.yaml", text))
    ok = {"type": "identify", "userId": "u1", "context": {"device": {"type": "ANDROID", "token": "t-1"}}}
    assert m.apply(ok, MapContext()) == [
        Output(
            "device", {"type": "device", "customer_id": "u1", "attributes": {"platform": "ANDROID", "push_id": "t-1"}}
        )
    ]
    no_token = {"type": "identify", "userId": "u1", "context": {"device": {"type": "ANDROID", "token": 7}}}
    result = m.apply(no_token, MapContext())
    assert isinstance(result, Failed) and result.reason == "invalid_output", result
    assert "attributes.push_id is missing or not a string" in result.detail


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        ("track", {"event": "E", "userId": "u", "properties": "text"}, "'properties' must be an object, got str"),
        ("track", {"event": "E", "userId": "u", "properties": None}, "'properties' must be an object"),
        ("identify", {"userId": "u", "traits": ["a"]}, "'traits' must be an object, got list"),
        ("identify", {"userId": "u", "anonymousId": "", "traits": {}}, "'anonymousId' is empty"),
        ("track", {"event": "E", "userId": "", "anonymousId": "a"}, "'userId' is empty"),
        ("track", {"event": "E", "userId": "u", "messageId": "m" * 101}, "'messageId' is 101 characters"),
        ("identify", {"userId": "u", "messageId": 7}, "'messageId' must be a string, got int"),
    ],
)
def test_a_segment_body_segment_would_drop_with_a_200_is_refused(kind, body, problem):
    """Segment answers 200 to these and drops them (its discard codes properties_not_object,
    traits_not_object, id_not_string): refused here, they are dead-lettered, not lost."""
    from bridge.mapping.shapes import check_body

    assert problem in (check_body("segment", kind, body) or "")
    fixed = {**body, "userId": "u", "anonymousId": "a", "properties": {}, "traits": {}, "messageId": "m" * 100}
    assert check_body("segment", kind, fixed) is None


BLANK = " \t\n"
DEVICE_ATTRIBUTES = {"platform": "ANDROID", "push_id": "t-1"}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("customer", {"type": "customer", "customer_id": BLANK}),
        ("event", {"type": "event", "customer_id": BLANK, "actions": [{"action": "E"}]}),
        ("event", {"type": "event", "customer_id": "u1", "actions": [{"action": BLANK}]}),
        ("device", {"type": "device", "customer_id": "u1", "attributes": {**DEVICE_ATTRIBUTES, "platform": BLANK}}),
        ("device", {"type": "device", "customer_id": "u1", "attributes": {**DEVICE_ATTRIBUTES, "push_id": BLANK}}),
        ("customer", {"type": "customer", "customer_id": "u1", "attributes": "plan=pro"}),
        ("customer", {"type": "customer", "customer_id": "u1", "attributes": ["plan"]}),
        ("device", {"type": "device", "customer_id": "u1", "attributes": "ANDROID"}),
        ("merge", {"merged_user": BLANK, "retained_user": "u1"}),
        ("delete", {"identity_type": "customer_id", "identity_value": BLANK}),
    ],
)
def test_a_moengage_body_moengage_would_refuse_is_refused(kind, body):
    """MoEngage trims: an id or a name of whitespace alone is empty to it. That, and
    attributes that are not an object, the stand-in refuses as MoEngage does (a 400 alone,
    an element dropped unseen from a Bulk Import answered 200). Refused before sending, it
    is dead-lettered instead of lost."""
    from bridge.mapping.shapes import body_checker, check_body
    from bridge.testing.moengage_standin import MoEngageStandIn, Rejected, _check_user_item

    with pytest.raises(Rejected):  # the stand-in's verdict on it
        if kind == "merge":
            MoEngageStandIn("w", "k")._accept_merge({"merge_data": [body]})
        elif kind == "delete":
            MoEngageStandIn("w", "k")._accept_delete(body)
        else:
            _check_user_item(body, kind, where="")
    assert check_body("moengage", kind, body) is not None
    assert body_checker("moengage", kind)(body) is not None  # the hot path's own test too


def test_an_alias_whose_previous_id_is_linked_to_whitespace_is_not_sent():
    """The shipped mapping checks an alias's previousId, not the id a stored link turns it
    into: a link to whitespace alone (learnt by an earlier mapping) made a merge MoEngage
    refuses, sent as good."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "mappings" / "segment-to-moengage.yaml"
    m = load_mapping_file(shipped)
    alias = {"type": "alias", "userId": "u-new", "previousId": "u-old"}
    assert m.apply(alias, MapContext(links={"u-old": "c-old"})) == [
        Output("merge", {"merged_user": "c-old", "retained_user": "u-new"})
    ]
    result = m.apply(alias, MapContext(links={"u-old": " "}))
    assert isinstance(result, Failed) and result.reason == "invalid_output", result
    assert "'merged_user' is only whitespace" in result.detail


def test_a_null_segment_id_beside_a_set_one_is_sent(tmp_path):
    """A mapping that copies a null uid writes userId: null, as Segment's own libraries do
    for a user not yet identified; with an anonymousId beside it the event is good. Only
    when no id is set at all is it refused."""
    text = """
source_format: moengage_streams
destination_kind: segment
rules:
  - name: t
    kind: track
    body:
      event: $.event_name
      userId: $.uid
      anonymousId: $.aid
      messageId: "relay-{{event_uuid}}"
"""
    m = load_mapping_file(write(tmp_path / "m.yaml", text))
    out = m.apply({"event_name": "E", "uid": None, "aid": "a", "event_uuid": "x"}, MapContext())
    assert out == [
        Output("track", {"type": "track", "event": "E", "userId": None, "anonymousId": "a", "messageId": "relay-x"})
    ]
    no_id = m.apply({"event_name": "E", "uid": None, "event_uuid": "x"}, MapContext())
    assert isinstance(no_id, Failed) and "none of userId, anonymousId is set" in no_id.detail
    # A template that makes the messageId longer than Segment takes: dead-lettered, not sent.
    too_long = m.apply({"event_name": "E", "aid": "a", "event_uuid": "x" * 95}, MapContext())
    assert isinstance(too_long, Failed) and too_long.reason == "invalid_output", too_long
    assert "'messageId' is 101 characters" in too_long.detail


def test_iso8601_is_written_as_strftime_writes_it() -> None:
    """to_iso8601 writes a year from 1000 on with %, not strftime: the same characters,
    including a year before 1000, which strftime writes without zeros in front."""
    rng = random.Random(3)
    for _ in range(20_000):
        year = rng.choice((1, 999, 1000, 1970, 9999, rng.randint(1, 9999)))
        micro = rng.choice((0, 999, 1000, 999_999, rng.randint(0, 999_999)))
        dt = datetime(year, rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), 7, micro)
        dt = dt.replace(second=rng.randint(0, 59), tzinfo=UTC)
        expected = f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"
        assert to_iso8601(dt.isoformat()) == expected, dt


@pytest.mark.parametrize(
    ("link", "options", "links"),
    [(None, {}, None), ("l-1", {"a": 1}, {"u": "l-1"}), (None, MappingProxyType({"b": 2}), {})],
)
def test_event_env_is_the_env_the_class_makes(link: str | None, options: object, links: object) -> None:
    made = Env({"type": "track"}, link, options, "web", links=links)  # type: ignore[arg-type]
    fast = event_env({"type": "track"}, link, options, "web", links)  # type: ignore[arg-type]
    assert type(fast) is Env
    for name in Env.__slots__:
        assert getattr(fast, name) == getattr(made, name), name
        assert type(getattr(fast, name)) is type(getattr(made, name)), name
    assert fast.item is MISSING and (fast.link is MISSING) == (link is None)
    assert fast.lets is not event_env({}, None, {}, "", None).lets  # a cache of its own


def test_an_output_made_without_the_class_call_is_the_same_output() -> None:
    body = {"customer_id": "u"}
    out = _output("event", body)
    assert type(out) is Output and out == Output("event", body) and repr(out) == repr(Output("event", body))
    assert out.body is body
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.kind = "other"  # type: ignore[misc]
