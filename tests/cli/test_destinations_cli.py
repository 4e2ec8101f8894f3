"""`bridge destinations list|pause|resume` against a real SQLite store file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.cli import main as cli_main
from bridge.store.sqlite import SqliteStore
from tests.cli.helpers import serve_store
from tests.store.helpers import event


@pytest.fixture
def ops_config(tmp_path: Path) -> str:
    # Only what the operations commands read: the store and the destination names.
    serve_store(tmp_path / "bridge.db")  # the commands work on the store `bridge serve` made
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f'store: {{url: "sqlite:///{tmp_path / "bridge.db"}"}}\n'
        "destinations:\n"
        "  - {name: moengage-main, kind: moengage, api_key: '${MOENGAGE_API_KEY}'}\n"
        "  - {name: segment-prod, kind: segment}\n"
    )
    return str(path)


def test_list_shows_configured_destinations_before_any_traffic(ops_config: str, capsys) -> None:
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "moengage-main: active, queued 0, dead letters 0",
        "segment-prod: active, queued 0, dead letters 0",
    ]


def test_pausing_a_misspelled_destination_is_an_error(ops_config: str, capsys) -> None:
    assert cli_main(["destinations", "pause", "moengage-mian", "--config", ops_config]) == 2
    err = capsys.readouterr().err
    assert "unknown destination 'moengage-mian' (did you mean 'moengage-main'?)" in err
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    assert "PAUSED" not in capsys.readouterr().out  # nothing was written for the typo


def test_list_refuses_a_name_rather_than_list_every_destination_for_it(ops_config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["destinations", "list", "segment-prod", "--config", ops_config])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "destinations list takes no name (it lists every destination), got 'segment-prod'" in captured.err


def test_pause_and_resume(ops_config: str, capsys) -> None:
    assert cli_main(["destinations", "pause", "segment-prod", "--config", ops_config]) == 0
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    out = capsys.readouterr().out
    assert "segment-prod: PAUSED (paused from the CLI)" in out and "moengage-main: active" in out
    assert cli_main(["destinations", "resume", "segment-prod", "--config", ops_config]) == 0
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    assert "PAUSED" not in capsys.readouterr().out


def test_a_config_of_the_store_alone_pauses_what_list_shows(tmp_path: Path, capsys) -> None:
    # The store commands need only the store section: an operator without the secrets
    # must be able to pause a destination the store holds work for, not only one paused before.
    async def queue_two() -> None:
        store = SqliteStore(str(tmp_path / "bridge.db"), min_free_disk_bytes=0)
        await store.open()
        try:
            await store.enqueue("web", [event(f"m{i}", f"u{i}", ("moengage-main",)) for i in range(2)])
        finally:
            await store.close()

    asyncio.run(queue_two())
    ops = tmp_path / "ops.yaml"
    ops.write_text(f'store: {{url: "sqlite:///{tmp_path / "bridge.db"}"}}\n')
    assert cli_main(["destinations", "list", "--config", str(ops)]) == 0
    assert capsys.readouterr().out == "moengage-main: active, queued 2, dead letters 0\n"
    assert cli_main(["destinations", "pause", "moengage-main", "--config", str(ops)]) == 0
    assert cli_main(["destinations", "list", "--config", str(ops)]) == 0
    assert "moengage-main: PAUSED (paused from the CLI), queued 2" in capsys.readouterr().out
    assert cli_main(["destinations", "resume", "moengage-main", "--config", str(ops)]) == 0
    assert cli_main(["destinations", "pause", "moengage-mian", "--config", str(ops)]) == 2
    err = capsys.readouterr().err
    assert "unknown destination 'moengage-mian' (did you mean 'moengage-main'?)" in err
    assert err.endswith("configured: none; in the store: moengage-main\n")


def test_pausing_a_known_destination_does_not_count_the_queue(
    ops_config: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counting reads every queued job's index entry: on a queue of millions, the moment an
    # operator most wants a pause, it took minutes. A configured (or stored) name needs none.
    async def no_counting(self: SqliteStore) -> None:
        raise AssertionError("queue_stats was called")

    monkeypatch.setattr(SqliteStore, "queue_stats", no_counting)
    assert cli_main(["destinations", "pause", "segment-prod", "--config", ops_config]) == 0
    assert cli_main(["destinations", "resume", "segment-prod", "--config", ops_config]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "segment-prod: paused",
        "segment-prod: resumed; 0 waiting jobs made due now",
    ]
