"""`bridge dlq|discards --since/--until`: epoch seconds or ISO-8601, as in the admin API;
anything else is a usage error (exit 2), not a traceback."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bridge.cli import main as cli_main
from tests.cli.helpers import assert_served_store_untouched, run_bridge


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "list", "--since", "yesterday"], "argument --since: 'yesterday' must be epoch seconds or ISO-8601"),
        # Epoch seconds are written in the digits 0-9 (a minus and a fraction allowed), not as
        # everything float() reads.
        (["dlq", "list", "--since", "nan"], "argument --since: 'nan' must be epoch seconds or ISO-8601"),
        (["dlq", "replay", "--until=-inf"], "argument --until: '-inf' must be epoch seconds or ISO-8601"),
        (["dlq", "purge", "--since", "1e400"], "argument --since: '1e400' must be epoch seconds or ISO-8601"),
        (["dlq", "purge", "--since", "1_700_000_000"], "argument --since: '1_700_000_000' must be epoch seconds"),
        (["dlq", "purge", "--since", "9" * 400], "must be a finite number of epoch seconds"),
        (["discards", "list", "--until", "2020-13-01"], "argument --until: '2020-13-01' must be epoch seconds"),
        # A day written YYYYMMDD is also epoch seconds in 1970: which was meant is not guessed.
        (
            ["dlq", "replay", "--since", "20260101"],
            "argument --since: '20260101' reads as a date and as epoch seconds; write the date as 2026-01-01",
        ),
        # SQLite reads LIMIT -1 as no limit at all; PostgreSQL refuses it.
        (["dlq", "list", "--limit=-1"], "argument --limit: must be between 1 and 10000, got -1"),
        (["discards", "list", "--limit", "0"], "argument --limit: must be between 1 and 10000, got 0"),
        (["dlq", "list", "--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
    ],
)
def test_a_bad_time_is_a_usage_error_not_a_traceback(
    served: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It raised bridge.httpx.ApiError out of main(), a traceback and exit 1."""
    monkeypatch.chdir(served)
    with pytest.raises(SystemExit) as exited:
        cli_main([*args, "--config", "c.yaml"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err.splitlines()[-1]
    assert_served_store_untouched(served, monkeypatch, capsys)  # nothing was replayed or purged


def test_the_bridge_script_with_a_bad_time(served: Path) -> None:
    done = run_bridge("dlq", "list", "--since", "yesterday", "--config", "c.yaml", cwd=served)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith("argument --since: 'yesterday' must be epoch seconds or ISO-8601")


def test_good_times_still_filter(
    served: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(served)
    counts = []
    for since_until in (
        ["--since", "0"],
        ["--since", "2999-01-01"],
        ["--until", "2000-01-01T00:00:00Z"],
        ["--since", "2000-01-01T00:00:00+02:00", "--until", "32503680000"],
        ["--since", ""],  # empty: no bound, as in the admin API
        ["--since", "20260101.0"],  # epoch seconds, in 1970, as the refusal of 20260101 says to write them
        ["--until", "10000000"],  # eight digits but no day: epoch seconds
    ):
        assert cli_main(["dlq", "list", "--json", *since_until, "--config", "c.yaml"]) == 0
        counts.append(len(orjson.loads(capsys.readouterr().out)))
    assert counts == [2, 0, 0, 2, 2, 2, 0]
