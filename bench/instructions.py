"""Instructions per event, counted by callgrind: a ratio this noisy machine repeats.

    python -m bench.instructions [--mode single|batch|streams] [--events 3000] [--connections 32]

The wall-clock figures of ``make bench`` move by 10-20% between runs of the same code on
this 2-core machine, so a change worth 2-3% cannot be seen there. callgrind counts the
instructions a process executes in user space, and the count repeats within about half a
percent, whatever else the host is doing. Each server (the floor, then the bridge) runs
under ``valgrind --tool=callgrind`` on the server core with counting off; after a warm-up
of a fifth of ``--events``, counting is switched on for exactly ``--events`` events from
the load generator, then off again. Each server's count is also split by the code that ran it (the
interpreter, orjson, SQLite, libc, the rest), which shows whether a gap is Python work
or store work.

What it does not count: the kernel's work (socket I/O, fsync, copying WAL pages). A
change that moves work into the kernel (smaller SQLite pages, say) can look cheaper here
and be slower on the clock, so this complements the wall-clock table and never replaces
it. Under valgrind the threads take turns, so commit groups are smaller than in a real
run and per-commit costs weigh more. Count against the floor, or against the code before
a change, in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from bench.procs import PYTHON, SERVER_CPU, BenchError, Child, free_port, run_loadgen, wait_http
from bench.servers import bridge_config, pause_before_serve
from bench.suite import INGEST_PHASES, Settings, _loadgen_args

VALGRIND_STARTUP = 300.0  # seconds: the bridge imports everything at 50x slower under valgrind


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def _control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, timeout=120)
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")


def _counted(out: Path) -> int:
    """The instructions of every dump callgrind wrote (one per ``callgrind_control -d``)."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


# Where a server's instructions go, by the object file that executed them: the
# interpreter (Python code and the objects it builds), orjson, SQLite, libc (memcpy and
# memset, mostly for SQLite pages and JSON bytes) and the rest.
_PARTS = (("libpython", "interpreter"), ("orjson", "orjson"), ("libsqlite3", "sqlite"), ("libc.so", "libc"))


def _part(obj: str) -> str:
    name = obj.rsplit("/", 1)[-1]
    return next((part for prefix, part in _PARTS if name.startswith(prefix)), "other")


def by_part(out: Path) -> dict[str, int]:
    """Each dump's self cost summed by ``_PARTS`` (callgrind's ``ob=`` object of the code).

    In callgrind's format the line after ``calls=`` is the call's inclusive cost, which
    belongs to the callee's own lines too: it is skipped, so nothing is counted twice."""
    parts: dict[str, int] = {}
    for path in sorted(out.parent.glob(out.name + "*")):
        names: dict[str, str] = {}  # "(3)" -> object path: callgrind names each object once
        current = "other"
        after_call = False
        for line in path.read_text(errors="replace").splitlines():
            if not line:
                continue
            head = line[0]
            if head.isdigit() or head in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) >= 2:
                    parts[current] = parts.get(current, 0) + int(fields[1])
            elif line.startswith(("ob=", "cob=")):
                # Both name objects from one table: an object first named as a callee
                # (cob=) is later referred to by its number alone.
                is_ob = line[0] == "o"
                ref, _, obj = line[3 if is_ob else 4 :].partition(" ")
                if obj:
                    names[ref] = obj
                if is_ob:
                    current = _part(names.get(ref, ref))
            elif line.startswith("calls="):
                after_call = True
    return parts


def _bridge_argv(work: Path, port: int) -> list[str]:
    config = work / "bridge.yaml"
    config.write_bytes(orjson.dumps(bridge_config(work, "instructions", port, None, "paused")))  # JSON is YAML
    pause_before_serve(config)  # nothing is delivered: ingest alone is counted
    return [PYTHON, "-m", "bridge.cli", "serve", "--config", str(config)]


def count(server: str, mode: str, events: int, connections: int, work: Path) -> int:
    """Instructions the ``server`` ("floor" or "bridge") spends on ``events`` events."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    out = work / f"callgrind-{server}.out"
    if server == "bridge":
        argv = _bridge_argv(work, port)
    else:
        argv = [PYTHON, "-m", "bench.floor", "--db", str(work / "floor.db"), "--port", str(port), "--cpu", "-1"]
    child = Child(f"{server}-callgrind", [*_valgrind(out), *argv], work, SERVER_CPU, announces=False)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=VALGRIND_STARTUP, child=child)
        load = _loadgen_args(mode, Settings(duration=3600.0, warmup=0.0), connections=connections)
        run_loadgen(port, *load, "--events", str(max(events // 5, 1)), timeout=3600.0)
        _control("-i", "on", str(child.pid))
        tally = run_loadgen(port, *load, "--events", str(events), timeout=3600.0)
        _control("-i", "off", str(child.pid))
        _control("-d", str(child.pid))
    finally:
        child.stop(timeout=120)
    sent = int(tally.get("all_events", 0))
    if sent < events:
        raise BenchError(f"{server}: the load generator sent {sent} of {events} events: {tally}")
    return _counted(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=[mode for _, mode, _ in INGEST_PHASES], default="single")
    p.add_argument("--events", type=int, default=3000, help="events counted (after a warm-up of a fifth as many)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--only", choices=("floor", "bridge"), help="count one server only")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        p.error("needs valgrind (with callgrind_control) on PATH")
    work = Path(tempfile.mkdtemp(prefix="bridge-instructions-"))
    per_event: dict[str, float] = {}
    for server in ("floor", "bridge") if args.only is None else (args.only,):
        started = time.monotonic()
        total = count(server, args.mode, args.events, args.connections, work)
        per_event[server] = total / args.events
        print(
            f"{server:6} {args.mode}: {total / 1e6:,.1f} M instructions for {args.events:,} events"
            f" = {per_event[server]:,.0f} per event ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
        parts = by_part(work / f"callgrind-{server}.out")
        shares = ", ".join(f"{name} {n / args.events:,.0f}" for name, n in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"       per event by part: {shares}", flush=True)
    if len(per_event) == 2:
        print(f"floor / bridge instructions per event: {per_event['floor'] / per_event['bridge']:.3f}")
    print(f"callgrind files and logs: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
