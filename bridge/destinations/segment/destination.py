"""Segment Tracking API client: region-checked write key, POST {host}/v1/batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson

from bridge.destinations import http
from bridge.destinations.base import ConfigError, Destination, Item, RateCost, Request, Response, register
from bridge.destinations.config import check_keys, optional_base_url, optional_int, required_str
from bridge.destinations.packing import chunk, json_object

HOSTS = {"us": "https://api.segment.io", "eu": "https://events.eu1.segmentapis.com"}
CALL_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
BATCH = "batch"

MAX_EVENT_BYTES = 32 * 1024  # Segment refuses larger events (400) and its clients drop them
SEGMENT_MAX_BATCH_BYTES = 500_000
SEGMENT_MAX_BATCH_EVENTS = 2500  # beyond this Segment answers 200 and drops the events
DEFAULT_BATCH_BYTES = 475_000  # the 500 KB cap less the margin Segment's own clients keep
DEFAULT_BATCH_EVENTS = 500
REQUESTS_PER_SECOND = 1000.0  # Segment's documented per-workspace ceiling

_KEYS = frozenset({"name", "kind", "write_key", "region", "base_url", "max_batch_events", "max_batch_bytes"})


_HOST_REGIONS = {urlsplit(url).hostname: region for region, url in HOSTS.items()}


def _hostname(url: str) -> str:
    """The host ``url`` names, lower-cased and without a trailing dot ("" if none). A value
    without a scheme is read as a bare host, as a Segment client's host setting is written."""
    try:
        host = urlsplit(http.as_url(url)).hostname
    except ValueError:
        return ""
    return (host or "").rstrip(".")


def host_region(url: str) -> str | None:
    """The region whose Segment ingestion host ``url`` names, or None for any other host."""
    return _HOST_REGIONS.get(_hostname(url))


def check_region_host(url: str, region: str, where: str, role: str) -> None:
    """Refuse ``url`` (a URL or a bare host) when it is the other region's Segment ingestion
    host: Segment answers 200 there and drops every event sent with a key of ``region``.
    ``role`` says why ``url`` must be ``region``'s, e.g. "region is eu". Custom hosts (a
    proxy, a stand-in, another bridge) are the operator's call and pass."""
    other = host_region(url)
    if other is None or other == region:
        return
    raise ConfigError(
        f"{where}: {_hostname(url)} is Segment's {other.upper()} ingestion host, but {role}; Segment silently "
        f"drops data sent with a key of one region to the other's host. Use {HOSTS[region]} (the default for "
        f"region {region}), or leave it out"
    )


def sent_at_now() -> str:
    """ISO-8601 UTC with milliseconds and Z, as Segment's clients send it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@register
class SegmentDestination(Destination):
    kind: ClassVar[str] = "segment"
    config_keys: ClassVar[frozenset[str]] = _KEYS

    def __init__(
        self,
        *,
        name: str,
        write_key: str,
        region: str,
        base_url: str | None = None,
        max_batch_events: int = DEFAULT_BATCH_EVENTS,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        timeout: float = 10.0,
    ) -> None:
        if region not in HOSTS:
            raise ValueError(f"region must be one of {sorted(HOSTS)}, got {region!r}")
        self.name = name
        self.region = region
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.timeout = timeout
        self._write_key = write_key
        self._host = base_url or HOSTS[region]
        self._url = f"{self._host}/v1/batch"
        self._headers = {"Authorization": http.basic_auth(write_key, ""), "Content-Type": "application/json"}
        self._envelope_bytes = len(orjson.dumps({"batch": [], "sentAt": sent_at_now(), "writeKey": write_key}))
        self._http = http.LazySession(timeout)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str, timeout: float) -> SegmentDestination:
        check_keys(cfg, cls.config_keys, where)
        if cfg.get("region") is None:
            raise ConfigError(f"{where}.region: required (one of: us, eu)")
        region = cfg["region"]
        if not isinstance(region, str) or region not in HOSTS:  # a list or a mapping is unhashable
            raise ConfigError(
                f'{where}.region: must be "us" or "eu" (Segment ingests only in these regions), got {region!r}'
            )
        base_url = optional_base_url(cfg, "base_url", where)
        if base_url is not None:
            check_region_host(base_url, region, f"{where}.base_url", f"region is {region}")
            if host_region(base_url) is not None and urlsplit(base_url).path:
                # Segment's docs give the HTTP API's host as ".../v1": copied here, every
                # batch went to /v1/v1/batch.
                raise ConfigError(
                    f"{where}.base_url: {_hostname(base_url)} is Segment's ingestion host, to which the bridge "
                    f"posts {{host}}/v1/batch itself; give it without a path ({HOSTS[region]}), or leave "
                    f"base_url out: region {region} chooses it"
                )
        write_key = required_str(cfg, "write_key", where)
        if write_key != write_key.strip() or not write_key.isprintable():
            # Never quoted here: it is a secret. A line break from a secret file turns into
            # a trailing space inside a quoted "${VAR}", and Segment answers 200 to a key it
            # does not know and drops every event sent with it.
            raise ConfigError(
                f"{where}.write_key: starts or ends with whitespace, or holds a control character (a line "
                "break from a secret file, say); no Segment write key does, and Segment answers 200 to an "
                "unknown key and silently drops every event sent with it"
            )
        return cls(
            name=cfg["name"] if isinstance(cfg.get("name"), str) else cls.kind,
            write_key=write_key,
            region=region,
            base_url=base_url,
            max_batch_events=optional_int(
                cfg,
                "max_batch_events",
                where,
                default=DEFAULT_BATCH_EVENTS,
                minimum=1,
                maximum=SEGMENT_MAX_BATCH_EVENTS,
            ),
            max_batch_bytes=optional_int(
                cfg,
                "max_batch_bytes",
                where,
                default=DEFAULT_BATCH_BYTES,
                minimum=MAX_EVENT_BYTES + 1024,
                maximum=SEGMENT_MAX_BATCH_BYTES,
            ),
            timeout=timeout,
        )

    @property
    def host(self) -> str:
        """The ingestion host chosen by region (or ``base_url``), without a trailing slash."""
        return self._host

    @property
    def write_key(self) -> str:
        """The write key (for wiring a sandbox stand-in; never put it in logs)."""
        return self._write_key

    def _event(self, item: Item) -> bytes:
        # Segment drops batch items without a type; the output kind names it, as the
        # object's first member, spliced in front of the body's own encoded members.
        if "type" in item.output.body:
            return item.encoded
        typed = b'{"type":' + orjson.dumps(item.output.kind)
        return typed + (b"}" if item.encoded == b"{}" else b"," + item.encoded[1:])

    def _event_bytes(self, item: Item) -> int:
        return item.size if "type" in item.output.body else len(self._event(item))

    DATA_REJECTIONS = frozenset({"event_too_large"})
    # Segment's own clients retry these too: its load balancers answer them in passing.
    ALSO_RETRYABLE = frozenset({410, 460})

    def reject_reason(self, item: Item) -> str | None:
        if item.output.kind not in CALL_TYPES:
            return "unsupported_output_kind"
        if self._event_bytes(item) > MAX_EVENT_BYTES:
            return "event_too_large"
        return None

    def rejection_detail(self, item: Item, reason: str) -> str:
        detail = super().rejection_detail(item, reason)
        if reason != "event_too_large":
            return detail
        # By how much, so an operator sees what to trim (a mapping, or the Streams source's
        # exported attributes) before a replay, without measuring the request_body.
        return (
            f"{detail}: the mapped {item.output.kind} is {self._event_bytes(item)} bytes, and Segment takes at "
            f"most {MAX_EVENT_BYTES} bytes an event (its Tracking API answers 400 to a larger one)"
        )

    def pack(self, items: Sequence[Item]) -> list[Request]:
        runs = chunk(
            items,
            envelope_bytes=self._envelope_bytes,
            max_bytes=self.max_batch_bytes,
            max_count=self.max_batch_events,
            item_bytes=self._event_bytes,
        )
        return [Request(BATCH, run) for run in runs]

    def _batch(self, request: Request) -> bytes:
        return b"[" + b",".join([self._event(item) for item in request.items]) + b"]"

    def render(self, request: Request) -> bytes:
        return json_object({"batch": self._batch(request)}, {"sentAt": sent_at_now(), "writeKey": self._write_key})

    def render_for_record(self, request: Request) -> bytes:
        # The DLQ is operator-visible: keep the request as sent, minus the write key.
        return json_object({"batch": self._batch(request)}, {"sentAt": sent_at_now()})

    async def send(self, request: Request) -> Response:
        if request.endpoint != BATCH:
            return Response(0, error=f"unknown endpoint {request.endpoint!r}", failure="unknown_endpoint")
        try:
            body = self.render(request)
        except TypeError as exc:
            return Response(0, error=f"render_error: {exc}", failure="render_error")
        return await self._http.post(self._url, body, self._headers)

    def rate_cost(self, request: Request) -> RateCost:
        return RateCost({"requests": 1})

    def rate_limits(self) -> Mapping[str, float]:
        return {"requests": REQUESTS_PER_SECOND}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "host": self._host,
            "max_batch_events": self.max_batch_events,
            "max_batch_bytes": self.max_batch_bytes,
        }

    async def start(self) -> None:
        await self._http.open()

    async def close(self) -> None:
        await self._http.close()
