"""Run the ``bridge`` command with interpreter-level tweaks, to try a tuning idea on the
real bridge without editing it:

    python -m bench.variant SPEC serve --config FILE

SPEC is a comma-separated list (``-`` for none):

- ``switch=S``     ``sys.setswitchinterval(S)``: how long a thread may hold the GIL while
                   another waits (default 0.005 s). The store's writer thread shares the
                   server core with the event loop.
- ``gc=A/B/C``     ``gc.set_threshold(A, B, C)``: fewer, larger young collections.
- ``gc_freeze``    ``gc.freeze()`` after imports, so the collector skips start-up objects.
- ``gc_stats``     at exit, print to stderr each generation's collections, the objects they
                   collected, and their total and longest pause.
- ``store_stats``  when the SQLite store's writer stops, print to stderr how many write
                   transactions it committed and the operations in them (group commit).
- ``linger=S``     the SQLite writer waits S seconds after a group's first operation for
                   more to join it (``SqliteStore(commit_interval=S)``): fewer, larger
                   commits, each request waiting up to S longer.
"""

from __future__ import annotations

import atexit
import gc
import sys
import time
from typing import Any

import bridge.app


class VariantError(ValueError):
    pass


def apply(spec: str, *, dry_run: bool = False) -> list[str]:
    """Apply ``spec`` (or only check it, with ``dry_run``); returns the items, for the log."""
    applied: list[str] = []
    if spec in ("", "-"):
        return applied
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        try:
            if name == "switch":
                interval = float(value)
                if not dry_run:
                    sys.setswitchinterval(interval)
            elif name == "gc":
                a, b, c = (int(x) for x in value.split("/"))
                if not dry_run:
                    gc.set_threshold(a, b, c)
                    # The bridge sets its own thresholds once it has started: make it set these.
                    bridge.app.GC_THRESHOLDS = (a, b, c)
            elif name == "gc_stats" and not value:
                if not dry_run:
                    GcStats().install()
            elif name == "store_stats" and not value:
                if not dry_run:
                    _report_writer_stats()
            elif name == "linger":
                seconds = float(value)
                if seconds < 0:
                    raise ValueError("must be >= 0")
                if not dry_run:
                    _linger(seconds)
            elif name == "gc_freeze" and not value:
                if not dry_run:
                    gc.collect()
                    gc.freeze()
            else:
                raise VariantError(
                    f"unknown variant item {item!r};"
                    " expected switch=S, gc=A/B/C, linger=S, gc_freeze, gc_stats or store_stats"
                )
        except ValueError as exc:
            if isinstance(exc, VariantError):
                raise
            raise VariantError(f"bad value in variant item {item!r}: {exc}") from None
        applied.append(item.strip())
    return applied


def _linger(seconds: float) -> None:
    """Make every SQLite store the bridge opens wait ``seconds`` to gather a commit group."""
    from bridge.store.sqlite import SqliteStore

    init = SqliteStore.__init__

    def lingering_init(self: SqliteStore, path: str, **options: Any) -> None:
        options["commit_interval"] = seconds
        init(self, path, **options)

    SqliteStore.__init__ = lingering_init  # type: ignore[method-assign]


def _report_writer_stats() -> None:
    """Wrap the SQLite writer's stop to print its commit counts first."""
    from bridge.store.sqlite_writer import GroupCommitWriter

    stop = GroupCommitWriter.stop

    async def reporting_stop(self: GroupCommitWriter) -> None:
        await stop(self)
        ops_per_commit = self.operations / self.commits if self.commits else 0.0
        sys.stderr.write(
            f"bench.variant store_stats: {self.commits} commits, {self.operations} operations "
            f"({ops_per_commit:.1f} per commit)\n"
        )

    GroupCommitWriter.stop = reporting_stop  # type: ignore[method-assign]


class GcStats:
    """Collections per generation, what they collected, and their pauses, printed at exit."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.collected = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)
        atexit.register(self.report)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info["generation"]
        self.runs[generation] += 1
        self.collected[generation] += info["collected"]
        self.seconds[generation] += took
        self.longest[generation] = max(self.longest[generation], took)

    def report(self) -> None:
        for generation in range(3):
            sys.stderr.write(
                f"bench.variant gc_stats: generation {generation}: {self.runs[generation]} collections, "
                f"{self.collected[generation]} objects collected, {self.seconds[generation] * 1e3:.1f} ms in all, "
                f"longest {self.longest[generation] * 1e3:.2f} ms\n"
            )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m bench.variant SPEC <bridge arguments>\n")
        return 2
    # Import the bridge first so gc_freeze covers its modules.
    from bridge.app import serve  # noqa: F401
    from bridge.cli import main as bridge_main

    try:
        applied = apply(args[0])
    except VariantError as exc:
        sys.stderr.write(f"bench.variant: {exc}\n")
        return 2
    sys.stderr.write(f"bench.variant: {', '.join(applied) or 'none'}\n")
    result: int = bridge_main(args[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
