"""The identity links a mapping reads, resolved the same way by delivery and dry runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge.mapping.api import CompiledMapping, MapContext


def ids_to_resolve(mapping: CompiledMapping, events: Iterable[Any], options: Mapping[str, Any]) -> list[str]:
    """Every id of ``events`` whose link the store should look up before mapping them with
    the destination's mapping ``options``."""
    return sorted({i for e in events if type(e) is dict for i in mapping.identity_ids(e, options)})


def link_context(
    mapping: CompiledMapping,
    event: Any,
    links: Mapping[str, str],
    *,
    options: Mapping[str, Any],
    source: str,
    linked_id: str | None = None,
    ids: Iterable[str] | None = None,
) -> MapContext:
    """The context ``event`` is mapped with. It carries the links of the event's own ids
    only (``ids``, when the caller has them already, else ``mapping.identity_ids``), so a
    result never depends on which other events shared the batch. ``linked_id`` forces
    ``$link``."""
    if type(event) is not dict or not links:
        return MapContext(linked_id, options, source)
    own = {i: links[i] for i in (mapping.identity_ids(event, options) if ids is None else ids) if i in links}
    return MapContext(linked_id, options, source, own)
