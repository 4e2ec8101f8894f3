"""The shipped mappings, through their fixtures and against the seeds they come from."""

import re
from pathlib import Path

import pytest

from bridge.mapping import Discarded, MapContext, load_mapping_dir
from bridge.mapping.fixtures import run_fixtures
from bridge.sources.streams.spec import normalise as normalise_streams

from .helpers import outputs

ROOT = Path(__file__).resolve().parents[2]
MAPPINGS = ROOT / "mappings"
SEEDS = Path("/work/shared/seeds")


@pytest.fixture(scope="module")
def shipped():
    return load_mapping_dir(MAPPINGS)


def test_all_shipped_fixtures_pass():
    report = run_fixtures(MAPPINGS)
    assert report.ok, report.render()
    per_mapping: dict[str, int] = {}
    for r in report.results:
        per_mapping[r.mapping] = per_mapping.get(r.mapping, 0) + 1
    assert per_mapping["segment-to-moengage"] >= 10
    assert per_mapping["moengage-to-segment"] >= 10


def test_shipped_kinds(shipped):
    assert set(shipped) == {"segment-to-moengage", "moengage-to-segment"}
    s2m, m2s = shipped["segment-to-moengage"], shipped["moengage-to-segment"]
    assert (s2m.source_format, s2m.destination_kind) == ("segment", "moengage")
    assert (m2s.source_format, m2s.destination_kind) == ("moengage_streams", "segment")
    assert s2m.integration_names() == ("MoEngage", "MoEngage (Actions)", "Moengage (Actions)")
    assert m2s.integration_names() == ()
    assert re.fullmatch(r"[0-9a-f]{12}", s2m.version)


def _seed_codes() -> dict[str, str]:
    seed = next(SEEDS.glob("004_*"), None)
    if seed is None:
        pytest.skip("seed 004 is not available")
    lines = [x.strip().rstrip("|").strip() for x in seed.read_text().splitlines()]
    codes = {}
    for i, line in enumerate(lines):
        if re.fullmatch(r"(MOE_[A-Z_]+|SMS_[A-Z]+|NOTIFICATION_[A-Z_]+|n_i_s|USER_[A-Z]+_FLOW)", line):
            codes[line] = lines[i - 1]
    return codes


def test_every_seed_004_code_has_a_name(shipped):
    codes = _seed_codes()
    assert len(codes) >= 30
    m2s = shipped["moengage-to-segment"]
    for code in codes:
        event = {"event_code": code, "event_uuid": f"u-{code}", "event_time": 1580967474, "uid": "c1"}
        (out,) = outputs(m2s.apply(event, MapContext()))
        name = out.body["event"]
        assert name != code, f"{code} has no name"
        # where the Streams table and seed 002 differ, the seed 002 spelling is used
        expected = {"MOE_EMAIL_SPAM": "Email Complained", "MOE_CAMPAIGN_CONTROL_GROUP": "User added to control group"}
        assert name == expected.get(code, codes[code]), code


def test_identity_link_and_key(shipped):
    s2m = shipped["segment-to-moengage"]
    identify = {"type": "identify", "userId": "u1", "traits": {"id": "crm-1"}}
    assert s2m.identity_link(identify) == ("u1", "crm-1")
    assert s2m.identity_link({"type": "identify", "userId": "u1", "traits": {"id": "u1"}}) is None
    assert s2m.identity_link({"type": "group", "userId": "u1", "traits": {"id": "g1"}}) is None
    assert s2m.identity_key({"type": "track", "userId": 5}) == "5"
    assert s2m.identity_key({"type": "track", "anonymousId": "a"}) is None
    assert shipped["moengage-to-segment"].identity_key({"uid": "x"}) is None


def test_an_anonymous_id_is_looked_up_only_when_it_is_a_customer_id(shipped):
    """With anonymous_ids an alias may merge an anonymousId away: its link is looked up, so
    its later anonymous-only calls name the user it was merged into. Otherwise it names no
    MoEngage user, and a lookup would be a wasted store query an event."""
    s2m = shipped["segment-to-moengage"]
    alias = {"type": "alias", "userId": "u1", "previousId": "p1", "anonymousId": "a1"}
    assert s2m.identity_ids(alias) == ["u1", "p1"]
    assert s2m.identity_ids(alias, {"anonymous_ids": False}) == ["u1", "p1"]
    assert s2m.identity_ids(alias, {"anonymous_ids": True}) == ["u1", "p1", "a1"]
    assert s2m.identity_ids({"type": "track", "anonymousId": 7}, {"anonymous_ids": True}) == ["7"]


@pytest.mark.parametrize(
    "bad",
    [
        "unknown",
        "Guest",
        "NULL",
        "none",
        "0",
        "1",
        "-1",
        "-2",
        "2",
        "True",
        "false",
        "id",
        "UID",
        "user_id",
        "userid",
        "customer_id",
        "na",
        "N/A",
        "dummy_seller_code",
        "user_attribute_unique_id",
        "(empty)",  # the literal text: MoEngage lists it quoted, beside "" (reference §1.6)
        "(EMPTY)",
        "x",
        " ",
        "  a  ",
    ],
)
def test_blocklisted_customer_ids(shipped, bad):
    result = shipped["segment-to-moengage"].apply({"type": "track", "userId": bad, "event": "E"}, MapContext())
    assert isinstance(result, Discarded) and result.reason == "invalid_customer_id", (bad, result)


def test_blocklist_applies_to_traits_id_and_links(shipped):
    s2m = shipped["segment-to-moengage"]
    result = s2m.apply({"type": "identify", "userId": "good-user", "traits": {"id": "guest"}}, MapContext())
    assert isinstance(result, Discarded) and result.reason == "invalid_customer_id"
    result = s2m.apply({"type": "track", "userId": "good-user", "event": "E"}, MapContext(linked_id="0"))
    assert isinstance(result, Discarded) and result.reason == "invalid_customer_id"


def test_relayed_event_round_trip_is_a_loop(shipped):
    """What moengage-to-segment emits, fed back into segment-to-moengage, is dropped as a loop."""
    (out,) = outputs(
        shipped["moengage-to-segment"].apply(
            {"event_code": "MOE_EMAIL_OPEN", "event_uuid": "e1", "event_time": 1580967474, "uid": "c1"}, MapContext()
        )
    )
    relayed = dict(out.body)
    relayed.pop("integrations")  # stripped on the way: the context mark still holds
    result = shipped["segment-to-moengage"].apply(relayed, MapContext())
    assert result == Discarded("loop", "")


def test_bad_event_data_never_raises(shipped):
    s2m = shipped["segment-to-moengage"]
    weird = [
        {"type": "track", "userId": "u1", "event": {"not": "a string"}},
        {"type": "track", "userId": "u1", "event": "E", "context": "nope", "properties": [1, 2]},
        {"type": "track", "userId": ["list"], "event": "E"},
        {"type": "page", "userId": "u1", "context": {"timezone": 5, "device": {"type": 7}}, "timestamp": "garbage"},
        {"type": "alias", "userId": "u1"},
        {"type": None},
        [],
    ]
    for event in weird:
        result = s2m.apply(event, MapContext())
        assert result is not None


def relay(m2s, item):
    event, _, _ = normalise_streams(item)
    (out,) = m2s.apply(event, MapContext())
    return out.body


SEED_PUSH = {
    "event_name": "Notification Received Android",
    "event_code": "NOTIFICATION_RECEIVED_MOE",
    "event_uuid": "uuid-push-1",
    "event_time": 1580967474,
    "event_type": "CAMPAIGN_EVENT",
    "event_source": "MOENGAGE",
    "uid": "cust-1",
}


def test_relayed_event_is_kept_out_of_every_moengage_destination_in_segment(shipped):
    """The relay's `integrations` must switch off each name under which Segment addresses a
    MoEngage destination -- the same names the bridge itself honours on the way in
    (segment-to-moengage.yaml `integrations:`). With only {"MoEngage": false}, Segment still
    sends the relayed Streams event to a "MoEngage (Actions)" destination, i.e. back into
    MoEngage (segment-api.md §1: integrations names are case-sensitive and must match;
    the Actions destination is "Moengage (Actions)" / "MoEngage (Actions)")."""
    m2s, s2m = shipped["moengage-to-segment"], shipped["segment-to-moengage"]
    body = relay(m2s, SEED_PUSH)
    missing = [n for n in s2m.integration_names() if body["integrations"].get(n) is not False]
    assert missing == [], f"relayed integrations {body['integrations']} leave on: {missing}"


@pytest.mark.parametrize(
    ("code", "streams_name", "segment_source_name"),
    [
        ("MOE_EMAIL_SPAM", "Email Spam Complained", "Email Complained"),
        ("MOE_CAMPAIGN_CONTROL_GROUP", "User Added to Control Group", "User added to control group"),
    ],
)
def test_campaign_event_named_as_segment_source_even_with_event_name(shipped, code, streams_name, segment_source_name):
    """README: every Streams event is "named as in MoEngage's own Segment source"; the lookup
    says the Segment source's spelling wins for these two codes. Real Streams events always
    carry event_name (seed 004 example and glossary), with the Streams table's spelling, so
    the same MoEngage event gets a different name than without event_name (fixture
    code-email-spam-002-spelling.yaml) and than MoEngage's own Segment source."""
    m2s = shipped["moengage-to-segment"]
    item = {**SEED_PUSH, "event_code": code, "event_name": streams_name, "event_uuid": f"uuid-{code}"}
    without_name = {k: v for k, v in item.items() if k != "event_name"}
    assert relay(m2s, without_name)["event"] == segment_source_name  # holds today
    assert relay(m2s, item)["event"] == segment_source_name
