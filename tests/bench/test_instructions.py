"""The instruction counter (bench/instructions.py) against the floor, under real callgrind.

No figure is asserted beyond "counted, and only while switched on": the count must cover
the counted events and not the warm-up or start-up, which alone run to billions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import instructions

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")


def test_the_count_grows_with_the_events_counted_and_leaves_out_the_warm_up(tmp_path: Path) -> None:
    few = instructions.count("floor", "single", 100, 8, tmp_path / "few")
    more = instructions.count("floor", "single", 400, 8, tmp_path / "more")
    assert few > 0
    # Four times the events: about four times the instructions. Start-up and warm-up
    # (billions of instructions) would swamp the ratio if they were counted.
    assert 2.5 < more / few < 5.5


def test_totals_are_summed_over_every_dump(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\ntotals: 0\n")
    (tmp_path / "callgrind.out.1").write_text("events: Ir\nsummary: 5\ntotals: 1200\n")
    (tmp_path / "callgrind.out.2").write_text("events: Ir\ntotals: 34\n")
    assert instructions._counted(out) == 1234
