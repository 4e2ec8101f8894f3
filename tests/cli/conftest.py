"""Fixtures for the CLI's store commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.helpers import serve_store


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """ctr/c.yaml names the store as the README does, relative to the working directory;
    `bridge serve` ran in ctr and left two dead letters in ctr/var/lib/bridge/bridge.db.
    ctr2 is an empty directory beside it."""
    ctr = tmp_path / "ctr"
    (ctr / "var" / "lib" / "bridge").mkdir(parents=True)
    (ctr / "c.yaml").write_text(
        'store: {url: "sqlite:///var/lib/bridge/bridge.db"}\ndestinations:\n  - {name: d, kind: segment}\n'
    )
    serve_store(ctr / "var" / "lib" / "bridge" / "bridge.db", dead=2)
    (tmp_path / "ctr2").mkdir()
    return ctr
