import random
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from bridge.sources.segment.millis import micros
from bridge.sources.segment.routes import first_array_item
from bridge.sources.segment.spec import WEBHOOK_ONLY_TYPES, Envelope, Invalid, ReceivedClock, iso, normalise

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def norm(item, call=None, **kw):
    return normalise(item, call_type=call, received_at=NOW, **kw)


def code_of(item, call=None, **kw):
    with pytest.raises(Invalid) as exc:
        norm(item, call, **kw)
    return exc.value.code


def test_timestamp_is_corrected_for_client_clock_skew():
    # Segment's documented example: timestamp = receivedAt - (sentAt - originalTimestamp).
    event, _, _ = normalise(
        {"userId": "u1", "event": "E", "timestamp": "2026-11-23T06:33:31.593Z"},
        call_type="track",
        received_at=datetime(2026, 11, 23, 6, 33, 36, 745000, tzinfo=UTC),
        sent_at="2026-11-23T06:33:32.900Z",
    )
    assert event["timestamp"] == "2026-11-23T06:33:35.438Z"
    assert event["originalTimestamp"] == "2026-11-23T06:33:31.593Z"
    assert event["receivedAt"] == "2026-11-23T06:33:36.745Z"


def test_missing_timestamp_is_received_at_and_message_id_is_assigned():
    event, message_id, key = norm({"anonymousId": "a1"}, "page")
    assert event["timestamp"] == iso(NOW)
    assert message_id and event["messageId"] == message_id
    assert key == "a1"


def test_write_key_is_never_kept_in_the_event():
    event, _, _ = norm({"userId": "u", "writeKey": "secret"}, "identify")
    assert "writeKey" not in event


def test_ids_are_required_and_numbers_are_stringified():
    assert code_of({"event": "E"}, "track") == "id_required"
    assert code_of({"userId": "  ", "event": "E"}, "track") == "id_required"
    assert code_of({"userId": {"a": 1}, "event": "E"}, "track") == "id_not_string"
    event, _, key = norm({"userId": 42, "event": "E"}, "track")
    assert event["userId"] == "42" and key == "42"


def test_a_float_id_is_written_as_segment_writes_numbers_and_one_that_lost_digits_is_refused():
    # JavaScript (and so Segment) writes 12.0 as "12"; Python's str() wrote "12.0", another user.
    event, _, key = norm({"userId": 12.0, "event": "E"}, "track")
    assert event["userId"] == "12" and key == "12"
    assert norm({"userId": 1.5, "event": "E"}, "track")[0]["userId"] == "1.5"
    # orjson reads an integer past 64 bits as a float: its digits are gone, and
    # "1.2345678901234568e+29" would name some other user.
    big = orjson.loads(b'{"userId": 123456789012345678901234567890, "event": "E"}')
    assert code_of(big, "track") == "id_not_string"
    assert code_of({"anonymousId": 2.0**60, "event": "E"}, "track") == "id_not_string"


def test_alias_needs_user_and_previous_id():
    assert code_of({"userId": "u"}, "alias") == "id_required"
    assert code_of({"previousId": "p", "anonymousId": "a"}, "alias") == "id_required"
    event, _, _ = norm({"userId": "u", "previousId": "p"}, "alias")
    assert event["previousId"] == "p"


def test_track_event_rules():
    assert code_of({"userId": "u"}, "track") == "event_not_defined"
    assert code_of({"userId": "u", "event": 5}, "track") == "event_not_string"
    for blank in (" ", "\t\n", "\u00a0", "  \u2003 "):  # MoEngage would refuse the action: 400 here
        assert code_of({"userId": "u", "event": blank}, "track") == "event_not_defined", repr(blank)
    assert norm({"userId": "u", "event": " Padded "}, "track")[0]["event"] == " Padded "  # kept as sent


def test_a_batch_item_whose_own_context_is_not_an_object_is_refused_not_replaced():
    received = datetime(2026, 1, 1, tzinfo=UTC)
    for key in ("context", "integrations"):
        batch = {"from": "batch"}
        envelope = Envelope(received, context=batch) if key == "context" else Envelope(received, integrations=batch)
        with pytest.raises(Invalid) as exc:
            normalise({"type": "track", "userId": "u", "event": "E", key: "str"}, call_type=None, envelope=envelope)
        assert exc.value.code == f"{key}_not_object"
        event, _, _ = normalise({"type": "track", "userId": "u", "event": "E"}, call_type=None, envelope=envelope)
        assert event[key] == {"from": "batch"}
        mine = {"type": "track", "userId": "u", "event": "E", key: {"own": 1}}
        assert normalise(mine, call_type=None, envelope=envelope)[0][key] == {"from": "batch", "own": 1}


def test_group_needs_group_id():
    assert code_of({"userId": "u"}, "group") == "id_required"
    assert norm({"userId": "u", "groupId": 42}, "group")[0]["groupId"] == "42"  # stringified, as ids are


def test_objects_must_be_objects():
    assert code_of({"userId": "u", "event": "E", "properties": [1]}, "track") == "properties_not_object"
    assert code_of({"userId": "u", "traits": "x"}, "identify") == "traits_not_object"
    assert code_of({"userId": "u", "context": 3}, "identify") == "context_not_object"
    assert code_of({"userId": "u", "name": 3}, "page") == "name_not_string"
    assert code_of({"userId": "u", "category": 3}, "page") == "category_not_string"


def test_message_id_limit_and_type():
    assert code_of({"userId": "u", "messageId": "x" * 101}, "identify") == "message_id_too_long"
    assert code_of({"userId": "u", "messageId": ["x"]}, "identify") == "message_id_not_string"
    norm({"userId": "u", "messageId": "x" * 100}, "identify")
    event, message_id, _ = norm({"userId": "u", "messageId": 12}, "identify")
    assert event["messageId"] == message_id == "12"


def test_batch_items_need_a_known_type():
    assert code_of({"userId": "u"}) == "invalid_type"
    assert code_of({"userId": "u", "type": "delete"}) == "invalid_type"
    assert code_of([1]) == "invalid_event"


def webhook_envelope() -> Envelope:
    return Envelope(NOW, keep_timestamp=True, more_types=WEBHOOK_ONLY_TYPES)


def test_a_webhook_deletion_is_ordered_with_its_user_and_must_name_one():
    event, message_id, key = normalise(
        {"type": "delete", "userId": 42, "messageId": "d-1"}, call_type=None, envelope=webhook_envelope()
    )
    assert (event["type"], event["userId"], message_id, key) == ("delete", "42", "d-1", "42")
    for nameless in ({"type": "delete"}, {"type": "delete", "userId": " ", "anonymousId": "a-1"}):
        with pytest.raises(Invalid) as exc:
            normalise(nameless, call_type=None, envelope=webhook_envelope())
        assert (exc.value.code, exc.value.message) == ("id_required", "delete requires userId, the user to delete")
    # The webhook's own list of types is the one an unknown type is told about.
    with pytest.raises(Invalid) as exc:
        normalise({"type": "erase", "userId": "u"}, call_type=None, envelope=webhook_envelope())
    assert exc.value.message == "type must be one of alias, delete, group, identify, page, screen, track; got 'erase'"


def test_batch_context_and_integrations_merge_with_item_winning():
    event, _, _ = norm(
        {"type": "track", "userId": "u", "event": "E", "context": {"ip": "1.1.1.1"}, "integrations": {"X": True}},
        batch_context={"ip": "2.2.2.2", "locale": "en"},
        batch_integrations={"All": False, "X": False},
    )
    assert event["context"] == {"ip": "1.1.1.1", "locale": "en"}
    assert event["integrations"] == {"All": False, "X": True}


def test_invalid_timestamps_are_rejected():
    assert code_of({"userId": "u", "timestamp": "yesterday"}, "identify") == "invalid_timestamp"
    assert code_of({"userId": "u", "timestamp": 5}, "identify") == "invalid_timestamp"


def test_webhook_events_keep_segment_timestamp():
    event, _, _ = norm(
        {
            "type": "track",
            "userId": "u",
            "event": "E",
            "timestamp": "2020-01-01T00:00:00.000Z",
            "sentAt": "2026-11-23T12:00:00.000Z",
        },
        keep_timestamp=True,
    )
    assert event["timestamp"] == "2020-01-01T00:00:00.000Z"


def test_a_webhook_event_without_a_timestamp_is_timed_from_segments_receivedat():
    """A Webhooks (Actions) mapping may leave timestamp out. Segment's receivedAt is in the
    event: the timestamp is worked out from it, as Segment does, not from when the bridge
    got the event, which after Segment's retries (up to 4 hours) may be hours later."""
    received = "2026-11-01T10:00:01.000Z"
    base = {"type": "track", "userId": "u", "event": "E", "receivedAt": received}
    event, _, _ = norm(dict(base), keep_timestamp=True)
    assert (event["timestamp"], event["receivedAt"]) == (received, received)
    # receivedAt - (sentAt - originalTimestamp): a device clock 5 s ahead, corrected.
    skewed = {**base, "originalTimestamp": "2026-11-01T10:00:05.500Z", "sentAt": "2026-11-01T10:00:06.000Z"}
    event, _, _ = norm(skewed, keep_timestamp=True)
    assert event["timestamp"] == "2026-11-01T10:00:00.500Z"
    # Another offset is read as such.
    event, _, _ = norm({**base, "receivedAt": "2026-11-01T11:00:01+01:00"}, keep_timestamp=True)
    assert event["timestamp"] == received
    # Needed and unreadable: refused as any time field is, not replaced by the bridge's time.
    assert code_of({**base, "receivedAt": "soon"}, keep_timestamp=True) == "invalid_timestamp"
    assert code_of({**base, "receivedAt": 5}, keep_timestamp=True) == "invalid_timestamp"
    # None given: the bridge's receive time, for both.
    event, _, _ = norm({**base, "receivedAt": None}, keep_timestamp=True)
    assert (event["timestamp"], event["receivedAt"]) == (iso(NOW), iso(NOW))
    event, _, _ = norm({**base, "receivedAt": "", "timestamp": received}, keep_timestamp=True)
    assert (event["timestamp"], event["receivedAt"]) == (received, iso(NOW))


@pytest.mark.parametrize(
    ("body", "first"),
    [
        (b'[{"a":1},{"b":2}]', b'{"a":1}'),
        (b' [ {"a":"x,]}"} , 2]', b'{"a":"x,]}"}'),
        (b'[{"a":"q\\"u,o"},3]', b'{"a":"q\\"u,o"}'),
        (b"[[1,2],[3]]", b"[1,2]"),
        (b'[{"n":1.0e3}]', b'{"n":1.0e3}'),
        (b"[]", None),
        (b'{"a":1}', None),
    ],
)
def test_first_array_item_slices_the_exact_bytes(body, first):
    assert first_array_item(body) == first


@pytest.mark.parametrize(
    ("timestamp", "sent_at"),
    [
        ("0001-01-01T00:00:00+05:00", None),
        ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"),
    ],
)
def test_out_of_range_timestamps_are_invalid_not_crashes(timestamp, sent_at):
    assert code_of({"userId": "u", "timestamp": timestamp}, "identify", sent_at=sent_at) == "invalid_timestamp"


@pytest.mark.parametrize(
    "item",
    [
        {"userId": "u1", "event": "E", "timestamp": "2026-11-23T06:33:31.593Z"},
        {"userId": "u1", "event": "E", "timestamp": "2026-11-23T06:33:31.593Z", "sentAt": "2026-11-23T06:33:30Z"},
        {"userId": "u1", "event": "E"},
        {"userId": "u1", "event": "E", "receivedAt": "2020-01-01T00:00:00.000Z"},
        {"userId": 7, "anonymousId": " ", "event": "E", "messageId": 12, "writeKey": "k"},
    ],
)
def test_batch_level_precomputed_times_give_the_same_event(item):
    # A batch passes receivedAt's text and its parsed sentAt once for all events.
    sent_at = "2026-11-23T06:33:32.900Z"
    item = {"messageId": "m-1", **item}
    plain = normalise(dict(item), call_type="track", received_at=NOW, sent_at=sent_at)
    shared = normalise(dict(item), call_type="track", envelope=Envelope(NOW, iso(NOW), sent_at=sent_at))
    assert shared == plain
    assert "writeKey" not in shared[0]


def _iso_reference(dt):
    # The earlier implementation, kept as the reference for the faster one.
    if dt.utcoffset() != timedelta(0):
        dt = dt.astimezone(UTC)
    text = dt.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text + "Z"


@pytest.mark.parametrize(
    "dt",
    [
        datetime(2026, 11, 23, 6, 33, 35, 438999, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 3, 29, 1, 30, 0, 123456, tzinfo=timezone(timedelta(hours=-8))),
        datetime(2026, 3, 29, 1, 30, 0, 500, tzinfo=timezone(timedelta(0))),
        datetime.fromisoformat("2026-11-23T21:14:07.512Z"),
        datetime.fromisoformat("2026-11-23T21:14:07.512-03:00"),
    ],
)
def test_iso_matches_the_reference_formatting(dt):
    assert iso(dt) == _iso_reference(dt)


def test_an_alias_is_ordered_with_both_users():
    # The merge must not overtake previousId's earlier events (they would land on a user
    # MoEngage has already merged) nor the retained user's (its identify): both ids key it.
    received = datetime(2026, 11, 23, tzinfo=UTC)
    _, _, key = normalise({"previousId": "anon-7", "userId": "user-7"}, call_type="alias", received_at=received)
    assert key == "anon-7\x1fuser-7"
    _, _, key = normalise({"userId": "user-7", "event": "E"}, call_type="track", received_at=received)
    assert key == "user-7"


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-11-23T06:33:31.593Z", "2026-11-23T06:33:31.593Z"),  # toISOString(): kept as sent
        ("2026-11-23T06:33:31.593+00:00", "2026-11-23T06:33:31.593Z"),
        ("2026-11-23T06:33:31.593999+00:00", "2026-11-23T06:33:31.593Z"),
        ("2026-11-23T07:33:31.593+01:00", "2026-11-23T06:33:31.593Z"),
        ("2026-11-23T06:33:31,593Z", "2026-11-23T06:33:31.593Z"),  # a comma: 24 characters, not ours
        ("2026-W48-1T06:33:31.593Z", "2026-11-23T06:33:31.593Z"),  # an ISO week date
        ("2026-11-23T06:33:31", "2026-11-23T06:33:31.000Z"),
    ],
)
def test_a_timestamp_without_sent_at_is_stored_in_segments_form(sent, stored):
    event, _, _ = norm({"userId": "u1", "event": "E", "timestamp": sent}, "track")
    assert event["timestamp"] == stored
    assert event["originalTimestamp"] == sent


def test_any_text_kept_as_sent_is_what_iso_would_write():
    """The shortcut keeps a text only when formatting its time again gives it back."""
    rng = random.Random(5)
    for _ in range(2000):
        dt = datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(0, 315537897599999999))
        text = iso(dt)
        event, _, _ = norm({"userId": "u1", "event": "E", "timestamp": text}, "track")
        assert event["timestamp"] == text == iso(datetime.fromisoformat(text))


def test_the_received_clock_gives_the_millisecond_and_its_text():
    clock = ReceivedClock()
    before = datetime.now(UTC)
    at, text, us = clock.now()
    after = datetime.now(UTC)
    assert before - timedelta(milliseconds=1) < at <= after
    assert at.microsecond % 1000 == 0 and text == iso(at) and us == micros(at)
    again_at, again_text, again_us = clock.now()
    assert again_at >= at and again_text == iso(again_at) and again_us == micros(again_at)


def test_the_received_clock_writes_each_millisecond_as_iso_does():
    # A millisecond of a second already seen reuses that second's text: across seconds,
    # minutes, days and years, in and out of order, the text is iso's and the time exact.
    clock = ReceivedClock()
    start = 1_798_761_599_998  # 2026-12-31T23:59:59.998Z
    for ms in (*range(start, start + 1_005), start + 61_000, start - 1, 0, 999, 1_000):
        clock._tick(ms)
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        assert (clock._at, clock._text, clock._us) == (at, iso(at), ms * 1000)


def test_a_single_calls_envelope_holds_the_millisecond_it_was_received_in():
    clock = ReceivedClock()
    before = datetime.now(UTC)
    envelope = clock.envelope()
    after = datetime.now(UTC)
    assert before - timedelta(milliseconds=1) < envelope.received_at <= after
    assert envelope.received_iso == iso(envelope.received_at)
    assert envelope.received_us == micros(envelope.received_at)
    assert (envelope.sent_at, envelope.context, envelope.integrations, envelope.merges) == (None, None, None, False)
    assert not envelope.keep_timestamp and envelope.more_types == frozenset()
    again = clock.envelope()  # the same object within one millisecond, a new one after it
    assert again is envelope or again.received_at > envelope.received_at


def test_midnight_written_as_24_is_never_kept_as_sent():
    # Python 3.11 refuses it; newer versions read it as the next day's 00:00, which iso
    # writes differently, so it must never take the shortcut.
    from bridge.sources.segment.spec import _is_iso

    assert _is_iso("2026-11-23T23:59:59.999Z")
    assert not _is_iso("2026-11-23T24:00:00.000Z")


def test_received_at_is_the_bridge_s_own_unless_segment_set_it():
    sent = {"userId": "u1", "event": "E", "receivedAt": "2020-01-01T00:00:00.000Z"}
    tracked, _, _ = normalise(dict(sent), call_type="track", received_at=NOW)
    assert tracked["receivedAt"] == iso(NOW)
    # A client's garbage is not kept either.
    tracked, _, _ = normalise(dict(sent, receivedAt={"x": 1}), call_type="track", received_at=NOW)
    assert tracked["receivedAt"] == iso(NOW)
    # Through Segment's Webhooks destination, receivedAt is Segment's: kept.
    hooked, _, _ = normalise(dict(sent), call_type="track", received_at=NOW, keep_timestamp=True)
    assert hooked["receivedAt"] == "2020-01-01T00:00:00.000Z"


@pytest.mark.parametrize("timestamp", [0, False, {}, [], 1700000000])
def test_a_timestamp_that_is_not_a_string_is_invalid_whatever_its_truthiness(timestamp):
    assert code_of({"userId": "u", "timestamp": timestamp}, "identify") == "invalid_timestamp"
    assert code_of({"userId": "u", "originalTimestamp": timestamp}, "identify") == "invalid_timestamp"


@pytest.mark.parametrize("absent", [None, ""])
def test_a_null_or_empty_timestamp_is_the_receive_time(absent):
    event, _, _ = normalise(
        {"userId": "u", "timestamp": absent, "originalTimestamp": absent}, call_type="identify", received_at=NOW
    )
    assert event["timestamp"] == iso(NOW)


def test_an_empty_sent_at_is_absent_as_an_empty_timestamp_is():
    ts = "2026-11-23T06:33:31.593Z"
    for sent in ("", None):
        event, _, _ = normalise(
            {"userId": "u", "event": "E", "timestamp": ts, "sentAt": sent}, call_type="track", received_at=NOW
        )
        assert event["timestamp"] == ts  # no sentAt: the device time stands
        event, _, _ = normalise(
            {"userId": "u", "event": "E", "timestamp": ts}, call_type="track", received_at=NOW, sent_at=sent
        )
        assert event["timestamp"] == ts
    # Through a webhook an empty timestamp is the receive time too, not an error.
    event, _, _ = normalise(
        {"userId": "u", "event": "E", "timestamp": ""}, call_type="track", received_at=NOW, keep_timestamp=True
    )
    assert event["timestamp"] == iso(NOW)


def _reference_timestamp(received: datetime, sent: str, original: str) -> str | None:
    """Segment's skew correction through datetime, as normalise computed it before it had
    an integer path; None when the result leaves datetime's range."""
    try:
        return iso(received - (datetime.fromisoformat(sent) - datetime.fromisoformat(original)))
    except OverflowError:
        return None


def test_a_batch_s_skew_correction_matches_the_datetime_arithmetic():
    """The integer path (toISOString device times against the batch's sentAt) gives the
    characters the datetime path gives, or the same out-of-range refusal."""
    rng = random.Random(11)
    span = 315537897599999999  # microseconds from year 1 to the end of 9999

    def instant(near: datetime | None = None) -> datetime:
        if near is not None and rng.random() < 0.8:
            return near + timedelta(microseconds=rng.randrange(-(10**11), 10**11))
        return datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(0, span))

    for n in range(3000):
        received = instant()
        if n % 2:
            received = received.replace(microsecond=received.microsecond // 1000 * 1000)  # as the clock gives
        sent_dt, original_dt = instant(received), instant(received)
        # sentAt in any ISO form; the device time in toISOString form (the integer path)
        sent = sent_dt.isoformat() if n % 3 else iso(sent_dt)
        original = iso(original_dt)
        expected = _reference_timestamp(received, sent, original)
        item = {"userId": "u", "event": "E", "timestamp": original}
        envelope = Envelope(received, sent_at=sent)
        if expected is None:
            with pytest.raises(Invalid) as exc:
                normalise(dict(item), call_type="track", envelope=envelope)
            assert exc.value.code == "invalid_timestamp"
            continue
        event, _, _ = normalise(dict(item), call_type="track", envelope=envelope)
        assert (event["timestamp"], event["originalTimestamp"], event["sentAt"]) == (expected, original, sent)
