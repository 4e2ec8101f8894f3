"""``python -m bench``: the bridge against the floor, in the same run, on this machine.

    python -m bench            # full run (about 15-20 minutes on 2 cores, 15 GB of disk)
    python -m bench --quick    # small counts, about a minute: a smoke test of the suite

Prints a table and writes bench/results.json. Servers (floor, bridge) are pinned to core
0, the load generator and the stand-in upstreams to core 1. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.procs import LOAD_CPU, ROOT, SERVER_CPU, BenchError, cores, machine, pinnable, source_state
from bench.servers import StandIns
from bench.suite import Settings, delivery_phase, ingest_phases, mapping_phase, memory_phase

RESULTS = ROOT / "bench" / "results.json"
PHASES = ("ingest", "delivery", "memory", "mapping")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small counts (~1 min): checks the suite runs")
    p.add_argument("--duration", type=float, help="seconds measured per ingest phase")
    p.add_argument("--repeat", type=int, help="rounds of the ingest phases (the median run is reported)")
    p.add_argument("--delivery-events", type=int, help="events pre-loaded for the delivery phase")
    p.add_argument("--memory-events", type=int, help="events queued for the memory phase (the issue says 10M)")
    p.add_argument("--memory-seconds", type=float, help="stop queueing after this long, whatever the count")
    p.add_argument(
        "--delivery-set",
        action="append",
        metavar="KEY=VALUE",
        help="override the MoEngage destination's delivery setting (e.g. concurrency=4); repeatable",
    )
    p.add_argument(
        "--bridge-variant",
        metavar="SPEC",
        default="",
        help="run the bridge through bench/variant.py with interpreter tweaks, e.g. switch=0.0005,gc_freeze",
    )
    p.add_argument("--only", action="append", choices=PHASES, help="run only these phases (repeatable)")
    p.add_argument("--profile", action="store_true", help="run the bridge's ingest phases under cProfile")
    p.add_argument("--output", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    p.add_argument(
        "--update-docs", action="store_true", help="also write the table into docs/benchmarks.md and README.md"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (logs, profiles, and the stores of the phases after ingest; "
        "each ingest run's store is deleted before the next run starts)",
    )
    args = p.parse_args(argv)
    for name in ("duration", "repeat", "delivery_events", "memory_events", "memory_seconds"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick() if args.quick else Settings()
    overrides: dict[str, Any] = {"profile": args.profile}
    for name in ("duration", "repeat", "delivery_events", "memory_events", "memory_seconds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    pairs = []
    for item in args.delivery_set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--delivery-set: expected KEY=VALUE, got {item!r}")
        pairs.append((key, orjson.loads(value) if value[:1].isdigit() or value in ("true", "false") else value))
    if pairs:  # on top of the bench's own delivery settings (Settings.delivery_config)
        overrides["delivery_config"] = tuple({**dict(Settings().delivery_config), **dict(pairs)}.items())
    if args.bridge_variant:
        from bench.variant import VariantError, apply

        try:
            apply(args.bridge_variant, dry_run=True)  # a bad spec fails before anything starts
        except VariantError as exc:
            raise SystemExit(f"--bridge-variant: {exc}") from None
        overrides["bridge_variant"] = args.bridge_variant
    return dataclasses.replace(s, **overrides)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    settings = settings_from(args)
    phases = set(args.only or PHASES)
    log_dir = work / "logs"
    log_dir.mkdir()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source_state(),
        "pinning": {
            "cores_available": cores(),
            "server_core": pinnable(SERVER_CPU),
            "load_core": pinnable(LOAD_CPU),
            "note": "floor and bridge on the server core; load generator and stand-ins on the load core "
            "(-1: not pinned, fewer than 2 cores)",
        },
        "run": "quick" if args.quick else "full",
        "settings": settings.as_json(),
        "floor": {},
        "bridge": {},
    }
    say(f"bench: {results['run']} run, work dir {work}")
    started = time.monotonic()
    standins = StandIns(log_dir)
    try:
        if "ingest" in phases:
            say("ingest (destinations paused: delivery does not compete)")
            ingest = ingest_phases(work, log_dir, standins, settings, say)
            results["floor"], results["bridge"] = ingest["floor"], ingest["bridge"]
        if "delivery" in phases:
            say("delivery")
            results["delivery"] = delivery_phase(work, log_dir, standins, settings, say)
        if "memory" in phases:
            say("memory")
            results["memory"] = memory_phase(work, log_dir, standins, settings, say)
    finally:
        standins.stop()
    if "mapping" in phases:
        say("mapping")
        results["mapping"] = mapping_phase(settings, say)
    results["seconds"] = round(time.monotonic() - started, 1)
    # Others may commit while a run is going: if the tree changed, say so.
    results["source_at_end"] = source_state()
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    results["table"] = report.table(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    try:
        results = run(args, work)
    except BenchError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 1
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    m = results["machine"]
    say("")
    say(f"{results['date']}  {m['nproc']} x {m['cpu_model']}  Python {m['python']}  ({results['run']} run)")
    src, end = results["source"], results["source_at_end"]
    say(f"source: {src['commit']}" + (f" + uncommitted {', '.join(src['uncommitted'])}" if src["uncommitted"] else ""))
    if end != src:
        say(f"WARNING: the source changed during the run (now {end['commit']}); figures may mix versions")
    say(results["table"])
    say("")
    say("targets (issue 6):")
    say(report.targets_text(results["targets"]))
    args.output.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    say(f"\nwrote {args.output}")
    if args.update_docs:
        # The README shows the same table as docs/benchmarks.md: one run writes both.
        for docs in (ROOT / "docs" / "benchmarks.md", ROOT / "README.md"):
            if report.update_docs(docs, results):
                say(f"updated {docs}")
            else:
                say(f"{docs}: no bench-table markers; not updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
