"""The identity links ingest records come from the mapping set in force at each request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from bench.servers import MOENGAGE_DEST, bridge_config
from bridge.config.model import load_config
from bridge.mapping import load_mapping_file
from bridge.mapping.api import CompiledMapping, LinkFilter
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

    def __init__(self, to: str, link_filter: LinkFilter = True) -> None:
        self.to = to
        self._filter = link_filter
        self.asked: list[dict[str, Any]] = []

    def link_filter(self) -> LinkFilter:
        return self._filter

    def identity_link(self, event: dict[str, Any]) -> tuple[str, str] | None:
        self.asked.append(event)
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


def test_a_mappings_link_filter_decides_which_events_it_is_asked_about(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_bytes(orjson.dumps(bridge_config(tmp_path, "t", 1, None, "paused")))
    config = load_config(path)
    source = next(s for s in config.sources if s.kind == "segment")
    mapping_name = next(d.mapping for d in config.destinations if d.name == MOENGAGE_DEST)
    identify_only = Linking("t", ("type", frozenset({"identify"})))
    in_force: dict[str, CompiledMapping] = {mapping_name: cast(CompiledMapping, identify_only)}
    ingestor = Ingestor(cast(Store, Recording()), config, lambda: in_force, lambda names: None)
    collected = ingestor.collector(source)
    events: list[dict[str, Any]] = [
        {"type": "identify", "userId": "u1"},
        {"type": "track", "userId": "u2"},
        {"type": ["identify"], "userId": "u3"},  # not a string: never one of the values
        {"userId": "u4"},
    ]
    for i, event in enumerate(events):
        collected.accept(event, f"m{i}", "u", b"{}")
    assert identify_only.asked == [events[0]]
    assert [e.links for e in collected.incoming] == [(IdentityLink(MOENGAGE_DEST, "u1", "t"),), (), (), ()]

    never = Linking("t", False)
    in_force = {mapping_name: cast(CompiledMapping, never)}
    collected = ingestor.collector(source)
    collected.accept(events[0], "m9", "u", b"{}")
    assert never.asked == [] and collected.incoming[0].links == ()


def test_the_shipped_mappings_say_which_events_teach_links() -> None:
    mappings = Path(__file__).resolve().parents[2] / "mappings"
    to_moengage = load_mapping_file(mappings / "segment-to-moengage.yaml")
    assert to_moengage.link_filter() == ("type", frozenset({"identify"}))
    assert to_moengage.identity_link({"type": "identify", "userId": "u1", "traits": {"id": "c1"}}) == ("u1", "c1")
    assert load_mapping_file(mappings / "moengage-to-segment.yaml").link_filter() is False
