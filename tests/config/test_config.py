from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config.loader import substitute_env
from bridge.config.model import (
    DeliveryConfig,
    GuardConfig,
    MappingsConfig,
    RetryConfig,
    ServerConfig,
    StoreConfig,
    build_config,
    load_config,
    parse_rate,
)
from bridge.destinations.base import ConfigError
from bridge.destinations.moengage.destination import MoEngageDestination
from bridge.destinations.segment.destination import SegmentDestination
from bridge.sandbox import sandbox_env
from tests.config.conftest import error_of
from tests.e2e.harness import config_dict


def test_the_delete_user_bucket_is_configurable_like_the_others(raw: dict[str, Any]) -> None:
    raw["destinations"][0]["rate_limits"] = {"delete": "3000/min"}
    assert build_config(raw).destinations[0].rate_limits == {"delete": 50.0}


def test_the_track_device_bucket_is_configurable_like_the_others(raw: dict[str, Any]) -> None:
    raw["destinations"][0]["rate_limits"] = {"devices": "6000/min"}
    assert build_config(raw).destinations[0].rate_limits == {"devices": 100.0}


def test_a_full_config_builds(raw: dict[str, Any]) -> None:
    cfg = build_config(raw)
    assert [s.name for s in cfg.sources] == ["web", "eu-web", "streams-main"]
    assert cfg.sources[2].region == "us" and cfg.sources[1].region == "eu"
    assert [d.region for d in cfg.destinations] == ["us", "eu", "us"]
    assert cfg.destinations[0].delivery.poll_interval == 0.05


def test_env_substitution_and_defaults(tmp_path: Path) -> None:
    text, missing = substitute_env("a: ${A}\nb: ${B:-dflt}\nc: ${C}", {"A": "1"})
    assert text == 'a: 1\nb: dflt\nc: ""' and missing == {"C"}
    path = tmp_path / "b.yaml"
    path.write_text('server: {port: "${PORT}"}\nmappings: {dir: "${DIR:-mappings}"}\n')
    with pytest.raises(ConfigError, match=r"server.port: expected an integer"):
        load_config(path, {"PORT": "abc"})


def test_references_in_comments_are_left_alone() -> None:
    text = "# set ${SECRET} in the environment\nkey: ${KEY} # or ${OTHER}\nurl: http://h/a#${FRAG}\n"
    out, missing = substitute_env(text, {"FRAG": "f"})
    assert out == '# set ${SECRET} in the environment\nkey: "" # or ${OTHER}\nurl: http://h/a#f\n'
    assert missing == {"KEY"}  # only the real one is reported unset
    assert substitute_env('a: "x # ${Q}"', {"Q": 'q"'})[0] == 'a: "x # q\\""'  # a '#' in quotes is text
    # The sandbox gives placeholders to the same references: none for comments or defaults.
    assert set(sandbox_env("a: ${A}\nb: ${B:-x}\n# ${C}\n")) >= {"A"}
    assert not {"B", "C"} & (set(sandbox_env("a: ${A}\nb: ${B:-x}\n# ${C}\n")) - set(os.environ))


def test_references_in_block_scalars_are_text_whatever_precedes_them() -> None:
    """In a block scalar '#' and quotes are text: the reference is substituted, as is."""
    text = 'a: |\n  it\'s # ${X}\n  "q" ${Y}\nb: \'${X}\'\nc: "${Y}" # ${Z}\n'
    out, missing = substitute_env(text, {"X": "v'q", "Y": 'w"'})
    assert out == "a: |\n  it's # v'q\n  \"q\" w\"\nb: 'v''q'\nc: \"w\\\"\" # ${Z}\n"
    assert missing == set()  # the commented ${Z} is not asked for
    assert yaml.safe_load(out) == {"a": 'it\'s # v\'q\n"q" w"\n', "b": "v'q", "c": 'w"'}
    # A reference in a flow sequence is scanned as the plain text it stands for (`${`
    # alone would open a mapping there).
    assert substitute_env("a: [${A}, b]", {"A": "1"}) == ("a: [1, b]", set())


def test_unknown_keys_are_errors_with_suggestions(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["server"]["regoin"] = "us"
    assert error_of(bad) == "server.regoin: unknown key (did you mean 'region'?)"
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["delivery"]["batchsize"] = 5
    assert error_of(bad) == "destinations[0].delivery.batchsize: unknown key (did you mean 'batch_size'?)"
    bad = copy.deepcopy(raw)
    bad["sources"][0]["webhook_secrt"] = "x"
    assert "sources[0].webhook_secrt: unknown key" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["colour"] = 1
    assert error_of(bad).startswith("colour: unknown key")


def test_an_unknown_destination_key_is_judged_against_every_key_a_destination_takes(raw: dict[str, Any]) -> None:
    """A typo of a key every destination takes (read by the engine, not by the kind) is
    suggested, and a key like none lists the common keys too, not the kind's alone."""
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["delivry"] = {}
    assert error_of(bad) == "destinations[0].delivry: unknown key (did you mean 'delivery'?)"
    bad = copy.deepcopy(raw)
    bad["destinations"][1]["mapping_option"] = {}
    assert error_of(bad) == "destinations[1].mapping_option: unknown key (did you mean 'mapping_options'?)"
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["api_kee"] = "x"  # the kind's own keys are suggested as before
    assert error_of(bad) == "destinations[0].api_kee: unknown key (did you mean 'api_key'?)"
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["zzz"] = 1
    message = error_of(bad)
    assert message.startswith("destinations[0].zzz: unknown key (a moengage destination takes "), message
    for key in ("mapping", "mapping_options", "delivery", "retry", "guard", "rate_limits", "workspace_id", "api"):
        assert f" {key}," in message or f" {key})" in message, (key, message)


def _node(raw: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    node: Any = raw
    for step in path:
        node = node[step]
    return node


@pytest.mark.parametrize(
    ("path", "key", "typo"),
    [
        (("sources", 0), "name", "nmae"),
        (("sources", 0), "kind", "knid"),
        (("sources", 0), "write_key", "write_kye"),
        (("sources", 2), "data_center", "datacenter"),
        (("sources", 2), "auth", "auht"),
        (("sources", 2, "auth"), "type", "typ"),
        (("sources", 2, "auth"), "username", "usernme"),
        (("sources", 2, "auth"), "password", "pasword"),
        (("destinations", 0), "name", "nmae"),
        (("destinations", 0), "kind", "knid"),
        (("destinations", 0), "mapping", "maping"),
    ],
)
def test_a_misspelt_required_key_is_named_as_unknown_not_reported_missing(
    raw: dict[str, Any], path: tuple[str | int, ...], key: str, typo: str
) -> None:
    """`pasword: x` was "auth.password: is required": the key the file does give, misspelt,
    went unnamed, as did the hint that finds it."""
    node = _node(raw, path)
    node[typo] = node.pop(key)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    assert error_of(raw) == f"{where}.{typo}: unknown key (did you mean {key!r}?)"


def test_a_misspelt_oauth2_key_is_named_beside_a_key_close_to_it(raw: dict[str, Any]) -> None:
    """client_id and client_secret are alike: the one given is no misspelling of the other."""
    raw["sources"][2]["auth"] = {"type": "oauth2", "client_secret": "cs-123456", "clientid": "moengage"}
    assert error_of(raw) == "sources[2].auth.clientid: unknown key (did you mean 'client_id'?)"
    raw["sources"][2]["auth"] = {"type": "oauth2", "client_secret": "cs-123456"}
    assert error_of(raw) == "sources[2].auth.client_id: is required"


def test_a_streams_source_without_a_data_center_is_told_it_is_required(raw: dict[str, Any]) -> None:
    del raw["sources"][2]["data_center"]  # was "must be one of ..., got None"
    assert error_of(raw).startswith("sources[2].data_center: is required")


@pytest.mark.parametrize(
    ("section", "key", "default"),
    [("store", "url", "sqlite:///var/bridge.db"), ("server", "host", "127.0.0.1"), ("server", "region", "us")],
)
def test_an_empty_value_is_refused_rather_than_taken_for_the_default(
    raw: dict[str, Any], section: str, key: str, default: str
) -> None:
    """Most often a ${VAR} that is empty or unset: `store.url: ${DATABASE_URL}` taken as
    the default put each node of a PostgreSQL deployment on a SQLite file of its own."""
    raw.setdefault(section, {})[key] = ""
    assert error_of(raw) == (
        f"{section}.{key}: is empty; leave the key out to take its default ({default!r})"
        " (it is empty: is its environment variable set?)"
    )
    del raw[section][key]
    assert build_config(raw) is not None  # left out: the default, as before


def test_precise_type_and_value_errors(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["server"]["region"] = "apac"
    assert "server.region: must be one of us, eu; got 'apac'" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["sources"][0]["write_key"] = ""
    assert error_of(bad) == "sources[0].write_key: is required (it is empty: is its environment variable set?)"
    bad = copy.deepcopy(raw)
    bad["sources"][0]["to"] = ["moengage-mian"]
    assert "no destination named 'moengage-mian' (did you mean 'moengage-main'?)" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["data_center"] = "07"
    assert "destinations[0]" in error_of(bad) and "data_center" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["rate_limits"] = {"events": "30000/min", "bogus": 1}
    assert error_of(bad).startswith("destinations[0].rate_limits.bogus: unknown bucket; moengage has ")
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["retry"] = {"retryable_statuses": [500, "x"]}
    assert error_of(bad) == (
        'destinations[0].retry.retryable_statuses[1]: expected an HTTP status from 300 to 599, got the string "x"'
    )
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["retry"] = {"pause_statuses": "401"}
    assert error_of(bad) == (
        'destinations[0].retry.pause_statuses: expected a list of HTTP statuses from 300 to 599, got the string "401"'
    )
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["retry"] = {"retryable_statuses": [401, 503], "pause_statuses": [401, 403]}
    assert error_of(bad) == (
        "destinations[0].retry.pause_statuses[0]: 401 is also listed in retryable_statuses; "
        "a status is one or the other"
    )
    # A 2xx is always a delivery: listed, it would be ignored while the config said otherwise.
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["retry"] = {"retryable_statuses": [503, 200, 204]}
    assert error_of(bad).startswith(
        "destinations[0].retry.retryable_statuses[1]: 200 cannot be listed: a 2xx answer is a delivery"
    )
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["retry"] = {"pause_statuses": [101]}
    assert error_of(bad).startswith("destinations[0].retry.pause_statuses[0]: 101 cannot be listed")
    bad = copy.deepcopy(raw)
    bad["sources"][2]["allow_ips"] = ["not-an-ip"]
    assert "sources[2].allow_ips[0]: not an IP address or CIDR" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["server"]["trusted_proxies"] = ["10.0.0.0/8", "lb.internal"]
    assert "server.trusted_proxies[1]: not an IP address or CIDR" in error_of(bad)


def test_names_and_keys_must_be_unique(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["sources"][1]["write_key"] = bad["sources"][0]["write_key"]
    bad["sources"][1]["region"] = "us"  # in another region it is the region error (test_segment_keys)
    assert "the same write key is used by 'web' (sources[0])" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["destinations"][1]["name"] = "moengage-main"
    assert "'moengage-main' is used twice" in error_of(bad)


def test_invalid_yaml_points_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: [8088\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_config(path, {})


@pytest.mark.parametrize(
    ("text", "per_second"), [("10000/min", 10000 / 60), ("1000/s", 1000.0), ("36/hour", 0.01), (5, 5.0)]
)
def test_rates(text: Any, per_second: float) -> None:
    assert parse_rate(text, "x") == pytest.approx(per_second)


def test_secrets_are_collected_for_redaction(raw: dict[str, Any]) -> None:
    cfg = build_config(raw)
    secrets = set(cfg.secrets())
    for value in (
        "wk_live_4f9a8b7c6d5e",
        "whsec_9f8e7d6c5b4a",
        "moe_api_key_5566778899",
        "seg_out_key_0011223344",
        "streams-pass-7788",
        "admin-token-abcdef123456",
    ):
        assert value in secrets


def test_env_values_are_escaped_for_their_quoting(tmp_path: Path) -> None:
    tricky = "pa\"ss\\word#1 'x'"
    path = tmp_path / "q.yaml"
    path.write_text(
        'server: {host: "${HOST}"}\n'
        "sources:\n"
        '  - {name: web, kind: segment, write_key: "${KEY}", to: [moe]}\n'
        "destinations:\n"
        "  - {name: moe, kind: moengage, workspace_id: 'W${SUFFIX}', api_key: '${KEY}', data_center: \"01\",\n"
        "     mapping: segment-to-moengage}\n"
    )
    cfg = load_config(path, {"HOST": "127.0.0.1", "KEY": tricky, "SUFFIX": "it's"})
    assert cfg.sources[0].write_key == tricky
    client = cfg.destinations[0].client
    assert isinstance(client, MoEngageDestination)
    assert client.api_key == tricky
    assert client.workspace_id == "Wit's"


def test_store_url_password_is_a_secret(raw: dict[str, Any]) -> None:
    raw["store"]["url"] = "postgresql://bridge:s3cret-pw@db:5432/bridge"
    assert "s3cret-pw" in build_config(raw).secrets()


def test_mapping_commands_default_to_the_configured_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    broken = tmp_path / "maps"
    broken.mkdir()
    (broken / "bad.yaml").write_text("source_format: segment\ndestination_kind: moengage\nrulez: []\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"mappings: {{dir: {broken}}}\n")
    assert main(["mappings", "check", "--config", str(config)]) == 1
    assert "bad.yaml:3:1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "url",
    [
        "htp://proxy:Sup3rS3cretPw@proxy.internal",  # a scheme typo: urlsplit finds no user:password
        "http//proxy:Sup3rS3cretPw@proxy.internal",
        "proxy:Sup3rS3cretPw@proxy.internal",  # no scheme at all
        "https://proxy:pa/Sup3rS3cretPw@proxy.internal",  # a '/' in the password ends the host early
    ],
)
def test_a_mistyped_base_url_with_a_password_is_refused_without_quoting_it(raw: dict[str, Any], url: str) -> None:
    """The message quoted the value whenever urlsplit did not see user:password@ in it,
    and printed the password (the CLI's redaction only knows a URL's userinfo as
    scheme://user:password@, and a password without '/')."""
    raw["destinations"][0]["base_url"] = url
    message = error_of(raw)
    assert "must not contain user:password@" in message, message
    assert "S3cret" not in message, message
    raw["destinations"][0]["base_url"] = "https://api-01.moengage.com"
    raw["server"]["region_hosts"] = {"eu": url}
    message = error_of(raw)
    assert message.startswith("server.region_hosts.eu: the value is not a usable URL or host"), message
    assert "S3cret" not in message, message


def test_lease_must_outlast_two_request_timeouts(raw: dict[str, Any]) -> None:
    raw["destinations"][0]["delivery"] = {"lease_seconds": 60, "request_timeout": 30}
    assert "lease_seconds: must be more than twice delivery.request_timeout (60 <= 2 x 30)" in error_of(raw)


def test_destination_urls_and_drain_are_checked(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["destinations"][0]["base_url"] = "http://user:pw@proxy.internal"
    assert "must not contain user:password@" in error_of(bad) and "pw" not in error_of(bad).split("@")[0][-3:]
    bad = copy.deepcopy(raw)
    bad["server"]["shutdown_timeout"] = 10
    bad["server"]["drain_seconds"] = 10
    assert "server.drain_seconds: must be less than shutdown_timeout" in error_of(bad)
    bad = copy.deepcopy(raw)
    bad["store"]["url"] = "mysql://bridge:s3cret@db/bridge"
    assert error_of(bad).startswith("store.url: unknown store URL scheme 'mysql'") and "s3cret" not in error_of(bad)


@pytest.mark.parametrize(
    ("prefix", "section"),
    [
        ("server.", ServerConfig),
        ("store.", StoreConfig),
        ("mappings.", MappingsConfig),
        ("destinations[].delivery.", DeliveryConfig),
        ("destinations[].retry.", RetryConfig),
        ("destinations[].guard.", GuardConfig),
    ],
)
def test_the_readme_documents_every_config_key(prefix: str, section: type) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    missing = [f.name for f in dataclasses.fields(section) if prefix + f.name not in documented]
    assert not missing, f"README's configuration table lacks {', '.join(prefix + m for m in missing)}"


def test_idle_timeout_outlasts_load_balancers_and_must_be_positive(raw: dict[str, Any]) -> None:
    assert build_config(copy.deepcopy(raw)).server.idle_timeout == 620.0
    good = copy.deepcopy(raw)
    good["server"]["idle_timeout"] = 12.5
    assert build_config(good).server.idle_timeout == 12.5
    for value in (0, -1, "soon"):
        bad = copy.deepcopy(raw)
        bad["server"]["idle_timeout"] = value
        assert error_of(bad).startswith("server.idle_timeout:"), error_of(bad)


def test_a_status_made_retryable_leaves_the_default_pause_list(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["destinations"][0]["retry"] = {"retryable_statuses": [401, 503]}
    retry = build_config(raw).destinations[0].retry
    assert 401 in retry.retryable_statuses and retry.pause_statuses == frozenset({403, 409, 415})


def test_segment_destinations_also_retry_410_and_460_as_segments_clients_do(tmp_path: Path) -> None:
    cfg = build_config(config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2"))
    by_kind = {d.kind: d.retry.retryable_statuses for d in cfg.destinations}
    assert {410, 460} <= by_kind["segment"] and not {410, 460} & by_kind["moengage"]
    assert {408, 429, 500, 503} <= by_kind["segment"] & by_kind["moengage"]


@pytest.mark.parametrize("value", [0, -5])
def test_a_store_size_limit_below_one_byte_is_refused_by_check(raw: dict[str, Any], value: int) -> None:
    # The store refused it only when `bridge serve` opened it, naming store.url; `bridge check`
    # said ok.
    raw["store"]["max_bytes"] = value
    assert error_of(raw) == f"store.max_bytes: must be at least 1 (leave it out for no limit), got {value}"
    raw["store"]["max_bytes"] = 1
    assert build_config(raw).store.max_bytes == 1


def test_a_guard_needing_more_outcomes_than_its_window_is_refused(raw: dict[str, Any]) -> None:
    # The window holds at most `window` outcomes: with min_events above it the guard never trips.
    raw["destinations"][0]["guard"] = {"window": 200, "min_events": 300}
    assert error_of(raw).startswith("destinations[0].guard.min_events: must be at most guard.window (300 > 200)")
    raw["destinations"][0]["guard"] = {"window": 50, "min_events": 50}
    assert build_config(raw).destinations[0].guard.min_events == 50


def test_a_guard_window_below_the_default_min_events_names_the_window(raw: dict[str, Any]) -> None:
    # `window: 10` alone: the error named min_events, a key the config never set.
    raw["destinations"][0]["guard"] = {"window": 10}
    assert error_of(raw).startswith(
        "destinations[0].guard.window: must be at least guard.min_events (10 < 20, its default)"
    )
    # A disabled guard judges nothing: its window and min_events cannot contradict each other.
    raw["destinations"][0]["guard"] = {"enabled": False, "window": 10}
    assert build_config(raw).destinations[0].guard.window == 10


def test_a_base_delay_above_max_delay_is_refused(raw: dict[str, Any]) -> None:
    # Each backoff is capped at max_delay: a larger base_delay would be silently ignored.
    raw["destinations"][0]["retry"] = {"base_delay": 400, "max_delay": 300}
    assert error_of(raw).startswith("destinations[0].retry.base_delay: must be at most retry.max_delay (400 > 300)")
    # max_delay alone, below base_delay's default: the key set is the one named.
    raw["destinations"][1]["retry"] = {"max_delay": 0.5}
    del raw["destinations"][0]["retry"]
    assert error_of(raw).startswith(
        "destinations[1].retry.max_delay: must be at least retry.base_delay (0.5 < 1, its default)"
    )
    raw["destinations"][1]["retry"] = {"base_delay": 2.5, "max_delay": 2.5}
    assert build_config(raw).destinations[1].retry.base_delay == 2.5


@pytest.mark.parametrize(
    ("place", "value", "message"),
    [
        (("server", "port"), 80.5, "server.port: expected an integer, got the number 80.5"),
        (
            ("sources", 0, "allow_cross_region"),
            1,
            "sources[0].allow_cross_region: expected true or false, got the integer 1",
        ),
        (
            ("sources", 0, "write_key"),
            datetime.date(2024, 1, 1),  # what YAML makes of an unquoted 2024-01-01
            "sources[0].write_key: expected a string, got a date (quote it to make it a string)",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_named_in_words(
    raw: dict[str, Any], place: tuple[str | int, ...], value: object, message: str
) -> None:
    # Was Python's type name: "expected an integer, got float", "expected true or false, got int".
    parent: Any = raw
    for key in place[:-1]:
        parent = parent[key]
    parent[place[-1]] = value
    assert error_of(raw) == message


def test_a_destination_string_setting_reads_a_number_as_its_text_as_a_source_does(tmp_path: Path) -> None:
    # Was "must be a string, got int" for a destination, while a source's write_key took it.
    path = tmp_path / "b.yaml"
    path.write_text(
        "sources:\n"
        "  - {name: web, kind: segment, write_key: 4242, region: us, to: [moe, seg]}\n"
        "destinations:\n"
        "  - {name: moe, kind: moengage, workspace_id: 12345, api_key: 678, data_center: 1,\n"
        "     mapping: segment-to-moengage}\n"
        "  - {name: seg, kind: segment, write_key: 9876, region: us, mapping: moengage-to-segment}\n"
    )
    cfg = load_config(path, {})
    moe, seg = (d.client for d in cfg.destinations)
    assert isinstance(moe, MoEngageDestination) and isinstance(seg, SegmentDestination)
    assert (moe.workspace_id, moe.api_key, moe.data_center) == ("12345", "678", "01")
    assert (seg.write_key, cfg.sources[0].write_key) == ("9876", "4242")


def test_a_string_setting_spelt_as_a_yaml_number_other_than_its_digits_is_the_text_written(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted 00123456 as octal (42798), 1_234 as 1234 and 1:30 as 90:
    # str() of that number sent every delivery with another workspace id or key (Segment
    # answers 200 to a key it does not know and drops the events). An unquoted ${VAR} too.
    path = tmp_path / "b.yaml"
    path.write_text(
        "store: {url: 'sqlite:///b.db', max_bytes: 1_000_000}\n"
        "sources:\n"
        "  - {name: web, kind: segment, write_key: 1:30, region: us, to: [moe, seg]}\n"
        "destinations:\n"
        "  - {name: moe, kind: moengage, workspace_id: 00123456, api_key: ${MOE_KEY}, data_center: 01,\n"
        "     mapping: segment-to-moengage, mapping_options: {anonymous_ids: 0_1}}\n"
        "  - {name: seg, kind: segment, write_key: 1_234, region: us, mapping: moengage-to-segment,\n"
        "     max_batch_events: 0x10}\n"
    )
    cfg = load_config(path, {"MOE_KEY": "0777"})
    moe, seg = (d.client for d in cfg.destinations)
    assert isinstance(moe, MoEngageDestination) and isinstance(seg, SegmentDestination)
    assert (moe.workspace_id, moe.api_key, moe.data_center) == ("00123456", "0777", "01")
    assert (seg.write_key, cfg.sources[0].write_key) == ("1_234", "1:30")
    # Numbers stay numbers, of plain int type where they leave the config.
    assert type(cfg.store.max_bytes) is int and cfg.store.max_bytes == 1_000_000
    assert type(seg.max_batch_events) is int and seg.max_batch_events == 16
    [value] = cfg.destinations[0].mapping_options.values()
    assert type(value) is int and value == 1


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (True, "a boolean"),
        ([1, 2], "a list"),
        ({"id": 1}, "a mapping"),
        (datetime.date(2024, 1, 1), "a date (quote it to make it a string)"),
    ],
)
def test_a_destination_string_setting_of_another_type_is_named_in_words(
    raw: dict[str, Any], value: object, words: str
) -> None:
    # The same words as a source's string setting gets for the same value.
    raw["destinations"][0]["workspace_id"] = value
    assert error_of(raw) == f"destinations[0].workspace_id: expected a string, got {words}"
    raw["sources"][0]["write_key"] = value
    assert error_of(raw) == f"sources[0].write_key: expected a string, got {words}"


def test_a_destination_secret_left_empty_by_an_unset_variable_says_so(tmp_path: Path) -> None:
    # As a source's write_key does: the usual cause is a variable missing from the environment.
    path = tmp_path / "b.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: moe, kind: moengage, workspace_id: '${MOENGAGE_WORKSPACE_ID}', api_key: k,\n"
        '     data_center: "01", mapping: segment-to-moengage}\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, {})
    assert str(exc.value) == (
        "destinations[0].workspace_id: must not be empty (is its environment variable set?); "
        "the file's ${MOENGAGE_WORKSPACE_ID} is unset"
    )


def test_a_mapping_option_the_mapping_never_reads_is_refused(raw: dict[str, Any], tmp_path: Path) -> None:
    # `anonymus_ids: true` was accepted and did nothing: anonymous calls went on being discarded.
    from bridge.mapping import load_mapping_dir
    from bridge.runtime import check_mappings

    shipped = load_mapping_dir(raw["mappings"]["dir"])
    raw["destinations"][0]["mapping_options"] = {"anonymous_ids": True}
    assert check_mappings(build_config(raw), shipped) == []
    raw["destinations"][0]["mapping_options"] = {"anonymus_ids": True}
    assert check_mappings(build_config(raw), shipped) == [
        "destinations[0].mapping_options.anonymus_ids: mapping 'segment-to-moengage' never reads "
        "$options.anonymus_ids (did you mean 'anonymous_ids'?)"
    ]
    # A mapping that reads $options whole may use any key.
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "segment-to-moengage.yaml").write_text(
        "source_format: segment\ndestination_kind: moengage\n"
        "rules:\n  - {name: all, kind: customer, body: {customer_id: $.userId, attributes: $options}}\n"
    )
    mapping = load_mapping_dir(maps)["segment-to-moengage"]
    assert mapping.option_names() is None
    assert check_mappings(build_config(raw), {**shipped, "segment-to-moengage": mapping}) == []


def _oauth2(raw: dict[str, Any], **auth: Any) -> dict[str, Any]:
    raw["sources"][2]["auth"] = {"type": "oauth2", "client_id": "moengage", "client_secret": "cs-123456", **auth}
    return raw


def test_streams_oauth2_auth(raw: dict[str, Any]) -> None:
    auth = build_config(_oauth2(raw)).sources[2].auth
    assert auth is not None
    assert (auth.type, auth.client_id, auth.client_secret, auth.token_ttl) == ("oauth2", "moengage", "cs-123456", 3600)
    assert "cs-123456" in build_config(raw).secrets()
    for ttl in (60, 86400):
        auth = build_config(_oauth2(raw, token_ttl=ttl)).sources[2].auth
        assert auth is not None and auth.token_ttl == ttl


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"client_id": None}, r"sources[2].auth.client_id: is required"),
        ({"client_secret": None}, r"sources[2].auth.client_secret: is required"),
        ({"client_id": ""}, r"sources[2].auth.client_id: is required (it is empty: is its environment variable set?)"),
        ({"token_ttl": 59}, "sources[2].auth.token_ttl: must be at least 60, got 59"),
        ({"token_ttl": 86401}, "sources[2].auth.token_ttl: must be at most 86400, got 86401"),
        ({"token_ttl": "1h"}, "sources[2].auth.token_ttl: expected an integer, got"),
        ({"token_ttl": 600.5}, "sources[2].auth.token_ttl: expected an integer, got"),
        ({"client_secrt": "x"}, "sources[2].auth.client_secrt: unknown key (did you mean 'client_secret'?)"),
        ({"password": "x"}, "sources[2].auth.password: unknown key"),
        ({"type": "oauth"}, "sources[2].auth.type: must be one of basic, header, oauth2, none; got 'oauth'"),
    ],
)
def test_streams_oauth2_auth_errors(raw: dict[str, Any], auth: dict[str, Any], message: str) -> None:
    _oauth2(raw, **auth)
    for key, value in auth.items():
        if value is None:
            del raw["sources"][2]["auth"][key]
    assert message in error_of(raw)


def test_streams_oauth2_secret_from_the_environment(tmp_path: Path, raw: dict[str, Any]) -> None:
    _oauth2(raw, client_secret="${STREAMS_CLIENT_SECRET}")
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    auth = load_config(path, env={"STREAMS_CLIENT_SECRET": "from-env-42"}).sources[2].auth
    assert auth is not None and auth.client_secret == "from-env-42"
    with pytest.raises(ConfigError, match=r"sources\[2\]\.auth\.client_secret: is required"):
        load_config(path, env={})


def test_a_misspelt_mapping_name_gets_a_suggestion(raw: dict[str, Any]) -> None:
    from bridge.mapping import load_mapping_dir
    from bridge.runtime import check_mappings

    shipped = load_mapping_dir(raw["mappings"]["dir"])
    raw["destinations"][0]["mapping"] = "segment-to-moengag"
    assert check_mappings(build_config(raw), shipped)[0] == (
        "destinations[0].mapping: no mapping named 'segment-to-moengag' (did you mean 'segment-to-moengage'?) "
        "(loaded: moengage-to-segment, segment-to-moengage)"
    )


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        # The bad item named by its index and value, not the whole list.
        (
            {"retryable_statuses": [500, 503, 700]},
            "retryable_statuses[2]: 700 is not an HTTP status from 300 to 599",
        ),
        ({"retryable_statuses": [500, 99]}, "retryable_statuses[1]: 99 is not an HTTP status from 300 to 599"),
        (
            {"pause_statuses": [401, "403"]},
            'pause_statuses[1]: expected an HTTP status from 300 to 599, got the string "403"',
        ),
        (
            {"pause_statuses": [401, 403.0]},
            "pause_statuses[1]: expected an HTTP status from 300 to 599, got the number 403.0",
        ),
        (
            {"pause_statuses": [True]},
            "pause_statuses[0]: expected an HTTP status from 300 to 599, got the boolean true",
        ),
        (
            {"pause_statuses": [401, None]},
            "pause_statuses[1]: expected an HTTP status from 300 to 599, got null (nothing)",
        ),
        (
            {"pause_statuses": {"401": True}},
            "pause_statuses: expected a list of HTTP statuses from 300 to 599, got a mapping",
        ),
        # Retried by default (503), so it cannot pause: say which list holds it.
        (
            {"pause_statuses": [401, 503]},
            "pause_statuses[1]: 503 is also retried by default; a status is one or the other "
            "(set retryable_statuses without it)",
        ),
    ],
)
def test_a_bad_status_is_named_by_its_index_and_value(raw: dict[str, Any], retry: dict[str, Any], message: str) -> None:
    raw["destinations"][0]["retry"] = retry
    assert error_of(raw) == f"destinations[0].retry.{message}"


def test_a_bad_item_of_another_list_is_named_by_its_index_and_value(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["sources"][0]["to"] = ["moengage-main", 7]
    assert error_of(bad) == "sources[0].to[1]: expected a non-empty string, got the integer 7"
    bad = copy.deepcopy(raw)
    bad["sources"][0]["to"] = [""]
    assert error_of(bad) == 'sources[0].to[0]: expected a non-empty string, got the string ""'
    # An integer was taken as an address (10 as 0.0.0.10): refused, as no one means that.
    bad = copy.deepcopy(raw)
    bad["sources"][2]["allow_ips"] = ["10.0.0.0/8", 10]
    assert error_of(bad) == (
        "sources[2].allow_ips[1]: expected an IP address or CIDR such as 10.0.0.0/8, got the integer 10"
    )
    bad = copy.deepcopy(raw)
    bad["server"]["trusted_proxies"] = [{"cidr": "10.0.0.0/8"}]
    assert error_of(bad) == (
        "server.trusted_proxies[0]: expected an IP address or CIDR such as 10.0.0.0/8, got a mapping"
    )
