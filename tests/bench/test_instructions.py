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


def test_parts_sum_self_costs_by_object_and_skip_the_inclusive_cost_of_calls(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\ntotals: 0\n")
    (tmp_path / "callgrind.out.1").write_text(
        "events: Ir\n"
        "ob=(1) /usr/lib/libsqlite3.so.0.8.6\n"
        "fn=(1) sqlite3_step\n"
        "10 100\n"
        # libpython is first named as a callee: later ``ob=(2)`` alone must still resolve.
        "cob=(2) /opt/lib/libpython3.11.so.1.0\n"
        "cfn=(2) PyObject_Malloc\n"
        "calls=3 20\n"
        "+2 9999\n"  # inclusive cost of the call: counted where the callee's lines are
        "* 5\n"
        "ob=(2)\n"
        "fn=(2)\n"
        "20 7000\n"
        "-1 3\n"
        "totals: 7108\n"
    )
    (tmp_path / "callgrind.out.2").write_text(
        "events: Ir\nob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6\nfn=(1) memcpy\n1 40\nob=(2) /x/_blake2.so\n2 2\n"
    )
    parts = instructions.by_part(out)
    assert parts == {"sqlite": 105, "interpreter": 7003, "libc": 40, "other": 2}
