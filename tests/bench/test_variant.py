"""bench.variant's tweaks reach the bridge: its own start-up settings do not undo them."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import bridge.app
from bench import variant


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds, kept, callbacks = gc.get_threshold(), bridge.app.GC_THRESHOLDS, list(gc.callbacks)
    yield
    gc.set_threshold(*thresholds)
    bridge.app.GC_THRESHOLDS = kept
    gc.callbacks[:] = callbacks


def test_gc_thresholds_survive_the_bridge_settling_its_collector(restore_gc: None) -> None:
    assert variant.apply("gc=123456/7/8") == ["gc=123456/7/8"]
    bridge.app.settle_garbage_collector()  # what `bridge serve` runs once it has started
    assert gc.get_threshold() == (123456, 7, 8)


def test_gc_stats_counts_collections_and_reports_them(restore_gc: None, capsys: pytest.CaptureFixture[str]) -> None:
    stats = variant.GcStats()
    gc.callbacks.append(stats._callback)
    gc.collect(0)
    gc.collect(2)
    assert stats.runs[0] >= 1 and stats.runs[2] >= 1
    stats.report()
    err = capsys.readouterr().err
    assert f"generation 2: {stats.runs[2]} collections" in err


def test_unknown_items_are_refused() -> None:
    with pytest.raises(variant.VariantError, match="gc_stats"):
        variant.apply("gc_stat", dry_run=True)


def test_linger_makes_every_sqlite_store_gather_its_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.store.sqlite import SqliteStore

    monkeypatch.setattr(SqliteStore, "__init__", SqliteStore.__init__)  # undone after the test
    assert variant.apply("linger=0.02") == ["linger=0.02"]
    assert SqliteStore(str(tmp_path / "b.db"))._commit_interval == 0.02
    with pytest.raises(variant.VariantError, match="linger"):
        variant.apply("linger=-1", dry_run=True)
