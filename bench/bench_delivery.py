"""Delivery's own CPU, in one process: the real store, mapping and worker, no network.

    python -m bench.bench_delivery [--events 100000] [--repeat 3] [--delivery-set KEY=VALUE]

The delivery phase of ``make bench`` runs the bridge against a stand-in MoEngage over
loopback, so its figure also holds the HTTP client, the kernel's socket work and whatever
else the host does meanwhile, and it moves by 20-30% between runs. This takes those out:
it stores ``--events`` events of the bench's batch mix (identify, track and page, 1:3:2)
through the bridge's own Segment normalising and ingest path into a fresh SQLite store,
then runs the MoEngage destination's real worker (lease, map, pack, render, settle) with
the upstream answered in-process: every request is rendered as it would be posted and
answered 200 at once.

It prints, per run, events/s, CPU per event for the whole process and for the store's
writer thread, and then what the event loop's main steps cost per event on the same
stored events, one step at a time: parsing the stored payload, mapping it, and encoding
the mapped items. Compare runs of two versions of the code alternately, on a quiet core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.payloads import batch_workload
from bench.procs import CLOCK_TICKS
from bench.servers import MOENGAGE_DEST, WRITE_KEY, bridge_config
from bridge.app import settle_garbage_collector
from bridge.config.model import load_config
from bridge.destinations.base import Request, Response
from bridge.mapping.api import MapContext
from bridge.runtime import Runtime
from bridge.sources.encoding import encode_event
from bridge.sources.segment.spec import normalise

STORE_CHUNK = 1000  # events per enqueue while pre-loading
WRITER_THREAD = "bridge-sqlite-writer"
MOENGAGE_OK = Response(200, '{"status":"success","message":"Your request has been accepted."}')


@dataclass(frozen=True)
class DeliveryRun:
    events: int
    seconds: float
    events_per_s: float
    cpu_us_per_event: float  # every thread of this process
    writer_us_per_event: float  # the store's writer thread alone
    requests: int
    items: int
    # The worker's delivery.concurrency: the config's default (2) unless --delivery-set
    # changes it; `make bench` delivers with 1. Two loops walk the queue by ordering key,
    # which one pipelined loop does not, so the two figures differ.
    concurrency: int


@dataclass(frozen=True)
class Steps:
    """The event loop's main per-event steps, timed alone (µs per event, best of 3 rounds)."""

    parse: float  # orjson.loads of the stored payload
    map: float  # mapping.apply
    encode: float  # orjson.dumps of every mapped item's body


def bench_events(n: int) -> list[dict[str, Any]]:
    """``n`` events of the bench's batch mix, each with a fresh messageId."""
    workload = batch_workload(WRITE_KEY)
    events: list[dict[str, Any]] = []
    while len(events) < n:
        _, body = workload.next_request()
        events.extend(orjson.loads(body)["batch"])
    return events[:n]


def _thread_cpu(native_id: int) -> float:
    stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _writer_cpu() -> float:
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD and thread.native_id is not None:
            return _thread_cpu(thread.native_id)
    return 0.0


async def _runtime(work: Path, delivery: dict[str, Any] | None) -> Runtime:
    config_path = work / "bridge.yaml"
    # No stand-ins: the worker's client never reaches the network (see _answer_in_process).
    config_path.write_bytes(orjson.dumps(bridge_config(work, "delivery", 1, None, "paused", delivery=delivery)))
    runtime = Runtime(load_config(config_path))
    await runtime.store.open()
    runtime.load_mappings()
    return runtime


async def _preload(runtime: Runtime, events: Sequence[dict[str, Any]]) -> None:
    """Store ``events`` the way a /v1/batch call would: normalised, encoded, links learnt."""
    source = next(s for s in runtime.config.sources if MOENGAGE_DEST in s.to)
    received = datetime.now(UTC)
    for start in range(0, len(events), STORE_CHUNK):
        collected = runtime.ingestor.collector(source)
        for item in events[start : start + STORE_CHUNK]:
            event, message_id, key = normalise(item, call_type=None, received_at=received)
            collected.accept(event, message_id, key, encode_event(event))
        await runtime.ingestor.store_events(source, collected.incoming)


def _answer_in_process(runtime: Runtime, tally: list[int]) -> None:
    """Replace the MoEngage client's POST: render the body it would send, answer 200."""
    client = runtime.delivery.workers[MOENGAGE_DEST].client

    async def send(request: Request) -> Response:
        client.render(request)
        tally[0] += 1
        tally[1] += len(request.items)
        await asyncio.sleep(0)  # a real send yields to the loop at least once
        return MOENGAGE_OK

    client.send = send  # type: ignore[method-assign]


async def _depth(runtime: Runtime) -> int:
    stats = (await runtime.store.queue_stats()).get(MOENGAGE_DEST)
    return stats.depth if stats is not None else 0


async def deliver_run(events: int, delivery: dict[str, Any] | None = None, timeout: float = 600.0) -> DeliveryRun:
    """Store ``events`` events, then time the MoEngage worker delivering all of them."""
    with tempfile.TemporaryDirectory(prefix="bridge-bench-delivery-") as tmp:
        runtime = await _runtime(Path(tmp), delivery)
        try:
            await _preload(runtime, bench_events(events))
            queued = await _depth(runtime)
            if queued != events:
                raise RuntimeError(f"stored {queued} jobs for {events} events")
            tally = [0, 0]
            _answer_in_process(runtime, tally)
            worker = runtime.delivery.workers[MOENGAGE_DEST]
            settle_garbage_collector()  # as `bridge serve` does before it serves
            cpu, writer, started = time.process_time(), _writer_cpu(), time.perf_counter()
            await worker.start()
            try:
                # The in-process upstream's count first: counting the queue in SQLite every
                # 20 ms (up to 100k index entries each time) took a fifth of the core this
                # measures. The queue is counted once the upstream has every item, and once
                # a second meanwhile, in case some event never reaches it.
                counted_at = started
                while True:
                    now = time.perf_counter()
                    if tally[1] >= events or now - counted_at >= 1.0:
                        counted_at = now
                        if await _depth(runtime) == 0:
                            break
                    if now - started > timeout:
                        raise RuntimeError(f"delivery did not finish within {timeout} s")
                    await asyncio.sleep(0.02)
                seconds = time.perf_counter() - started
                cpu, writer = time.process_time() - cpu, _writer_cpu() - writer
            finally:
                await worker.stop(10)
            if tally[1] != events:
                raise RuntimeError(f"the upstream got {tally[1]} items for {events} events")
            return DeliveryRun(
                events,
                round(seconds, 3),
                round(events / seconds),
                round(cpu / events * 1e6, 2),
                round(writer / events * 1e6, 2),
                tally[0],
                tally[1],
                worker.config.delivery.concurrency,
            )
        finally:
            await runtime.store.close()


async def step_costs(events: int, lease: int = 500, rounds: int = 3) -> Steps:
    """The per-event cost of parsing, mapping and encoding, each timed alone.

    In chunks of ``lease`` events (the worker's default ``batch_size``), each chunk's
    objects dropped before the next, as the worker holds one lease's events at a time.
    Timing all the events at once kept them all alive, and the collector's passes over
    them about doubled the figures (session 13: parse 6.8 us an event, against 3.7-4.1)."""
    with tempfile.TemporaryDirectory(prefix="bridge-bench-delivery-") as tmp:
        runtime = await _runtime(Path(tmp), None)
        try:
            mapping = runtime.mappings()[runtime.delivery.workers[MOENGAGE_DEST].config.mapping]
            source = next(s for s in runtime.config.sources if MOENGAGE_DEST in s.to)
            received = datetime.now(UTC)
            payloads = [
                encode_event(normalise(item, call_type=None, received_at=received)[0]) for item in bench_events(events)
            ]
        finally:
            await runtime.store.close()
    settle_garbage_collector()  # as `bridge serve` does before it serves
    ctx = MapContext(None, {}, source.name)
    best = [float("inf")] * 3
    for _ in range(rounds):
        spent = [0.0, 0.0, 0.0]
        for start in range(0, len(payloads), lease):
            began = time.perf_counter()
            parsed = [orjson.loads(p) for p in payloads[start : start + lease]]
            parsed_at = time.perf_counter()
            mapped = [mapping.apply(e, ctx) for e in parsed]
            mapped_at = time.perf_counter()
            bodies = [orjson.dumps(out.body) for result in mapped if isinstance(result, list) for out in result]
            encoded_at = time.perf_counter()
            spent[0] += parsed_at - began
            spent[1] += mapped_at - parsed_at
            spent[2] += encoded_at - mapped_at
            del parsed, mapped, bodies
        best = [min(b, s) for b, s in zip(best, spent, strict=True)]
    n = len(payloads)
    parse, map_, encode = (round(b / n * 1e6, 2) for b in best)
    return Steps(parse=parse, map=map_, encode=encode)


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_delivery", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--delivery-set", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = p.parse_args(argv)
    if args.events < 1 or args.repeat < 1:
        p.error("--events and --repeat must be at least 1")
    delivery = dict(args.delivery_set) or None
    runs = []
    for _ in range(args.repeat):
        run = await deliver_run(args.events, delivery)
        runs.append(run)
        if not args.json:
            print(
                f"delivered {run.events:,} events in {run.seconds:.2f} s = {run.events_per_s:,} ev/s;"
                f" CPU {run.cpu_us_per_event:.1f} µs/event (writer thread {run.writer_us_per_event:.1f});"
                f" {run.requests:,} requests; concurrency {run.concurrency}",
                flush=True,
            )
    steps = await step_costs(min(args.events, 20_000))
    if args.json:
        print(orjson.dumps({"runs": [asdict(r) for r in runs], "steps": asdict(steps)}).decode())
    else:
        print(
            f"event-loop steps alone, µs/event: parse {steps.parse:.2f}, map {steps.map:.2f},"
            f" encode {steps.encode:.2f} (pid {os.getpid()})"
        )
    return 0


if __name__ == "__main__":
    import uvloop

    raise SystemExit(uvloop.run(main()))
