"""The identity links a mapping reads, resolved the same way by delivery and dry runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge.mapping.api import CompiledMapping, MapContext


def ids_to_resolve(mapping: CompiledMapping, events: Iterable[Any]) -> list[str]:
    """Every id of ``events`` whose link the store should look up before mapping them."""
    return sorted({i for e in events if type(e) is dict for i in mapping.identity_ids(e)})


def link_context(
    mapping: CompiledMapping,
    event: Any,
    links: Mapping[str, str],
    *,
    options: Mapping[str, Any],
    source: str,
    linked_id: str | None = None,
) -> MapContext:
    """The context ``event`` is mapped with: ``$link`` is its identity key's link (or
    ``linked_id`` when given), and the ``linked`` step sees the links of its own ids only,
    so a result never depends on which other events shared the batch."""
    if type(event) is not dict or not links:
        return MapContext(linked_id, options, source)
    key = mapping.identity_key(event)
    own = {i: links[i] for i in mapping.identity_ids(event) if i in links}
    return MapContext(linked_id or (links.get(key) if key else None), options, source, own)
