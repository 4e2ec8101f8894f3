"""The key -> region registry: a Segment write key belongs to one Segment source in one
region, and Segment silently drops what is sent with it anywhere else, so the config
refuses, loudly, what Segment would drop: one key in two regions (sources and destinations
alike), a destination pointed at the other region's ingestion host, a wrong-region 403 that
would point a client there, and one event sent twice under one messageId."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main as cli_main
from bridge.config.model import build_config
from tests.config.conftest import error_of
from tests.e2e.harness import EU_WRITE_KEY, SEGMENT_OUT_KEY, WRITE_KEY

SEGMENT_PROD = 2  # destinations[2] in config_dict: segment-prod, region us
EU_WEB = 1  # sources[1] in config_dict: eu-web, region eu
STREAMS = 2  # sources[2] in config_dict: streams-main, data center 01 (us)


def segment_destination(raw: dict[str, Any], name: str, **overrides: Any) -> dict[str, Any]:
    """Another Segment destination, like segment-prod, appended to the config."""
    dest = {**copy.deepcopy(raw["destinations"][SEGMENT_PROD]), "name": name, **overrides}
    raw["destinations"].append(dest)
    return dest


def keys_in(text: str) -> list[str]:
    return [k for k in (WRITE_KEY, EU_WRITE_KEY, SEGMENT_OUT_KEY) if k in text]


# -- defect 1: one registry over every Segment write key ----------------------------------


def test_the_same_key_for_a_us_and_an_eu_destination_and_an_eu_source_fails_check(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report's config: `bridge check` said ok, and every event the us destination sent
    with the EU key would have been dropped by Segment."""
    raw["destinations"][SEGMENT_PROD]["write_key"] = EU_WRITE_KEY  # us, like segment-prod
    segment_destination(raw, "segment-eu", write_key=EU_WRITE_KEY, region="eu")
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "destinations[2].write_key: this write key is also sources[1]'s ('eu-web'), in region eu" in err
    assert "a write key belongs to one region" in err and "(this one is in region us)" in err
    message = error_of(raw)  # unredacted: the error itself never holds the key
    assert message.startswith("destinations[2].write_key:") and not keys_in(message)


def test_one_key_on_destinations_of_two_regions_is_refused(raw: dict[str, Any]) -> None:
    segment_destination(raw, "segment-eu", region="eu")  # segment-prod's key, region eu
    message = error_of(raw)
    assert message.startswith(
        "destinations[3].write_key: this write key is also destinations[2]'s ('segment-prod'), in region us; "
        "a write key belongs to one region"
    ), message
    assert not keys_in(message)


def test_a_source_key_reused_by_a_destination_of_the_other_region_is_refused(raw: dict[str, Any]) -> None:
    raw["destinations"][SEGMENT_PROD]["write_key"] = WRITE_KEY  # sources[0] 'web' is us
    raw["destinations"][SEGMENT_PROD]["region"] = "eu"
    raw["sources"][STREAMS]["data_center"] = "02"  # keep the streams route within eu
    message = error_of(raw)
    assert message.startswith(
        "destinations[2].write_key: this write key is also sources[0]'s ('web'), in region us;"
    ), message
    assert "(this one is in region eu)" in message and not keys_in(message)


def test_one_key_on_sources_of_two_regions_names_both_regions(raw: dict[str, Any]) -> None:
    raw["sources"][EU_WEB]["write_key"] = WRITE_KEY
    message = error_of(raw)
    assert message.startswith("sources[1].write_key: this write key is also sources[0]'s ('web'), in region us;")
    assert not keys_in(message)


def test_one_key_on_two_destinations_of_one_region_is_refused(raw: dict[str, Any]) -> None:
    """Both would send to one Segment source, which keeps one copy of each event (same
    messageId), and each would spend its own share of the workspace's rate limit."""
    segment_destination(raw, "segment-copy")
    raw["sources"].append({**copy.deepcopy(raw["sources"][STREAMS]), "name": "streams-other", "to": ["segment-copy"]})
    message = error_of(raw)
    assert message.startswith("destinations[3].write_key: this write key is also destinations[2]'s ('segment-prod');")
    assert "Route every source that should reach it to one destination" in message and not keys_in(message)


def test_a_source_and_a_destination_of_one_region_may_share_a_key(raw: dict[str, Any]) -> None:
    """Streams relayed into the very Segment source whose Webhooks destination posts to
    the bridge: one Segment source, one key, one region."""
    raw["destinations"][SEGMENT_PROD]["write_key"] = WRITE_KEY  # 'web' is us, as is segment-prod
    cfg = build_config(raw)
    assert cfg.sources[0].region == cfg.destinations[SEGMENT_PROD].region == "us"


def test_a_key_shared_by_a_source_and_a_destination_is_still_one_destinations(raw: dict[str, Any]) -> None:
    """The check compares a key with every earlier use, not only its first (the source)."""
    raw["destinations"][SEGMENT_PROD]["write_key"] = WRITE_KEY
    segment_destination(raw, "segment-copy")
    message = error_of(raw)
    assert message.startswith("destinations[3].write_key: this write key is also destinations[2]'s ('segment-prod');")
    assert not keys_in(message)


def test_keys_are_compared_exactly(raw: dict[str, Any]) -> None:
    """Write keys are case-sensitive: two keys that differ only in case are two sources."""
    raw["destinations"][SEGMENT_PROD]["write_key"] = WRITE_KEY.upper()
    raw["destinations"][SEGMENT_PROD]["region"] = "eu"
    raw["sources"][STREAMS]["data_center"] = "02"
    assert build_config(raw).destinations[SEGMENT_PROD].region == "eu"


# -- defect 2: a destination's base_url on the other region's Segment host ----------------


@pytest.mark.parametrize(
    ("region", "base_url", "named"),
    [
        ("eu", "https://api.segment.io", "api.segment.io is Segment's US ingestion host, but region is eu"),
        ("eu", "https://API.Segment.io./", "is Segment's US ingestion host, but region is eu"),
        ("eu", "http://api.segment.io:443/v1", "api.segment.io is Segment's US ingestion host"),
        ("us", "https://events.eu1.segmentapis.com", "is Segment's EU ingestion host, but region is us"),
    ],
)
def test_a_base_url_on_the_other_regions_host_is_refused(
    raw: dict[str, Any], region: str, base_url: str, named: str
) -> None:
    raw["destinations"][SEGMENT_PROD].update(region=region, base_url=base_url)
    raw["sources"][STREAMS]["allow_cross_region"] = True  # only the host is under test
    message = error_of(raw)
    assert message.startswith("destinations[2].base_url:") and named in message, message
    assert "Segment silently drops" in message and not keys_in(message)


@pytest.mark.parametrize(
    ("region", "base_url"),
    [
        ("us", "https://api.segment.io"),  # the region's own host, spelt out
        ("eu", "https://events.eu1.segmentapis.com/"),
        ("eu", "http://127.0.0.1:8090"),  # a stand-in
        ("eu", "https://segment-proxy.internal/eu"),  # a proxy
    ],
)
def test_the_regions_own_host_and_custom_hosts_are_allowed(raw: dict[str, Any], region: str, base_url: str) -> None:
    raw["destinations"][SEGMENT_PROD].update(region=region, base_url=base_url)
    raw["sources"][STREAMS]["allow_cross_region"] = True
    assert build_config(raw).destinations[SEGMENT_PROD].region == region


# -- defect 2b: server.region_hosts naming the other region's Segment host -----------------
# The bridge's wrong-region 403 tells a client where its key's region is served: a host of
# the other region there would have Segment drop the client's data, silently.


@pytest.mark.parametrize(
    ("hosts", "where", "named"),
    [
        ({"eu": "https://api.segment.io"}, "server.region_hosts.eu", "api.segment.io is Segment's US ingestion host"),
        ({"eu": "api.segment.io"}, "server.region_hosts.eu", "api.segment.io is Segment's US ingestion host"),
        ({"eu": "https://API.Segment.io./v1"}, "server.region_hosts.eu", "is Segment's US ingestion host"),
        (
            {"us": "events.eu1.segmentapis.com"},
            "server.region_hosts.us",
            "events.eu1.segmentapis.com is Segment's EU ingestion host",
        ),
    ],
)
def test_a_region_host_on_the_other_regions_segment_host_is_refused(
    raw: dict[str, Any], hosts: dict[str, str], where: str, named: str
) -> None:
    raw["server"]["region_hosts"] = hosts
    message = error_of(raw)
    region = where.rsplit(".", 1)[1]
    assert message.startswith(f"{where}: ") and named in message, message
    assert f"clients whose write key is in region {region}" in message
    assert "Segment silently drops" in message


def test_region_hosts_and_segment_base_urls_are_judged_by_one_rule(raw: dict[str, Any]) -> None:
    """The same wrong host gets the same verdict, in the same words, in either place."""
    raw["destinations"][SEGMENT_PROD].update(region="eu", base_url="https://api.segment.io")
    raw["sources"][STREAMS]["allow_cross_region"] = True
    for_destination = error_of(raw).split(": ", 1)[1]
    raw["destinations"][SEGMENT_PROD].pop("base_url")
    raw["server"]["region_hosts"] = {"eu": "https://api.segment.io"}
    for_region_host = error_of(raw).split(": ", 1)[1]
    assert for_destination.split(", but ")[0] == for_region_host.split(", but ")[0]
    assert for_destination.split("; ", 1)[1] == for_region_host.split("; ", 1)[1]


def test_both_regions_naming_one_host_is_refused(raw: dict[str, Any]) -> None:
    """A bridge's own host given for both regions: the 403 would send a client back to it."""
    raw["server"]["region_hosts"] = {"us": "https://bridge.example.com", "eu": "bridge.example.com/"}
    message = error_of(raw)
    assert message.startswith("server.region_hosts: us and eu both name 'bridge.example.com/'"), message


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "expected the URL or host a Segment client of this region should send to, got ''"),
        ("  ", "expected the URL or host a Segment client of this region should send to, got '  '"),
        (None, "expected the URL or host a Segment client of this region should send to, got None"),
        (443, "expected the URL or host a Segment client of this region should send to, got 443"),
        ("ftp://bridge-eu.example.com", "'ftp://bridge-eu.example.com' is not a usable URL or host: must start with"),
        ("https://", "'https://' is not a usable URL or host: has no host"),
        ("bridge eu.example.com", "'bridge eu.example.com' is not a usable URL or host: contains whitespace"),
        ("bridge-eu.example.com:port", "'bridge-eu.example.com:port' is not a usable URL or host: "),
    ],
)
def test_a_region_host_must_be_a_usable_url_or_host(raw: dict[str, Any], value: Any, problem: str) -> None:
    raw["server"]["region_hosts"] = {"eu": value}
    message = error_of(raw)
    assert message.startswith(f"server.region_hosts.eu: {problem}"), message


@pytest.mark.parametrize(
    "hosts",
    [
        {"eu": "https://events.eu1.segmentapis.com"},  # the region's own host, spelt out
        {"eu": "events.eu1.segmentapis.com"},  # as a client's host setting, without a scheme
        {"eu": "https://bridge-eu.example.com"},  # the EU bridge
        {"us": "bridge-us.example.com:8443", "eu": "bridge-eu.example.com:8443"},
        {"us": "https://proxy.example.com/us", "eu": "https://proxy.example.com/eu"},
    ],
)
def test_the_regions_own_host_and_other_bridges_are_allowed_as_region_hosts(
    raw: dict[str, Any], hosts: dict[str, str]
) -> None:
    assert build_config(raw | {"server": {**raw["server"], "region_hosts": hosts}}).server.region_hosts == {
        "us": "https://api.segment.io",
        "eu": "https://events.eu1.segmentapis.com",
        **hosts,
    }


# -- defect 3: one event to two Segment destinations, under one messageId ------------------


def test_a_source_routed_to_two_segment_destinations_is_refused(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Segment dedupes on messageId across sources and workspaces, and the mapping gives
    every copy of a Streams event its event_uuid: the second copy would be dropped."""
    segment_destination(raw, "segment-b", write_key="seg_other_key_5566")
    raw["sources"][STREAMS]["to"] = ["segment-prod", "segment-b"]
    message = error_of(raw)
    assert message.startswith(
        "sources[2].to[1]: source 'streams-main' is routed to two Segment destinations, 'segment-prod' and 'segment-b'"
    ), message
    assert "deduplicates on messageId across all its sources and workspaces" in message
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["check", "--config", str(path)]) == 2
    assert "routed to two Segment destinations" in capsys.readouterr().err


def test_two_sources_may_each_feed_their_own_segment_destination(raw: dict[str, Any]) -> None:
    segment_destination(raw, "segment-b", write_key="seg_other_key_5566")
    raw["sources"].append({**copy.deepcopy(raw["sources"][STREAMS]), "name": "streams-other", "to": ["segment-b"]})
    cfg = build_config(raw)
    assert [s.to for s in cfg.sources[STREAMS:]] == [("segment-prod",), ("segment-b",)]


def test_a_destination_listed_twice_in_one_route_is_refused(raw: dict[str, Any]) -> None:
    """Each entry makes a job: every event would go out twice."""
    raw["sources"][0]["to"] = ["moengage-main", "moengage-main"]
    message = error_of(raw)
    assert message == "sources[0].to[1]: 'moengage-main' is listed twice; every event would be delivered to it twice"
