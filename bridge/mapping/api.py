"""The mapping seam: what the rest of the bridge may ask of a compiled mapping.

A mapping file (mappings/NAME.yaml) is data. It is validated and compiled once at
load into closures; the delivery path only calls ``apply``. Nothing here knows any
event or field name: those live in the YAML.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Output:
    """One destination-shaped item produced by a rule.

    ``kind`` names the destination operation (for MoEngage: ``customer``, ``event``,
    ``merge``; for Segment: ``track``, ``identify``, ...). ``body`` is the item exactly
    as the destination client will place it in a request.
    """

    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Discarded:
    """The event is deliberately not sent (e.g. ``anonymous_user``, ``loop``)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Failed:
    """The event could not be mapped and must be dead-lettered (coercion policy)."""

    reason: str
    detail: str = ""


MapResult = list[Output] | Discarded | Failed


@dataclass(frozen=True, slots=True)
class MapContext:
    """Per-delivery facts a mapping may read besides the event itself.

    ``links`` holds the identity links resolved for the ids of
    ``CompiledMapping.identity_ids``: the identity key's link is ``$link``, and the
    ``linked`` step reads them all. ``linked_id``, when set, is ``$link`` regardless
    (dry runs and fixtures). ``options`` are the destination's ``mapping_options`` from
    the config; ``source`` is the source name.
    """

    linked_id: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    links: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A problem in a mapping file, precise enough to fix without reading Python."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    yaml_path: str  # e.g. "rules[2].body.actions[0].action"
    message: str  # what was expected / found, with "did you mean" when it helps

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.yaml_path}: {self.message}"


class MappingError(Exception):
    """A mapping file (or set of files) failed validation."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


# See CompiledMapping.link_filter.
LinkFilter = bool | tuple[str, frozenset[str]]


class CompiledMapping(ABC):
    """A validated, compiled mapping. Immutable; hot reload swaps whole objects."""

    name: str  # file stem, e.g. "segment-to-moengage"
    version: str  # content hash of the file(s) it was compiled from
    source_format: str  # "segment" | "moengage_streams"
    destination_kind: str  # "moengage" | "segment"
    path: str  # file it was loaded from

    @abstractmethod
    def apply(self, event: dict[str, Any], ctx: MapContext) -> MapResult:
        """Map one inbound event. Never raises for bad event data: returns Failed."""

    @abstractmethod
    def identity_key(self, event: dict[str, Any]) -> str | None:
        """The id whose identity link should be resolved before ``apply`` (or None)."""

    @abstractmethod
    def identity_ids(self, event: dict[str, Any], options: Mapping[str, Any] | None = None) -> list[str]:
        """Every id whose link should be resolved before ``apply``: the identity key, then
        those of ``identity.also`` (e.g. an alias's previousId). None for an ``event`` that
        is not a JSON object (a stored payload may be any JSON): an empty list.
        ``options``: the destination's ``mapping_options``, as ``apply`` gets them, since
        which ids name a user may depend on them (an anonymousId, with ``anonymous_ids``)."""

    @abstractmethod
    def identity_link(self, event: dict[str, Any]) -> tuple[str, str] | None:
        """An identity link (from_id, to_id) this event teaches, recorded at ingest."""

    def link_filter(self) -> LinkFilter:
        """What an event needs for ``identity_link`` to find anything, checked by ingest
        before it calls it: False when this mapping learns no links; (field, values) when
        only an event whose top-level ``field`` is one of the strings ``values`` can teach
        one; True when any event might."""
        return True

    def option_names(self) -> frozenset[str] | None:
        """The names this mapping reads as ``$options.NAME`` (a destination's
        ``mapping_options`` key it never reads is a typo), or None when it may read any."""
        return None

    def option_problems(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(name, problem) for each of ``options`` whose value the mapping's ``options:``
        declaration refuses ("expected a boolean (true or false), got ..."); empty when
        all fit or the mapping declares none."""
        return []

    @abstractmethod
    def integration_names(self) -> tuple[str, ...]:
        """Names under which the Segment ``integrations`` object addresses this
        destination (e.g. "MoEngage"); empty when the source format has none."""
