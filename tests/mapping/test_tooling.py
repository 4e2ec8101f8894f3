"""CLI handlers, fixture runner, translate_events and hot reload."""

import io
import json
import re
import shutil
from pathlib import Path

import pytest

from bridge.mapping import MapContext, load_mapping_dir
from bridge.mapping.cli import main
from bridge.mapping.fixtures import run_fixtures
from bridge.mapping.reload import MappingHolder, MappingSet
from bridge.mapping.translate import InputError, parse_events, translate_events

from .helpers import write

ROOT = Path(__file__).resolve().parents[2]
GOOD = (
    "source_format: segment\ndestination_kind: moengage\n"
    "rules:\n  - name: r\n    kind: customer\n    body: {customer_id: $.userId}\n"
)


@pytest.fixture
def shipped_copy(tmp_path):
    target = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", target)
    return target


def test_check_ok_and_errors(tmp_path, capsys, shipped_copy):
    assert main(["mappings", "check", "--mappings-dir", str(shipped_copy)]) == 0
    out = capsys.readouterr().out
    assert "ok " in out and "segment-to-moengage.yaml" in out
    bad = write(tmp_path / "bad" / "x.yaml", GOOD.replace("kind: customer", "kind: custmer"))
    write(tmp_path / "bad" / "y.yaml", GOOD.replace("rules:", "ruls:"))
    assert main(["mappings", "check", str(bad.parent), str(shipped_copy / "segment-to-moengage.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:5:11: rules[0].kind: moengage has no output kind 'custmer' (did you mean 'customer'?)" in out
    assert "y.yaml:3:1: ruls: unknown key 'ruls'" in out
    assert "3 error(s)" in out  # unknown kind; unknown key ruls + missing rules
    assert main(["mappings", "check", str(tmp_path / "missing.yaml")]) == 1
    assert "no such file or directory" in capsys.readouterr().out


def test_the_walkthrough_quotes_the_error_mappings_check_prints(capsys, shipped_copy):
    # docs/mappings.md walks through adding company_name after created_time, and shows the
    # error a typo gets. Make that typo here: the docs must quote what the tool prints.
    docs = (ROOT / "docs" / "mappings.md").read_text()
    quoted = re.search(r"A typo such as `company_name: \{pth: \.\.\.\}` prints\s+`([^`]+)`", docs)
    assert quoted, "docs/mappings.md no longer shows the typo's error"
    target = shipped_copy / "segment-to-moengage.yaml"
    lines = target.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("created_time:"))
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, indent + "company_name: {pth: $.traits.company.name}\n")
    target.write_text("".join(lines))
    assert main(["mappings", "check", str(target)]) == 1
    printed = capsys.readouterr().out.replace(str(shipped_copy) + "/", "mappings/")
    assert quoted.group(1).removesuffix("...") in printed, (quoted.group(1), printed)


def test_test_command_passes_then_fails_with_a_diff(capsys, shipped_copy):
    assert main(["mappings", "test", "--mappings-dir", str(shipped_copy)]) == 0
    assert " 0 failed" in capsys.readouterr().out
    fixture = shipped_copy / "tests" / "segment-to-moengage" / "group-attributes.yaml"
    text = fixture.read_text()
    wrong = 'attributes: {group_id: "4242", group_industry: banking'
    fixture.write_text(text.replace('attributes: {group_id: "4242", group_industry: retail', wrong))
    assert main(["mappings", "test", "--mappings-dir", str(shipped_copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {fixture}" in out
    assert '    -          "group_industry": "banking"\n' in out
    assert '    +          "group_industry": "retail"\n' in out
    total = len(list((shipped_copy / "tests").glob("*/*.yaml")))
    assert f"{total - 1} passed, 1 failed" in out


def test_fixture_runner_reports_bad_fixtures_and_missing_mappings(tmp_path):
    write(tmp_path / "m.yaml", GOOD)
    write(tmp_path / "tests" / "m" / "no-expect.yaml", "input: {userId: a}\n")
    write(tmp_path / "tests" / "m" / "date.yaml", "input: {userId: ab, at: 2024-01-01}\nexpect: {discarded: x}\n")
    write(tmp_path / "tests" / "m" / "typo.yaml", "input: {}\nexpect: {discard: x}\n")
    write(tmp_path / "tests" / "gone" / "t.yaml", "input: {}\nexpect: {discarded: x}\n")
    write(
        tmp_path / "tests" / "m" / "ok.yaml",
        "input: {userId: ab}\nexpect: {outputs: [{kind: customer, body: {type: customer, customer_id: ab}}]}\n",
    )
    report = run_fixtures(tmp_path)
    assert not report.ok and report.passed == 1
    messages = {Path(r.path).name: r.message for r in report.failed}
    assert messages["no-expect.yaml"] == "fixture is missing 'expect'"
    assert "quote it" in messages["date.yaml"]
    assert "unknown expect keys ['discard']" in messages["typo.yaml"]
    assert messages["t.yaml"] == "no loaded mapping named 'gone'"


def test_a_fixture_with_a_key_given_twice_fails_where_the_second_one_is(tmp_path):
    # With "last one wins" this fixture passed: its first expectation was never looked at.
    write(tmp_path / "m.yaml", GOOD)
    fixture = write(
        tmp_path / "tests" / "m" / "twice.yaml",
        """\
        input: {userId: ab}
        expect:
          discarded: anonymous_user
          outputs: [{kind: customer, body: {type: customer, customer_id: ab}}]
          discarded: no_matching_rule
        """,
    )
    write(tmp_path / "tests" / "m" / "twice-in-event.yaml", "input: {userId: x, userId: ab}\nexpect: {discarded: x}\n")
    # A key a merge overrides is no duplicate.
    write(
        tmp_path / "tests" / "m" / "merged.yaml",
        "base: &b {userId: ab}\ninput: {<<: *b, userId: cd}\n"
        "expect: {outputs: [{kind: customer, body: {type: customer, customer_id: cd}}]}\n",
    )
    report = run_fixtures(tmp_path)
    messages = {Path(r.path).name: r.message for r in report.failed}
    assert set(messages) == {"twice.yaml", "twice-in-event.yaml", "merged.yaml"}
    assert "duplicate key 'discarded'" in messages["twice.yaml"]
    assert f'in "{fixture}", line 5, column 3' in messages["twice.yaml"]
    assert "duplicate key 'userId'" in messages["twice-in-event.yaml"]
    assert "unknown fixture keys ['base']" in messages["merged.yaml"]


def test_translate_command(capsys, shipped_copy, monkeypatch):
    events = [
        {"type": "track", "userId": "u1", "event": "E", "properties": {"a": 1}, "timestamp": "2026-01-01T00:00:00Z"},
        {"type": "track", "anonymousId": "anon", "event": "E"},
        {"type": "track", "event": "E"},  # no user at all: refused at ingest
    ]
    lines = "\n".join(json.dumps(e) for e in events)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# event 0"
    assert out[1] == (
        'event {"type":"event","customer_id":"u1","actions":[{"action":"E","attributes":{"a":1},'
        '"current_time":1767225600}]}'
    )
    assert out[3].startswith("discarded: anonymous_user")
    assert out[5] == "rejected: id_required (track requires userId or anonymousId)"
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(events[1])))
    argv = [
        "translate",
        "--mapping",
        "segment-to-moengage",
        "--mappings-dir",
        str(shipped_copy),
        "--option",
        "anonymous_ids=true",
        "--linked-id",
        "ignored-without-userId",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith('event {"type":"event","customer_id":"ignored-without-userId"')
    monkeypatch.setattr("sys.stdin", io.StringIO("{broken"))
    assert main(["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]) == 1
    assert "line 1: invalid JSON" in capsys.readouterr().err
    assert main(["translate", "--mapping", "nope", "--mappings-dir", str(shipped_copy)]) == 1
    assert "no valid mapping 'nope'" in capsys.readouterr().err
    assert main(["translate", "--mapping", "segment-to-moengag", "--mappings-dir", str(shipped_copy)]) == 1
    assert "no valid mapping 'segment-to-moengag' (did you mean 'segment-to-moengage'?)" in capsys.readouterr().err


def test_translate_takes_a_captured_v1_batch_body(capsys, shipped_copy, monkeypatch):
    """A /v1/batch body as an SDK sent it: its calls are translated as the route takes
    them, with the batch's context merged into each (here the device id)."""
    body = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "timestamp": "2026-01-01T00:00:00Z"},
            {"type": "track", "userId": "u2", "event": "B", "timestamp": "2026-01-01T00:00:00Z"},
        ],
        "context": {"device": {"id": "dev-1"}},
        "sentAt": "2026-01-01T00:00:00Z",
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(body)))
    assert main(["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# event 0" and out[2] == "# event 1", out
    assert out[1].startswith('event {"type":"event","customer_id":"u1","device_id":"dev-1"'), out[1]
    assert out[3].startswith('event {"type":"event","customer_id":"u2","device_id":"dev-1"'), out[3]
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"batch": [], "context": "x"})))
    assert main(["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]) == 0
    assert capsys.readouterr().out == "rejected: context_not_object (the batch's context must be an object)\n"


def test_translate_takes_a_deletion_request(capsys, shipped_copy, monkeypatch):
    """Only the webhook route takes type delete, but a dry run cannot know the route: an
    operator checking the delete rule must see what Delete User would be sent."""
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"type": "delete", "userId": "u9", "messageId": "d-1"})))
    assert main(["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]) == 0
    assert capsys.readouterr().out.splitlines() == ['delete {"identity_type":"customer_id","identity_value":"u9"}']


def test_translate_refuses_an_option_the_mapping_never_reads(capsys, shipped_copy, monkeypatch):
    """As `bridge check` refuses such a mapping_options key: a misspelt --option would not
    apply, and the dry run would answer (here: discarded) as if it had been tried."""
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"type": "track", "anonymousId": "a", "event": "E"})))
    argv = ["translate", "--mapping", "segment-to-moengage", "--mappings-dir", str(shipped_copy)]
    assert main([*argv, "--option", "anonymous_id=true"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: --option anonymous_id: mapping 'segment-to-moengage' never reads $options.anonymous_id"
        " (did you mean 'anonymous_ids'?)\n"
    )


def test_translate_events_is_json_able():
    mapping = load_mapping_dir(ROOT / "mappings")["segment-to-moengage"]
    results = translate_events(
        mapping,
        [{"type": "identify", "userId": "u1", "traits": {"id": "crm-1"}}, {"type": "track", "event": "x"}],
        MapContext(),
    )
    assert json.loads(json.dumps(results)) == [
        {
            "outputs": [{"kind": "customer", "body": {"type": "customer", "customer_id": "crm-1", "attributes": {}}}],
            "identity_link": ["u1", "crm-1"],
        },
        {"discarded": "anonymous_user", "detail": results[1]["detail"]},
    ]


def test_parse_events_forms():
    assert parse_events('{"a": 1}') == [{"a": 1}]
    assert parse_events('[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    assert parse_events('{"a": 1}\n\n{"b": 2}\n') == [{"a": 1}, {"b": 2}]
    with pytest.raises(InputError, match="no input"):
        parse_events("  ")
    with pytest.raises(InputError, match="line 2: invalid JSON"):
        parse_events('{"a": 1}\n{nope\n')


def test_reload_swaps_whole_set_and_keeps_old_on_error(tmp_path):
    write(tmp_path / "a.yaml", GOOD)
    holder = MappingHolder(MappingSet.of(load_mapping_dir(tmp_path)))
    first = holder.current
    assert set(holder.mappings()) == {"a"}
    # an unchanged directory gives the same set version
    assert holder.reload(tmp_path) == [] and holder.current.version == first.version
    # a broken edit to one file leaves the old set (all files) in force and reports the error
    write(tmp_path / "b.yaml", GOOD)
    write(tmp_path / "a.yaml", GOOD.replace("customer_id", "customer_idd"))
    diags = holder.reload(tmp_path)
    assert diags and diags[0].file.endswith("a.yaml") and diags[0].line == 6
    assert holder.current is first and set(holder.mappings()) == {"a"}
    # fixing it swaps in the new set, with new versions
    write(tmp_path / "a.yaml", GOOD.replace("$.userId", "$.anonymousId"))
    assert holder.reload(tmp_path) == []
    assert set(holder.mappings()) == {"a", "b"}
    assert holder.current.version != first.version
    assert holder.current.mappings["a"].version != first.mappings["a"].version
    with pytest.raises(TypeError):
        holder.current.mappings["c"] = holder.current.mappings["a"]  # type: ignore[index]


def test_directory_fingerprint_tracks_mapping_and_lookup_files_only(tmp_path):
    import os

    from bridge.mapping.reload import directory_fingerprint

    write(tmp_path / "a.yaml", GOOD)
    lookup = write(tmp_path / "lookups" / "l.yaml", "table: {a: b}\n")
    first = directory_fingerprint(tmp_path)
    write(tmp_path / "tests" / "a" / "t.yaml", "input: {}\nexpect: {discarded: x}\n")
    assert directory_fingerprint(tmp_path) == first
    lookup.write_text("table: {a: c}\n")
    os.utime(lookup, ns=(1, 1))
    second = directory_fingerprint(tmp_path)
    assert second != first
    write(tmp_path / "b.yaml", GOOD)
    assert directory_fingerprint(tmp_path) not in (first, second)


def test_the_mapping_commands_default_to_the_servers_config_in_bridge_config(tmp_path, capsys, monkeypatch):
    # In the image, $BRIDGE_CONFIG names the config `bridge serve` loads, and its mappings
    # live in /etc/bridge/mappings: a bare `bridge mappings check` must check those, not
    # look for ./mappings in the working directory.
    served = write(tmp_path / "served" / "x.yaml", GOOD.replace("kind: customer", "kind: custmer"))
    config = write(tmp_path / "bridge.yaml", f"mappings: {{dir: {served.parent}}}\n")
    monkeypatch.chdir(tmp_path)  # holds no ./mappings
    monkeypatch.setenv("BRIDGE_CONFIG", str(config))
    assert main(["mappings", "check"]) == 1
    assert f"{served}:5:11: rules[0].kind: moengage has no output kind 'custmer'" in capsys.readouterr().out
    # An explicit directory still wins over the environment.
    write(tmp_path / "other" / "y.yaml", GOOD)
    assert main(["mappings", "check", "--mappings-dir", str(tmp_path / "other")]) == 0
    monkeypatch.delenv("BRIDGE_CONFIG")
    assert main(["mappings", "check"]) == 1
    assert "mappings:1:1: <root>: no such file or directory" in capsys.readouterr().out
