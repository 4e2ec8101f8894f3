"""bench.opcodes: the bridge's interpreter steps, counted for exactly the events sent."""

from __future__ import annotations

from pathlib import Path

from bench.opcodes import count


def test_the_counts_cover_exactly_the_counted_events(tmp_path: Path) -> None:
    # A warm-up of a fifth as many goes first, uncounted: each counted single call is
    # normalised once, so the count of normalise_in's calls is the count of events.
    report = count("single", 60, 4, tmp_path)
    calls = {name: n for _path, _line, name, _ops, n in report["functions"]}
    assert calls["normalise_in"] == 60, calls.get("normalise_in")
    ops = {name: n for _path, _line, name, n, _calls in report["functions"]}
    assert ops["normalise_in"] > 60 * 50  # dozens of steps a call, not a stray count
    spec_lines = [r for r in report["lines"] if r[0].endswith("segment/spec.py")]
    assert sum(r[2] for r in spec_lines) >= ops["normalise_in"]
