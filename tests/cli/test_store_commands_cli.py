"""`bridge dlq|discards|destinations` on real SQLite store files: they open the store
`bridge serve` made, and never make one of their own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from bridge.cli import build_parser
from bridge.cli import main as cli_main
from bridge.store.base import Discard, RecordFilter
from bridge.store.sqlite import SqliteStore
from tests.cli.helpers import assert_served_store_untouched, run_bridge, serve_store, spawn_bridge
from tests.store.helpers import event

STORE_COMMANDS = [
    ["dlq", "list"],
    ["dlq", "show", "1"],
    ["dlq", "replay", "--all"],
    ["dlq", "purge", "--all"],
    ["discards", "list"],
    ["destinations", "list"],
    ["destinations", "pause", "d"],
    ["destinations", "resume", "d"],
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_from_another_directory_a_relative_store_is_not_created(
    served: Path, command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from ctr2, the commands made ctr2/var/lib/bridge/bridge.db and reported on it:
    "0 dead letter(s)", or "d: paused" (exit 0) with the real store's d still active."""
    ctr2 = served.parent / "ctr2"
    monkeypatch.chdir(ctr2)
    assert cli_main([*command, "--config", "../ctr/c.yaml"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"store error: no store at {ctr2}/var/lib/bridge/bridge.db (store.url ")
    assert f"relative to the working directory {ctr2})" in err
    assert list(ctr2.iterdir()) == []  # neither the file nor its directories
    assert_served_store_untouched(served, monkeypatch, capsys)


def test_from_the_servers_directory_the_same_url_finds_the_store(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(served)
    assert cli_main(["destinations", "pause", "d", "--config", "c.yaml"]) == 0
    assert cli_main(["dlq", "replay", "--all", "--config", "c.yaml"]) == 0
    assert cli_main(["destinations", "list", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "d: paused",
        "replayed 2 dead letter(s); they will be re-mapped with the current mapping",
        "d: PAUSED (paused from the CLI), queued 2, dead letters 0",
    ]


def test_an_absolute_store_url_that_names_no_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f'store: {{url: "sqlite:///{tmp_path}/nowhere/bridge.db"}}\n')
    assert cli_main(["dlq", "list", "--config", str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"store error: no store at {tmp_path}/nowhere/bridge.db: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_the_bridge_script_from_another_directory(served: Path) -> None:
    """The reviewer's report, as an operator types it."""
    ctr2 = served.parent / "ctr2"
    paused = run_bridge("destinations", "pause", "d", "--config", "../ctr/c.yaml", cwd=ctr2)
    assert paused.returncode == 1
    assert paused.stdout == ""
    assert paused.stderr.startswith(f"store error: no store at {ctr2}/var/lib/bridge/bridge.db")
    assert list(ctr2.iterdir()) == []
    listed = run_bridge("destinations", "list", "--config", "c.yaml", cwd=served)
    assert (listed.returncode, listed.stdout) == (0, "d: active, queued 0, dead letters 2\n")


def test_a_listing_whose_reader_stops_early_ends_without_a_traceback(tmp_path: Path) -> None:
    """`bridge dlq list | head -1`: the reader leaves after a line, and the rest of the
    listing (well past what the pipe holds) cannot be written. That is the reader's choice,
    not the command's failure: it ends as a process SIGPIPE ended would (141), not with a
    BrokenPipeError traceback."""
    serve_store(tmp_path / "bridge.db", dead=2000)  # ~200 KB of listing
    (tmp_path / "c.yaml").write_text(f'store: {{url: "sqlite:///{tmp_path / "bridge.db"}"}}\n')
    proc = spawn_bridge("dlq", "list", "--limit", "10000", "--config", "c.yaml", cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().split() == ["ID", "FAILED", "AT", "DESTINATION", "EVENT", "REASON", "ATTEMPTS"]
    proc.stdout.close()  # as head does once it has its line
    err = proc.stderr.read()
    assert (proc.wait(timeout=60), err) == (141, "")


def test_dlq_show_prints_the_records_in_the_order_asked(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The store lists dead letters newest first: `dlq show 1 2` printed 2, then 1.
    monkeypatch.chdir(served)
    capsys.readouterr()
    for ids in (["1", "2"], ["2", "1"], ["1", "2", "1"]):
        assert cli_main(["dlq", "show", *ids, "--config", "c.yaml"]) == 0
        shown = orjson.loads(capsys.readouterr().out)
        assert [r["id"] for r in shown] == list(dict.fromkeys(map(int, ids)))
        assert all("payload" in r for r in shown)  # in full


def test_dlq_show_names_the_ids_it_did_not_find(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dlq show 1 99` printed dead letter 1 alone and exited 0, as if 99 had been shown too."""
    monkeypatch.chdir(served)
    capsys.readouterr()
    assert cli_main(["dlq", "show", "99", "1", "98", "--config", "c.yaml"]) == 1
    out, err = capsys.readouterr()
    assert [r["id"] for r in orjson.loads(out)] == [1]
    assert err == "dlq show: no such dead letter: 99, 98\n"


def test_a_listing_cut_at_limit_says_more_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "3 dead letter(s)" under a listing cut at --limit 3 of 5 read as the total.
    serve_store(tmp_path / "b.db", dead=5)
    (tmp_path / "c.yaml").write_text(f"store: {{url: 'sqlite:///{tmp_path / 'b.db'}'}}\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli_main(["dlq", "list", "--limit", "3", "--config", "c.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("http_400") == 3
    assert out.endswith("3 dead letter(s) shown, the newest; more match (raise --limit, up to 10000)\n")
    assert cli_main(["dlq", "list", "--limit", "5", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.endswith("\n5 dead letter(s)\n")
    assert cli_main(["dlq", "list", "--json", "--limit", "3", "--config", "c.yaml"]) == 0
    assert len(orjson.loads(capsys.readouterr().out)) == 3
    assert cli_main(["discards", "list", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.endswith("\n0 discard(s)\n")


def test_ids_and_reasons_no_record_can_have_match_nothing_without_a_traceback(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dlq show 99999999999999999999` and a --reason that is not UTF-8 (bytes from the
    shell) ended in a Python traceback (OverflowError, UnicodeEncodeError) on SQLite."""
    monkeypatch.chdir(served)
    capsys.readouterr()
    assert cli_main(["dlq", "show", str(2**64), "--config", "c.yaml"]) == 1
    assert capsys.readouterr().err == f"dlq show: no such dead letter: {2**64}\n"
    assert cli_main(["dlq", "replay", str(2**64), "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.startswith("replayed 0 dead letter(s)")
    assert cli_main(["dlq", "purge", "--reason", "http_400\udcff", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out == "purged 0 dead letter(s)\n"
    assert_served_store_untouched(served, monkeypatch, capsys)


def test_a_time_bound_at_the_epoch_is_a_filter(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--until 0` and `--since 1970-01-01` were read as no filter at all (0 is falsy), so
    a purge or replay with them was refused with "give a filter ... or --all", where the
    admin API takes the same bound."""
    monkeypatch.chdir(served)
    capsys.readouterr()
    assert cli_main(["dlq", "purge", "--until", "0", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out == "purged 0 dead letter(s)\n"  # nothing failed before 1970
    assert cli_main(["discards", "replay", "--until", "1970-01-01T00:00:00Z", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.startswith("replayed 0 discard(s)")
    assert cli_main(["dlq", "replay", "--since", "1970-01-01T00:00:00Z", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.startswith("replayed 2 dead letter(s)")


@pytest.mark.parametrize("command", ["serve", "check", "dlq", "discards", "destinations"])
def test_every_commands_help_says_where_the_config_comes_from(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge dlq --help` said "(default: bridge.yaml)", hiding $BRIDGE_CONFIG; the others said nothing."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per option, so the text is matched whole
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "config file (default: $BRIDGE_CONFIG, else bridge.yaml)" in capsys.readouterr().out


def _discard_three(path: Path) -> list[int]:
    """Three events for d discarded (anonymous users), as a server records them; their ids."""

    async def go() -> list[int]:
        store = SqliteStore(str(path), min_free_disk_bytes=0)
        await store.open()
        try:
            await store.enqueue("web", [event(f"anon{i}", f"a{i}", ("d",)) for i in range(3)])
            await store.discard([Discard(j.id, "anonymous_user") for j in await store.lease("d", 3, 30)])
            return sorted(r.id for r in await store.list_discards(RecordFilter()))
        finally:
            await store.close()

    return asyncio.run(go())


def test_discards_replay_takes_ids_as_dlq_replay_does(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge discards replay` took a filter or --all, never ids, where `dlq replay` and
    the admin API's POST /admin/discards/replay take them: one wrongly discarded event
    could not be replayed alone."""
    first, second, third = _discard_three(served / "var" / "lib" / "bridge" / "bridge.db")
    monkeypatch.chdir(served)
    capsys.readouterr()
    assert cli_main(["discards", "replay", str(first), str(third), "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out.startswith("replayed 2 discard(s)")
    assert cli_main(["discards", "list", "--json", "--config", "c.yaml"]) == 0
    assert [r["id"] for r in orjson.loads(capsys.readouterr().out)] == [second]
    assert cli_main(["discards", "replay", "--config", "c.yaml"]) == 2  # no ids, no filter: not all
    assert capsys.readouterr().err == (
        "discards replay: give a filter (--destination, --reason, --since, --until, ids) or --all\n"
    )
    assert cli_main(["destinations", "list", "--config", "c.yaml"]) == 0
    assert capsys.readouterr().out == "d: active, queued 2, dead letters 2\n"


def test_ids_after_an_option_are_ids_too(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge discards replay --config c.yaml 3`: argparse gave the ids their empty list at
    the first option and refused the rest as unrecognized arguments (exit 2)."""
    first, second, third = _discard_three(served / "var" / "lib" / "bridge" / "bridge.db")
    monkeypatch.chdir(served)
    capsys.readouterr()
    assert cli_main(["discards", "replay", "--config", "c.yaml", str(first), str(third)]) == 0
    assert capsys.readouterr().out.startswith("replayed 2 discard(s)")
    assert cli_main(["discards", "list", "--json", "--config", "c.yaml", str(second)]) == 0
    assert [r["id"] for r in orjson.loads(capsys.readouterr().out)] == [second]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "purge", "--config", "c.yaml", "3", "x"], "unrecognized arguments: 3 x"),
        (["dlq", "purge", "+3"], "argument ids: '+3' is not a record id (the digits 0-9)"),
        (["dlq", "replay", "-1"], "argument ids: '-1' is not a record id (the digits 0-9)"),
        (["dlq", "purge", "\uff13"], "is not a record id (the digits 0-9)"),  # a fullwidth 3
        (["destinations", "list", "--config", "c.yaml", "7"], "unrecognized arguments: 7"),
    ],
)
def test_what_is_no_record_id_is_a_usage_error(
    served: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(served)
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
