import copy
import hashlib
from typing import Any

import orjson
import pytest

from bridge.sources.segment.spec import Invalid
from bridge.sources.streams.spec import epoch_seconds, events_of, normalise


def test_envelope_variants():
    assert events_of({"events": [{"a": 1}]}) == [{"a": 1}]
    assert events_of({"app_name": "x", "export_doc_id": "d", "event": {"a": 1}}) == [{"a": 1}]
    assert events_of({"events": None, "event": {"a": 1}}) == [{"a": 1}]
    # An empty batch (a connectivity check) is no error: the route answers it as accepted.
    assert events_of({"events": []}) == []
    for bad, code in (
        ([], "invalid_payload"),
        ({"events": {}}, "invalid_payload"),
        ({"events": "x"}, "invalid_payload"),
        ({"events": 0}, "invalid_payload"),
        ({"foo": 1}, "invalid_payload"),
    ):
        with pytest.raises(Invalid) as exc:
            events_of(bad)
        assert exc.value.code == code


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1580967474, 1580967474),
        (1580967474123, 1580967474.123),
        ("1580967474", 1580967474),
        ("2020-02-06T05:37:54Z", 1580967474),
        ("2020-02-06T05:37:54+00:00", 1580967474),
        (1580967474.5, 1580967474.5),
        # An ISO time is seconds already: no millisecond guess, up to the last second that
        # every reader still takes for seconds (see the next test).
        ("5138-11-16T09:46:39Z", 99_999_999_999),
        (" 1580967474.25 ", 1580967474.25),
    ],
)
def test_event_time_is_normalised_to_epoch_seconds(raw, expected):
    assert epoch_seconds(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["soon", True, -5, 0, None, {"t": 1}, "inf", "Infinity", "1e999", "nan", float("inf"), 1e300, 10**30, "1e20"],
)
def test_bad_event_times_are_rejected(raw):
    with pytest.raises(Invalid):
        epoch_seconds(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # Stored as seconds past 1e11, which the mapping's iso8601 step reads as ms: 1973.
        "5138-11-16T09:46:40Z",
        "9999-12-31T23:59:59Z",
        # float() reads these; no sender means them as times.
        "1_580_967_474",
        "\u0661\u0665\u0668\u0660\u0669\u0666\u0667\u0664\u0667\u0664",
        # Positive, but stored to the millisecond as 0: 1970.
        1e-300,
        0.0004,
        "0.0004",
    ],
)
def test_event_times_that_would_be_stored_or_read_wrong_are_rejected(raw):
    with pytest.raises(Invalid) as exc:
        epoch_seconds(raw)
    assert exc.value.code == "invalid_event_time"


def test_a_uid_that_is_no_usable_id_counts_as_absent():
    good = {"event_uuid": "u1", "event_code": "MOE_X", "event_time": 1580967474}
    mine = {"moengage_user_id": "m1"}
    # 2.0**60: a float past 2^53 (as orjson reads a uid beyond 64 bits) has lost its digits.
    for odd in (True, False, {"a": 1}, {}, [1], [], "   ", 2.0**60, float("inf")):
        event, _, key = normalise({**good, "uid": odd, "user_attributes": mine})
        # The mapping then sends anonymousId m1, not userId "true" or '{"a":1}'.
        assert "uid" not in event and key == "m1", odd
    event, _, key = normalise({**good, "uid": " c1 "})
    assert event["uid"] == " c1 " and key == "c1"  # stored as sent; keyed (and mapped) trimmed
    event, _, key = normalise({**good, "uid": 12345})
    assert event["uid"] == 12345 and key == "12345"
    event, _, key = normalise({**good, "uid": 12345.0})
    assert key == "12345"  # as the mapping's `to: string` writes it, so one user is one key


def test_a_request_with_both_events_and_event_takes_them_all():
    both = {"events": [{"event_uuid": "a"}], "event": {"event_uuid": "b"}}
    assert events_of(both) == [{"event_uuid": "a"}, {"event_uuid": "b"}]
    assert events_of({"events": [{"event_uuid": "a"}], "event": None}) == [{"event_uuid": "a"}]
    assert events_of({"events": [], "event": None}) == []


def test_event_requirements_and_ordering_key():
    good = {"event_uuid": "u1", "event_code": "MOE_X", "event_time": 1580967474, "uid": "c1"}
    _, uuid, key = normalise(good)
    assert (uuid, key) == ("u1", "c1")
    _, _, key = normalise({**good, "uid": None, "user_attributes": {"moengage_user_id": "m1"}})
    assert key == "m1"
    # No time given: the time the request was received (as Segment times a call without one).
    untimed = {k: v for k, v in good.items() if k != "event_time"}
    assert normalise(untimed, 1765000000.1234)[0]["event_time"] == 1765000000.123
    for blank in (None, "", "  "):
        assert normalise({**good, "event_time": blank}, 1765000000)[0]["event_time"] == 1765000000
    # The id made for an event without event_uuid is of the event as sent, not of the time given it.
    derived = {k: v for k, v in untimed.items() if k != "event_uuid"}
    assert normalise(derived, 1)[1] == normalise(derived, 2)[1]
    with pytest.raises(Invalid) as exc:
        normalise({"event_uuid": "u", "event_time": 1})
    assert exc.value.code == "event_name_required"
    # event_uuid becomes the relayed track's messageId, which Segment takes up to 100
    # characters; unbounded, a long one failed PostgreSQL's dedupe index for the whole request.
    assert normalise({**good, "event_uuid": "u" * 100})[1] == "u" * 100
    with pytest.raises(Invalid) as exc:
        normalise({**good, "event_uuid": "u" * 101})
    assert exc.value.code == "event_uuid_too_long"
    with pytest.raises(Invalid) as exc:
        normalise({**good, "user_attributes": [1]})
    assert exc.value.code == "user_attributes_not_object"


def test_a_user_is_required_and_keyed_as_the_mapping_sends_it():
    good = {"event_uuid": "u1", "event_code": "MOE_X", "event_time": 1580967474}
    with pytest.raises(Invalid) as exc:
        normalise(good)  # Segment would refuse a call with neither userId nor anonymousId
    assert exc.value.code == "id_required"
    with pytest.raises(Invalid):
        normalise({**good, "uid": "  ", "user_attributes": {"moengage_user_id": ""}})
    assert normalise({**good, "uid": 12345})[2] == "12345"  # numeric uids keep their order too
    assert normalise({**good, "user_attributes": {"moengage_user_id": 77}})[2] == "77"


def test_a_non_string_event_name_is_rejected_at_ingest():
    event = {"event_uuid": "u1", "event_code": "MOE_EMAIL_SENT", "event_time": 1580967474, "uid": "c1"}
    for name in (42, ["Email Sent"], {"n": 1}):
        with pytest.raises(Invalid) as exc:
            normalise({**event, "event_name": name})
        assert exc.value.code == "event_name_not_string"
    assert normalise({**event, "event_name": ""})[1] == "u1"  # empty: the code names it


def test_an_event_without_event_uuid_gets_one_from_its_content():
    """Refused, such an event was lost (MoEngage drops what it cannot deliver); given a
    random id, a retried request would be delivered twice."""
    sent = {
        "event_code": "MOE_X",
        "event_time": 1580967474123,
        "uid": True,
        "user_attributes": {"moengage_user_id": "m"},
    }
    event, uuid, _ = normalise(sent)
    # Of the event as received: before event_time is read as ms and the unusable uid dropped.
    content = orjson.dumps(sent, option=orjson.OPT_SORT_KEYS)
    assert uuid == "moe-h-" + hashlib.sha256(content).hexdigest()[:32]
    assert event["event_uuid"] == uuid  # the relayed messageId
    assert normalise(copy.deepcopy(sent))[1] == uuid  # the same on a retry
    assert normalise({**sent, "event_time": 1580967474124})[1] != uuid
    # The order the sender writes members in, at any level, does not change it.
    reordered = {k: sent[k] for k in reversed(list(sent))}
    assert list(reordered) != list(sent)
    assert normalise(reordered)[1] == uuid
    nested = {**sent, "event_attributes": {"a": 1, "b": {"c": 2, "d": 3}}}
    flipped = {**sent, "event_attributes": {"b": {"d": 3, "c": 2}, "a": 1}}
    assert normalise(nested)[1] == normalise(flipped)[1] != uuid
    # A null one is absent too.
    assert normalise({**sent, "event_uuid": None})[1].startswith("moe-h-")


@pytest.mark.parametrize("given", ["", "   ", {"id": "x"}, ["x"], [], True, False, 1.5])
def test_an_event_uuid_that_is_blank_or_not_a_string_is_still_refused(given):
    event = {"event_uuid": given, "event_code": "MOE_X", "event_time": 1580967474, "uid": "c1"}
    with pytest.raises(Invalid) as exc:
        normalise(event)
    assert exc.value.code == "event_uuid_required"


def test_an_event_too_deep_to_hash_is_refused_as_too_deep_to_store():
    deep: dict[str, Any] = {}
    for _ in range(300):  # orjson reads 1024 levels, writes 254
        deep = {"d": deep}
    event = {"event_code": "MOE_X", "event_time": 1580967474, "uid": "c1", "event_attributes": deep}
    with pytest.raises(Invalid) as exc:
        normalise(event)
    assert exc.value.code == "event_too_deep"
