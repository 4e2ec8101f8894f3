"""The load generator process: ``python -m bench.loadgen --port P --mode batch ...``.

Prints one JSON object (the tally) on stdout. Pins itself to ``--cpu`` so that it never
competes with the server under test for a core.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

from bench.httpload import LoadGenerator, run
from bench.payloads import Workload, batch_workload, single_workload, streams_workload

MODES = ("single", "batch", "streams")


def pin(cpu: int | None) -> list[int]:
    """Pin this process to ``cpu`` when the machine has it; returns the affinity now in force."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        available = os.sched_getaffinity(0)
        if cpu in available and len(available) > 1:
            os.sched_setaffinity(0, {cpu})
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def workload_for(args: argparse.Namespace) -> Workload:
    if args.mode == "single":
        return single_workload(args.write_key)
    if args.mode == "batch":
        return batch_workload(args.write_key, args.batch_size)
    return streams_workload(args.streams_source, args.streams_user, args.streams_password, args.batch_size)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    gen = LoadGenerator(args.host, args.port, workload_for(args), args.connections)
    await gen.connect()
    try:
        if args.rate:
            tally = await gen.open_loop(args.rate, args.duration, args.warmup)
            loop_kind = "open"
        else:
            max_requests = -(-args.events // gen.workload.events_per_request) if args.events else None
            tally = await gen.closed_loop(args.duration, args.warmup, max_requests)
            loop_kind = "closed"
    finally:
        await gen.close()
    return tally.as_json(args.mode, loop_kind, args.connections, args.rate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=MODES, default="batch")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s offered (0: closed loop)")
    p.add_argument("--events", type=int, default=0, help="closed loop: send this many events, then stop")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--write-key", default="bench-write-key")
    p.add_argument("--streams-source", default="streams-bench")
    p.add_argument("--streams-user", default="moe")
    p.add_argument("--streams-password", default="bench-streams-password")
    p.add_argument("--cpu", type=int, default=1, help="core to pin to (-1: do not pin)")
    args = p.parse_args(argv)
    if args.connections < 1:
        p.error("--connections must be at least 1")
    if args.rate < 0 or args.duration <= 0:
        p.error("--rate must be >= 0 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = pin(None if args.cpu < 0 else args.cpu)
    try:
        result = run(lambda: main_async(args))
    except OSError as exc:
        sys.stderr.write(f"loadgen: cannot reach {args.host}:{args.port}: {exc}\n")
        return 2
    result["cpus"] = cpus
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
