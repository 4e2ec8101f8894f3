"""The destination seam: an outbound HTTP client for one upstream API.

A destination packs mapped items into requests that respect the upstream's limits,
sends one request, and reports the raw response. It does not retry, sleep, split or
dead-letter: the delivery engine (bridge/delivery) owns that policy, the same way for
every destination. A new destination is a folder under bridge/destinations/ that
registers a subclass with ``register``, plus a mapping file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from bridge.mapping.api import Output


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


@dataclass(slots=True)
class Item:
    """One mapped item bound to the job it came from."""

    job_id: int
    output: Output
    # The body as JSON, encoded once by the engine: it sizes the item for packing and is
    # spliced into the request as is (see packing.json_array), never encoded again.
    encoded: bytes

    @property
    def size(self) -> int:
        return len(self.encoded)


@dataclass(slots=True)
class Request:
    """One HTTP request's worth of items, for one endpoint of the destination."""

    endpoint: str  # destination-defined label, e.g. "bulk", "merge", "customer", "batch"
    items: list[Item]

    def split(self) -> tuple[Request, Request]:
        """Two halves, for 413 splitting and 400 bisection."""
        mid = len(self.items) // 2
        return Request(self.endpoint, self.items[:mid]), Request(self.endpoint, self.items[mid:])


@dataclass(frozen=True, slots=True)
class Response:
    status: int  # HTTP status; 0 when no response was received
    body: str = ""  # response body (truncated to a few KB)
    retry_after: float | None = None  # seconds, parsed from Retry-After when present
    error: str | None = None  # "timeout", "connection_error: ..." when status == 0
    # Set when the request could not even be built ("render_error", "unknown_endpoint"):
    # nothing was sent and no retry can change that, so it is dead-lettered (bisected
    # first, to find the items at fault), never retried for the whole retry budget.
    failure: str | None = None
    # Set by a destination when the answer refuses the account, not these events, under a
    # status that usually means bad events (MoEngage's Merge User answers a suspended or
    # blacklisted account with a 400): every request would get it, so the destination
    # pauses with its events queued, as for retry.pause_statuses, rather than bisecting
    # them into the dead-letter queue one by one.
    refuses_account: bool = False


@dataclass(frozen=True, slots=True)
class RateCost:
    """Tokens a request takes from the destination's rate-limit buckets."""

    buckets: Mapping[str, int] = field(default_factory=dict)


class Destination(ABC):
    kind: ClassVar[str]  # the `kind:` value in the config
    # The keys of a `destinations:` entry this kind reads itself (from_config's ``cfg``).
    config_keys: ClassVar[frozenset[str]]

    name: str
    region: str | None  # "us", "eu", "in", "sg", "id", or None when unknown

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str, timeout: float) -> Destination:
        """Build from one `destinations:` entry, given only the keys specific to this
        kind (the engine has already taken the common ones: name, kind, mapping,
        mapping_options, delivery, retry, rate_limits, guard). ``name`` is passed in
        ``cfg`` too. Raise ConfigError naming ``where`` (e.g. "destinations[0].api_key")
        for any problem; unknown keys are errors. ``timeout`` is the request timeout (s)."""

    # reject_reason codes about the event's data (an event too large), not the mapping:
    # dead-lettered one by one, they never count towards the bad-deploy guard, which would
    # otherwise pause the destination for a burst of large events until an operator resumes.
    DATA_REJECTIONS: frozenset[str] = frozenset()
    # Output kinds that may never overtake their users' earlier jobs, even with
    # ``delivery.ordered: false`` (a deletion: an earlier event sent after it recreates the
    # user). An unordered destination sends them last in a batch, and only once every
    # earlier job of their users is settled (DestinationWorker._send_barriers).
    ORDER_BARRIER_KINDS: frozenset[str] = frozenset()
    # {output kind: the kind of its own job's output it waits for}: an item of such a kind
    # goes out only once the earlier item of that kind of its job was accepted, or in the
    # same request after it (MoEngage adds a device to an existing user only). Otherwise
    # it is not sent in that attempt and the job takes its leader's verdict: retried, or
    # dead-lettered, with it. Unordered delivery sends such items in a second round, after
    # the rest of their batch (DestinationWorker._deliver).
    FOLLOWERS: Mapping[str, str] = MappingProxyType({})
    # Output kinds that delete their user upstream. Once such a job is delivered, the
    # identity links of its event's ids go with it (Store.ack's erase_links), so the
    # deleted user's later events are not attributed to them again.
    ERASE_KINDS: frozenset[str] = frozenset()
    # {output kind: (merged field, retained field)} for the kinds that merge one user into
    # another upstream, naming the two users' ids in those fields of the output's body.
    # Once such a job is delivered, the merged id reads as the retained one (Store.ack's
    # merge_links), so the merged user's later events are not made into that user again.
    MERGE_FIELDS: Mapping[str, tuple[str, str]] = MappingProxyType({})
    # Statuses this upstream answers in passing, retried besides retry.retryable_statuses'
    # default (408, 429, 5xx).
    ALSO_RETRYABLE: frozenset[int] = frozenset()

    def reject_reason(self, item: Item) -> str | None:
        """The dead-letter reason for an item that can never be sent (e.g. over the
        upstream's per-event size cap), or None. Checked before packing."""
        return None

    def rejection_detail(self, item: Item, reason: str) -> str:
        """Why ``reject_reason`` refused ``item`` (its ``reason``), as its dead letter's
        response_body says it to an operator."""
        return f"{self.name} cannot take this mapped item: {reason}"

    @abstractmethod
    def pack(self, items: Sequence[Item]) -> list[Request]:
        """Group items into requests within the upstream's size and count limits,
        keeping their order within each endpoint. An item that can never fit is
        returned alone in its own request (the engine will dead-letter it on 413)."""

    @abstractmethod
    def render(self, request: Request) -> bytes:
        """The exact request body that ``send`` posts."""

    def render_for_record(self, request: Request) -> bytes:
        """The request body as kept in the dead-letter queue: like ``render`` but with
        any credential the upstream wants in the body (e.g. Segment's writeKey) removed.
        The engine passes a request of one job's items (a part of one that was sent with
        other jobs' items), so each dead letter keeps only its own event's request."""
        return self.render(request)

    @abstractmethod
    async def send(self, request: Request) -> Response:
        """POST one request. Never raises for HTTP or network failures: report them."""

    @abstractmethod
    def rate_cost(self, request: Request) -> RateCost:
        """Tokens this request takes, per bucket (see ``rate_limits``)."""

    @abstractmethod
    def rate_limits(self) -> Mapping[str, float]:
        """Bucket name -> tokens per second, from the documented caps or the config."""

    def rate_limit_scope(self) -> str | None:
        """The upstream account this destination's requests count against, where the
        upstream's rate limits are per account: destinations with the same scope share one
        set of buckets (DeliveryManager). None: buckets of its own."""
        return None

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for status pages (never credentials)."""
        return {"name": self.name, "kind": self.kind, "region": self.region}

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open HTTP sessions etc."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release HTTP sessions etc."""


_REGISTRY: dict[str, type[Destination]] = {}


def register(cls: type[Destination]) -> type[Destination]:
    _REGISTRY[cls.kind] = cls
    return cls


def destination_kinds() -> dict[str, type[Destination]]:
    """All registered destination classes by kind (importing the built-in ones)."""
    import bridge.destinations.moengage
    import bridge.destinations.segment  # noqa: F401

    return dict(_REGISTRY)


DestinationFactory = Callable[[Mapping[str, Any], str], Destination]
