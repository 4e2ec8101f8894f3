"""`bridge dlq|discards replay` keep to the destinations a server delivers. A config of the
store alone lists none, so the CLI cannot tell them: it refuses unless the operator names
one (--destination) or takes all the records name (--all-destinations)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.cli import main as cli_main
from bridge.store.base import DeadLetter
from bridge.store.sqlite import SqliteStore
from tests.store.helpers import event

SERVED = "moengage-main"  # configured on the server
GONE = "moengage-old"  # removed from the server's config, its dead letters left behind


def store_with_dead_letters(path: Path) -> None:
    """Two events dead-lettered for each of SERVED and GONE."""

    async def go() -> None:
        store = SqliteStore(str(path), min_free_disk_bytes=0)
        await store.open()
        try:
            await store.enqueue("web", [event(f"m{i}", f"u{i}", (SERVED, GONE)) for i in range(2)])
            for destination in (SERVED, GONE):
                jobs = await store.lease(destination, 2, 30)
                await store.dead_letter([DeadLetter(j.id, "http_400", 400, label="Order Completed") for j in jobs])
        finally:
            await store.close()

    asyncio.run(go())


def queues(path: Path) -> dict[str, tuple[int, int]]:
    """(queued, dead letters) by destination."""

    async def go() -> dict[str, tuple[int, int]]:
        store = SqliteStore(str(path), min_free_disk_bytes=0)
        await store.open()
        try:
            return {name: (s.depth, s.dead) for name, s in (await store.queue_stats()).items()}
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def store_only(tmp_path: Path) -> Path:
    """An operator's config naming the store alone, beside the store a server filled."""
    store_with_dead_letters(tmp_path / "bridge.db")
    (tmp_path / "ops.yaml").write_text(f'store: {{url: "sqlite:///{tmp_path}/bridge.db"}}\n')
    return tmp_path


@pytest.mark.parametrize("command", [["dlq", "replay"], ["discards", "replay"]], ids=" ".join)
@pytest.mark.parametrize("records", [["--reason", "http_400"], ["--all"]], ids=" ".join)
def test_a_store_only_config_refuses_a_replay_that_names_no_destination(
    store_only: Path, command: list[str], records: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ops = store_only / "ops.yaml"
    assert cli_main([*command, *records, "--config", str(ops)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{' '.join(command)}: {ops} lists no destinations, so which ones a server delivers is unknown: name one "
        "with --destination NAME, or give --all-destinations to replay into every destination the records name "
        "(what is queued for one no server delivers waits for good)\n"
    )
    assert queues(store_only / "bridge.db") == {SERVED: (0, 2), GONE: (0, 2)}


def test_a_store_only_config_replays_into_the_destination_named(
    store_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = str(store_only / "ops.yaml")
    assert cli_main(["dlq", "replay", "--reason", "http_400", "--destination", SERVED, "--config", ops]) == 0
    assert capsys.readouterr().out == "replayed 2 dead letter(s); they will be re-mapped with the current mapping\n"
    assert queues(store_only / "bridge.db") == {SERVED: (2, 0), GONE: (0, 2)}


def test_all_destinations_replays_into_every_destination_the_records_name(
    store_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = str(store_only / "ops.yaml")
    assert cli_main(["dlq", "replay", "--all", "--all-destinations", "--config", ops]) == 0
    assert capsys.readouterr().out == "replayed 4 dead letter(s); they will be re-mapped with the current mapping\n"
    assert queues(store_only / "bridge.db") == {SERVED: (2, 0), GONE: (2, 0)}


def test_all_destinations_is_refused_with_a_config_that_lists_destinations(
    store_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Such a config says which destinations are delivered: a replay keeps to them."""
    full = store_only / "full.yaml"
    full.write_text((store_only / "ops.yaml").read_text() + f"destinations:\n  - {{name: {SERVED}}}\n")
    assert cli_main(["dlq", "replay", "--all", "--all-destinations", "--config", str(full)]) == 2
    assert capsys.readouterr().err == (
        f"dlq replay: --all-destinations is for a config that lists no destinations; {full} lists "
        f"{SERVED}, and a replay keeps to them\n"
    )
    assert cli_main(["dlq", "replay", "--all", "--config", str(full)]) == 0
    assert queues(store_only / "bridge.db") == {SERVED: (2, 0), GONE: (0, 2)}


@pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "purge", "--all"], ["discards", "list"]], ids=" ".join)
def test_all_destinations_is_for_replays_only(
    store_only: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main([*command, "--all-destinations", "--config", str(store_only / "ops.yaml")])
    assert exc.value.code == 2
    assert f"--all-destinations applies to replay only, not {command[0]} {command[1]}" in capsys.readouterr().err
    assert queues(store_only / "bridge.db") == {SERVED: (0, 2), GONE: (0, 2)}
