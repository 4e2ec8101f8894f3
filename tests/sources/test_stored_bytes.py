"""What ingest stores for the bench's workloads, byte for byte, against a recorded digest.

The per-event ingest path is tuned by instruction count (docs/benchmarks.md), and such a
change must not alter a stored byte: every IncomingEvent a batch, a single call and a
Streams request become (payload, messageId, ordering key, destinations, identity links)
is hashed, with the receipt time fixed, and compared with the digest the code before the
change gave. Change the digests only for a change meant to alter what is stored.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.payloads import batch_workload, single_workload, streams_workload
from bench.servers import STREAMS_SOURCE, WRITE_KEY, bridge_config
from bridge.config.model import load_config
from bridge.mapping import load_mapping_file
from bridge.sources.base import Collected, Ingestor
from bridge.sources.segment.routes import SegmentSources
from bridge.sources.segment.spec import iso
from bridge.sources.streams.routes import StreamsSources

RECEIVED = datetime(2026, 11, 23, 21, 14, 9, 37000, tzinfo=UTC)
REQUESTS = 24  # each workload cycles through 16 (batch, Streams) or 64 (single) bodies


class FixedClock:
    def now(self) -> tuple[datetime, str, int]:
        return RECEIVED, iso(RECEIVED), int(RECEIVED.timestamp()) * 1_000_000 + RECEIVED.microsecond

    def envelope(self) -> Any:
        from bridge.sources.segment.spec import Envelope

        return Envelope(*self.now())


class NumberedIds:
    """The workloads' ids, numbered rather than random: the same bodies every run."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, n: int) -> list[bytes]:
        self.n += n
        return [orjson.dumps(f"00000000-0000-4000-8000-{i:012d}") for i in range(self.n - n, self.n)]


def _digest(collected: list[Collected]) -> str:
    h = hashlib.sha256()
    for c in collected:
        for e in c.incoming:
            h.update(repr((e.message_id, e.ordering_key, e.destinations, e.links)).encode())
            h.update(e.payload)
        h.update(repr(c.rejected).encode())
    return h.hexdigest()


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    path = tmp_path / "bridge.yaml"
    path.write_bytes(orjson.dumps(bridge_config(tmp_path, "t", 1, None, "paused")))
    config = load_config(path)
    mappings_dir = Path(__file__).resolve().parents[2] / "mappings"
    mappings = {
        d.mapping: load_mapping_file(mappings_dir / f"{d.mapping}.yaml") for d in config.destinations if d.mapping
    }
    return Ingestor(None, config, lambda: mappings, lambda names: None)  # type: ignore[arg-type]


def _bodies(workload: Any) -> list[tuple[bytes, bytes]]:
    return [workload.next_request() for _ in range(REQUESTS)]


def _sent_at_moved(body: bytes, i: int) -> bytes:
    """The batch with its sentAt moved by ``i`` times 7,777.777 s: skews of many minutes
    and milliseconds, not the workload's none."""
    head, sep, tail = body.rpartition(b'"sentAt":"2026-11-23T21:14:07.512Z"')
    assert sep
    at = datetime(2026, 11, 23, 21, 14, 7, 512000, tzinfo=UTC).timestamp() - i * 7777.777
    return head + b'"sentAt":' + orjson.dumps(iso(datetime.fromtimestamp(at, UTC))) + tail


def _ids(workload: Any) -> Any:
    ids = NumberedIds()
    # The workload's next_request closes over its IdSource: swap in numbered ids.
    for cell in workload.next_request.__closure__:
        if hasattr(cell.cell_contents, "take"):
            cell.cell_contents = ids
    return workload


def test_segment_calls_store_the_same_bytes(ingestor: Ingestor) -> None:
    segment = SegmentSources(ingestor.config, ingestor)
    segment._clock = FixedClock()  # type: ignore[assignment]
    source = next(s for s in ingestor.config.sources if s.kind == "segment")
    batches = [segment._collect_call("batch", source, body) for _path, body in _bodies(_ids(batch_workload(WRITE_KEY)))]
    skewed = [
        segment._collect_call("batch", source, _sent_at_moved(body, i))
        for i, (_path, body) in enumerate(_bodies(_ids(batch_workload(WRITE_KEY, seed=5))))
    ]
    singles = [
        segment._collect_call(path.decode().rsplit("/", 1)[-1], source, body)
        for path, body in _bodies(_ids(single_workload(WRITE_KEY)))
    ]
    assert sum(len(c.incoming) for c in batches) == 100 * REQUESTS
    assert (_digest(batches), _digest(skewed), _digest(singles)) == (BATCH_DIGEST, SKEWED_DIGEST, SINGLE_DIGEST)


def test_streams_requests_store_the_same_bytes(ingestor: Ingestor) -> None:
    streams = StreamsSources(ingestor.config, ingestor)
    source = next(s for s in ingestor.config.sources if s.name == STREAMS_SOURCE)
    workload = _ids(streams_workload(STREAMS_SOURCE, "u", "p"))
    collected = [streams._collect(source, body) for _path, body in _bodies(workload)]
    assert sum(len(c.incoming) for c in collected) == 100 * REQUESTS
    assert _digest(collected) == STREAMS_DIGEST


BATCH_DIGEST = "852d602d209002da5e7e1e317c3b137575338c2c17a0feb1adba3aadaf0cb121"
SKEWED_DIGEST = "fc73713b07f2a14812a247b524931f0d825ac1e9394079499661a61892cd2001"
SINGLE_DIGEST = "7f6ff7eca6265dd9d75222041e643674ad17e9bb1696b56ecae40435bc52b58b"
STREAMS_DIGEST = "a95cedf595e7551ee69fa77f5dd3f9a0eb6df71edb85909f4df4c9e71ef16eb2"
