"""The identity links ingest records come from the mapping set in force at each request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from bench.servers import MOENGAGE_DEST, bridge_config
from bridge.config.model import load_config
from bridge.mapping.api import CompiledMapping
from bridge.sources.base import Ingestor
from bridge.store.base import EnqueueResult, IdentityLink, IncomingEvent, Store


class Recording:
    def __init__(self) -> None:
        self.calls: list[list[IncomingEvent]] = []

    async def enqueue(self, source: str, events: Sequence[IncomingEvent]) -> EnqueueResult:
        self.calls.append(list(events))
        return EnqueueResult(len(events), 0)


class Linking:
    """Stands in for a compiled mapping: only what ingest asks of one."""

    def __init__(self, to: str) -> None:
        self.to = to

    def identity_link(self, event: dict[str, Any]) -> tuple[str, str] | None:
        return (event["userId"], self.to)


async def test_a_reloaded_mapping_set_is_used_for_the_next_requests_links(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_bytes(orjson.dumps(bridge_config(tmp_path, "t", 1, None, "paused")))
    config = load_config(path)
    source = next(s for s in config.sources if s.kind == "segment")
    mapping_name = next(d.mapping for d in config.destinations if d.name == MOENGAGE_DEST)
    in_force: list[Mapping[str, CompiledMapping]] = [{mapping_name: cast(CompiledMapping, Linking("first"))}]
    store = Recording()
    ingestor = Ingestor(cast(Store, store), config, lambda: in_force[0], lambda names: None)

    async def request(message_id: str) -> None:
        collected = ingestor.collector(source)
        collected.accept({"userId": "u1"}, message_id, "u1", b"{}")
        await ingestor.store_events(source, collected.incoming)

    await request("m1")
    await request("m2")
    in_force[0] = {mapping_name: cast(CompiledMapping, Linking("second"))}  # a reload
    await request("m3")
    in_force[0] = {}  # the destination's mapping is gone: no link for it
    await request("m4")

    links = [call[0].links for call in store.calls]
    assert links == [
        (IdentityLink(MOENGAGE_DEST, "u1", "first"),),
        (IdentityLink(MOENGAGE_DEST, "u1", "first"),),
        (IdentityLink(MOENGAGE_DEST, "u1", "second"),),
        (),
    ]
