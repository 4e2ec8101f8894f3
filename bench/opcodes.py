"""Interpreter steps per event, counted in the running bridge: where its Python work goes.

    python -m bench.opcodes [--mode batch|single|streams] [--events 10000] [--lines spec.py]

``bridge serve`` (the bench's config, destinations paused) runs in a child process under a
``sys.settrace`` hook that sets ``f_trace_opcodes`` in every thread. The hook counts nothing
until a first SIGUSR1, counts every opcode while the load generator sends ``--events``
events (after a warm-up of a fifth as many), and writes its counts at a second SIGUSR1.
The report gives each function's opcodes and calls per event, and with ``--lines`` each
line of the named files.

Unlike callgrind's instructions (``bench.instructions``) these name Python functions and
lines; unlike a profiler's times they do not move with the machine. An opcode is not a
unit of time (a dict copy is one, a local load another): this shows where the
interpreter takes its steps, and ``bench.instructions`` what they cost. Tracing makes the
server many times slower, so nothing here is a speed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from bench.instructions import _bridge_argv
from bench.procs import PYTHON, SERVER_CPU, BenchError, Child, free_port, run_loadgen, wait_http
from bench.suite import INGEST_PHASES, Settings, _loadgen_args

Where = tuple[str, int, str]  # file, first line, function name


class _Counter:
    """The child's side: opcodes per function and per line, counted between two SIGUSR1s."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.active = False
        self.functions: Counter[Where] = Counter()
        self.calls: Counter[Where] = Counter()
        self.lines: Counter[tuple[str, int]] = Counter()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self.active:
            return None  # a frame entered while off stays untraced
        frame.f_trace_opcodes = True
        code = frame.f_code
        where = (code.co_filename, code.co_firstlineno, code.co_name)
        self.calls[where] += 1
        functions, lines, filename = self.functions, self.lines, code.co_filename

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                functions[where] += 1
                lines[(filename, frame.f_lineno or 0)] += 1
            return local

        return local

    def toggle(self, signum: int, frame: FrameType | None) -> None:
        if not self.active:
            self.functions.clear()
            self.calls.clear()
            self.lines.clear()
            self.active = True
            return
        self.active = False
        report = {
            "functions": [[*where, n, self.calls[where]] for where, n in self.functions.most_common()],
            "lines": [[path, line, n] for (path, line), n in self.lines.items()],
        }
        self.out.write_bytes(orjson.dumps(report))


def _child(out: Path, serve_args: list[str]) -> int:
    counter = _Counter(out)
    signal.signal(signal.SIGUSR1, counter.toggle)
    sys.settrace(counter.trace)
    threading.settrace(counter.trace)
    from bridge.cli import main as bridge_main

    return bridge_main(serve_args)


def count(mode: str, events: int, connections: int, work: Path) -> dict[str, Any]:
    """The counts (``_Counter``'s report) of the bridge taking ``events`` events."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    out = work / "opcodes.json"
    argv = _bridge_argv(work, port)
    serve_args = argv[argv.index("bridge.cli") + 1 :]
    child_argv = [PYTHON, "-m", "bench.opcodes", "--child", str(out), *serve_args]
    child = Child("bridge-opcodes", child_argv, work, SERVER_CPU, announces=False)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120, child=child)
        load = _loadgen_args(mode, Settings(duration=3600.0, warmup=0.0), connections=connections)
        run_loadgen(port, *load, "--events", str(max(events // 5, 1)), timeout=3600.0)
        child.proc.send_signal(signal.SIGUSR1)
        tally = run_loadgen(port, *load, "--events", str(events), timeout=3600.0)
        child.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        child.stop(timeout=60)
    if int(tally.get("all_events", 0)) < events:
        raise BenchError(f"the load generator sent {tally.get('all_events')} of {events} events: {tally}")
    if not out.exists():
        raise BenchError(f"the bridge wrote no counts: {child.tail()}")
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    return report


def _short(path: str) -> str:
    for marker in ("site-packages/", "/bridge/", "/bench/"):
        if marker in path:
            _, _, tail = path.rpartition(marker)
            return tail if marker == "site-packages/" else marker.strip("/") + "/" + tail
    return path


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--child"]:
        return _child(Path(args_in[1]), args_in[2:])
    p = argparse.ArgumentParser(prog="python -m bench.opcodes", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=[mode for _, mode, _ in INGEST_PHASES], default="batch")
    p.add_argument("--events", type=int, default=10_000, help="events counted (after a warm-up of a fifth as many)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--top", type=int, default=30, help="functions listed")
    p.add_argument("--lines", action="append", default=[], help="also list lines of files ending so (repeatable)")
    args = p.parse_args(args_in)
    report = count(args.mode, args.events, args.connections, Path(tempfile.mkdtemp(prefix="bridge-opcodes-")))
    n = args.events
    total = sum(row[3] for row in report["functions"])
    print(f"bridge {args.mode}: {total / n:,.1f} opcodes per event ({total:,} for {n:,} events)")
    print(f"{'per event':>10} {'calls/ev':>9}  function")
    for path, line, name, ops, calls in report["functions"][: args.top]:
        print(f"{ops / n:10.1f} {calls / n:9.2f}  {_short(path)}:{line} {name}")
    for suffix in args.lines:
        rows = sorted((r for r in report["lines"] if r[0].endswith(suffix)), key=lambda r: (r[0], r[1]))
        print(f"\nlines of *{suffix}, opcodes per event:")
        for path, line, ops in rows:
            text = Path(path).read_text().splitlines()[line - 1].strip() if Path(path).exists() and line else ""
            print(f"{ops / n:8.1f}  {_short(path)}:{line}  {text[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
