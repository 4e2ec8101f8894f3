"""`bridge destinations list|pause|resume` against a real SQLite store file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.cli import main as cli_main
from tests.cli.helpers import serve_store


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


def test_pause_and_resume(ops_config: str, capsys) -> None:
    assert cli_main(["destinations", "pause", "segment-prod", "--config", ops_config]) == 0
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    out = capsys.readouterr().out
    assert "segment-prod: PAUSED (paused from the CLI)" in out and "moengage-main: active" in out
    assert cli_main(["destinations", "resume", "segment-prod", "--config", ops_config]) == 0
    assert cli_main(["destinations", "list", "--config", ops_config]) == 0
    assert "PAUSED" not in capsys.readouterr().out
