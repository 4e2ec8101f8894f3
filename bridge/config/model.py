"""The typed configuration, built from bridge.yaml by ``load_config``.

Keys follow the issues' examples (server, store, mappings, admin, sources, destinations);
every key is documented in the README's configuration reference.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.config.loader import MAX_INT, Reader, hide_values, read_yaml_and_values
from bridge.config_values import check_header_safe, plain
from bridge.destinations.base import ConfigError, Destination, destination_kinds
from bridge.destinations.http import CONNECTIONS, as_url, check_url
from bridge.destinations.moengage.datacenters import REGIONS as DATA_CENTER_REGIONS
from bridge.destinations.moengage.datacenters import normalise_data_center
from bridge.destinations.segment import SegmentDestination
from bridge.destinations.segment.destination import HOSTS as SEGMENT_HOSTS
from bridge.destinations.segment.destination import check_region_host
from bridge.store import check_store_url
from bridge.suggest import did_you_mean
from bridge.value_words import describe

SEGMENT_REGIONS = ("us", "eu")
# Where a Segment client of each region should send: named in 403 answers.
DEFAULT_REGION_HOSTS = dict(SEGMENT_HOSTS)
DEFAULT_RETRYABLE = frozenset({408, 429, *(s for s in range(500, 600) if s not in (501, 505))})
# Answers about the account, not the events: MoEngage's 401 (bad credentials), 403 (client
# blocked, account suspended), 409 (app key mismatch, secret not set) and 415 (wrong
# content type). Every event would get the same answer: pause, do not dead-letter.
DEFAULT_PAUSE = frozenset({401, 403, 409, 415})
# Lifetime of a Streams OAuth2 access token, in seconds. At least a minute, so a client is
# not fetching a token for every batch; at most a day, since a leaked token cannot be
# revoked on its own (only by changing the client secret, which revokes them all).
DEFAULT_TOKEN_TTL = 3600
MIN_TOKEN_TTL = 60
MAX_TOKEN_TTL = 86400


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8088
    region: str = "us"
    region_hosts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_REGION_HOSTS))
    shutdown_timeout: float = 30.0
    # After SIGTERM, /readyz answers 503 this long before the listener closes, so a load
    # balancer stops sending first (part of shutdown_timeout).
    drain_seconds: float = 0.0
    log_level: str = "info"
    log_format: str = "auto"
    max_request_bytes: int = 512_000  # Segment's 500 KB plus headroom for the envelope
    max_event_bytes: int = 32 * 1024
    max_batch_events: int = 2500
    # Segment's Webhooks (Actions) batches 1000 events by default and up to 4000.
    max_webhook_bytes: int = 16 * 1024 * 1024
    max_webhook_events: int = 4000
    # Proxies whose X-Forwarded-For is believed when checking a source's allow_ips.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # How long one request body may take to arrive, from the end of its headers.
    body_timeout: float = 60.0
    # How long a connection may stay open without a whole request's headers: from when it
    # opens or its last answer went out (aiohttp's keepalive_timeout). Closes idle
    # keep-alive connections, and clients sending their headers a byte at a time. Longer
    # than the 600 s idle timeout of the load balancers that keep the longest (GCP's): a
    # proxy must close an idle upstream connection before the bridge does, or the request
    # it sends down one as the bridge closes it fails.
    idle_timeout: float = 620.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///var/bridge.db"
    max_bytes: int | None = None
    min_free_disk_bytes: int = 256 * 1024 * 1024
    dedupe_hours: float = 48.0
    retention_hours: float = 72.0


@dataclass(frozen=True, slots=True)
class MappingsConfig:
    dir: str = "mappings"
    watch: bool = False
    watch_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class StreamsAuth:
    type: str  # basic | header | oauth2 | none
    username: str = ""
    password: str = ""
    header: str = ""
    value: str = ""
    # oauth2: MoEngage gets a token at /moengage/streams/<name>/oauth/token (client
    # credentials grant) and sends it as a Bearer token.
    client_id: str = ""
    client_secret: str = ""
    token_ttl: int = DEFAULT_TOKEN_TTL


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    kind: str  # segment | moengage_streams
    to: tuple[str, ...]
    region: str | None
    allow_cross_region: bool = False
    # segment
    write_key: str = ""
    webhook_secret: str = ""
    # moengage_streams
    data_center: str = ""
    auth: StreamsAuth | None = None
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryConfig:
    base_delay: float = 1.0
    max_delay: float = 300.0
    max_age: float = 4 * 3600.0
    min_attempts: int = 3
    max_retry_after: float = 600.0
    retryable_statuses: frozenset[int] = DEFAULT_RETRYABLE
    pause_statuses: frozenset[int] = DEFAULT_PAUSE


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    batch_size: int = 500
    concurrency: int = 2
    ordered: bool = True
    lease_seconds: float = 120.0
    request_timeout: float = 30.0
    poll_interval: float = 1.0
    # Queued events past which the sources feeding this destination are refused (429), so a
    # destination down for days cannot fill the store that every other one shares; None: no limit.
    max_queued_events: int | None = None


@dataclass(frozen=True, slots=True)
class GuardConfig:
    enabled: bool = True
    window: int = 200
    min_events: int = 20
    threshold: float = 0.5


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    kind: str
    mapping: str
    client: Destination
    region: str | None
    mapping_options: dict[str, Any] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    rate_limits: dict[str, float] = field(default_factory=dict)  # bucket -> tokens/s overrides


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    store: StoreConfig
    mappings: MappingsConfig
    admin_token: str
    sources: tuple[SourceConfig, ...]
    destinations: tuple[DestinationConfig, ...]
    path: str = ""
    unset_env: frozenset[str] = frozenset()
    metrics_token: str = ""  # admin.metrics_token: /metrics then needs it as a bearer token

    def secrets(self) -> list[str]:
        """Every secret value in the config, for log redaction."""
        out = [self.admin_token, self.metrics_token, _url_password(self.store.url)]
        for s in self.sources:
            out += [s.write_key, s.webhook_secret]
            if s.auth:
                out += [s.auth.password, s.auth.value, s.auth.client_secret]
        for d in self.destinations:
            out += [str(v) for k, v in _secret_fields(d.client)]
        return [s for s in out if s]

    def source(self, name: str) -> SourceConfig | None:
        return next((s for s in self.sources if s.name == name), None)


def _url_password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _secret_fields(client: Destination) -> list[tuple[str, Any]]:
    names = getattr(client, "secret_fields", ("api_key", "write_key", "password", "token"))
    return [(n, getattr(client, n)) for n in names if getattr(client, n, None)]


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(text: Any, where: str) -> float:
    """'10000/min' -> tokens per second."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        rate = float(text)
    else:
        m = _RATE_RE.match(str(text))
        if not m:
            raise ConfigError(f"{where}: expected a rate like '10000/min' or '1000/s', got {text!r}")
        rate = float(m.group(1)) / _PER[m.group(2)]
    if not rate > 0 or not math.isfinite(rate):
        # A limiter without a bucket does not limit: 0 must not quietly mean "unlimited".
        raise ConfigError(f"{where}: a rate must be above 0, got {text!r}")
    return rate


def _region_hosts(r: Reader) -> dict[str, str]:
    """``server.region_hosts``: where the bridge's wrong-region 403 sends a client whose write
    key is in that region. Each must be a usable URL or host of its own region: pointing a
    client at the other region's Segment host would have Segment drop its data silently."""
    where = r.at("region_hosts")
    hosts = dict(DEFAULT_REGION_HOSTS)
    for region, value in r.mapping("region_hosts").items():
        if region not in SEGMENT_REGIONS:
            raise ConfigError(f"{where}.{region}: unknown region; expected us or eu")
        hosts[region] = _region_host(value, f"{where}.{region}")
        check_region_host(
            hosts[region],
            region,
            f"{where}.{region}",
            f"the bridge names region_hosts.{region} to clients whose write key is in region {region}",
        )
    if _place(hosts["us"]) == _place(hosts["eu"]):
        raise ConfigError(
            f"{where}: us and eu both name {hosts['eu']!r}; a client refused for a write key of one "
            "region would be sent to a host of the other. Give each region its own host"
        )
    return hosts


def _region_host(value: Any, where: str) -> str:
    """A URL (https://host[:port][/path]) or a bare host[:port][/path], as written."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: expected the URL or host a Segment client of this region should send to, got {value!r}"
        )
    text = value.strip()
    # A bare host is checked as the URL a client would make of it.
    problem = check_url(as_url(text))
    if problem is None and any(c.isspace() for c in text):
        problem = "contains whitespace"
    if problem is None:
        try:
            _place(text)
        except ValueError as exc:  # a port that is not a number, or out of range
            problem = str(exc)
    if problem:
        # A value with an '@' may hold a password (check_url refuses it): not quoted.
        shown = "the value" if "@" in text else repr(text)
        raise ConfigError(f"{where}: {shown} is not a usable URL or host: {problem}")
    return text


def _place(host_or_url: str) -> tuple[str, int | None, str]:
    """Host, port and path of a region host: two values with the same place are one host."""
    parts = urlsplit(as_url(host_or_url))
    return (parts.hostname or "").rstrip("."), parts.port, parts.path.rstrip("/")


def _listen_host(r: Reader) -> str:
    """``server.host``: an IP address or a host name. A character no host holds is refused
    here: serving, aiohttp's URL for it raised, a traceback where a config error belongs."""
    host = r.str("host", "127.0.0.1")
    try:
        ipaddress.IPv6Address(host)  # holds ':' (and '%' before a zone)
        return host
    except ValueError:
        pass
    bad = next((c for c in host if c.isspace() or not c.isprintable() or c in ":/?#@[]\\%"), None)
    if bad is not None:
        hint = "; an IPv6 address goes without brackets, e.g. ::1" if bad in ":[]" else ""
        raise ConfigError(f"{r.at('host')}: {host!r} is no IP address or host name (it holds {bad!r}){hint}")
    return host


def _server(r: Reader) -> ServerConfig:
    hosts = _region_hosts(r)
    cfg = ServerConfig(
        host=_listen_host(r),
        port=r.int("port", 8088, minimum=0, maximum=65535),
        region=r.choice("region", SEGMENT_REGIONS, "us"),
        region_hosts=hosts,
        shutdown_timeout=r.float("shutdown_timeout", 30.0, minimum=0),
        drain_seconds=r.float("drain_seconds", 0.0, minimum=0),
        log_level=r.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        log_format=r.choice("log_format", ("auto", "json", "console"), "auto"),
        max_request_bytes=r.int("max_request_bytes", 512_000, minimum=1024),
        max_event_bytes=r.int("max_event_bytes", 32 * 1024, minimum=256),
        max_batch_events=r.int("max_batch_events", 2500, minimum=1),
        max_webhook_bytes=r.int("max_webhook_bytes", 16 * 1024 * 1024, minimum=1024),
        max_webhook_events=r.int("max_webhook_events", 4000, minimum=1),
        trusted_proxies=_networks(r, "trusted_proxies"),
        body_timeout=r.float("body_timeout", 60.0, minimum=0.1),
        idle_timeout=r.float("idle_timeout", 620.0, minimum=0.1),
    )
    r.done()
    if cfg.drain_seconds >= cfg.shutdown_timeout > 0:
        raise ConfigError(
            f"{r.at('drain_seconds')}: must be less than shutdown_timeout ({cfg.shutdown_timeout:g} s), "
            "which it is part of"
        )
    return cfg


def _store(r: Reader) -> StoreConfig:
    max_bytes = r.raw("max_bytes")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)):
        raise ConfigError(f"{r.at('max_bytes')}: expected an integer number of bytes")
    if max_bytes is not None and max_bytes < 1:
        # The store refuses it when the server opens it: say so here, so `bridge check` does too.
        raise ConfigError(f"{r.at('max_bytes')}: must be at least 1 (leave it out for no limit), got {max_bytes}")
    if max_bytes is not None and max_bytes > MAX_INT:
        raise ConfigError(
            f"{r.at('max_bytes')}: must be at most {MAX_INT} (leave it out for no limit), got {max_bytes}"
        )
    cfg = StoreConfig(
        url=r.str("url", "sqlite:///var/bridge.db"),
        max_bytes=None if max_bytes is None else int(max_bytes),
        min_free_disk_bytes=r.int("min_free_disk_bytes", 256 * 1024 * 1024, minimum=0),
        dedupe_hours=r.float("dedupe_hours", 48.0, minimum=24.0),
        retention_hours=r.float("retention_hours", 72.0, minimum=0),
    )
    r.done()
    try:
        check_store_url(cfg.url)  # a bad URL is a config problem, found by `bridge check` too
    except ValueError as exc:
        raise ConfigError(f"{r.at('url')}: {exc}") from None
    return cfg


# The keys each kind of source takes, and each type of Streams auth: a misspelling of one
# is refused before the required keys are read (Reader.refuse_misspellings).
_SOURCE_COMMON = frozenset({"name", "kind", "to", "allow_cross_region"})
_SOURCE_KEYS = {
    "segment": _SOURCE_COMMON | {"region", "write_key", "webhook_secret"},
    "moengage_streams": _SOURCE_COMMON | {"data_center", "auth", "allow_ips"},
}
_AUTH_KEYS = {
    "basic": frozenset({"type", "username", "password"}),
    "header": frozenset({"type", "header", "value"}),
    "oauth2": frozenset({"type", "client_id", "client_secret", "token_ttl"}),
    "none": frozenset({"type"}),
}


def _keys(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


# The keys of each section of the top level, of a destination and of a Streams source: one
# of them written a level up (`retryable_statuses:` under the destination, not its `retry:`)
# is named as the misplaced key it is.
_TOP_SECTIONS = {
    "server": _keys(ServerConfig),
    "store": _keys(StoreConfig),
    "mappings": _keys(MappingsConfig),
    "admin": frozenset({"token", "metrics_token"}),
}
_DESTINATION_SECTIONS = {"delivery": _keys(DeliveryConfig), "retry": _keys(RetryConfig), "guard": _keys(GuardConfig)}
# The keys every destination takes, read here rather than by its kind.
_DESTINATION_COMMON = frozenset(
    {"name", "kind", "mapping", "mapping_options", "delivery", "retry", "guard", "rate_limits"}
)


def _source(r: Reader) -> SourceConfig:
    # A misspelt required key (`nmae`, `write_kye`) is named with a hint, not reported missing.
    r.refuse_misspellings(("name", "kind"), allowed=frozenset().union(*_SOURCE_KEYS.values(), *_AUTH_KEYS.values()))
    name = r.str("name", required=True)
    kind = r.choice("kind", _SOURCE_KEYS)
    if kind == "moengage_streams":
        # `username:` beside `auth:` rather than in it: named so, not as a misspelt `name`.
        r.refuse_misplaced({"auth": frozenset().union(*_AUTH_KEYS.values())}, _SOURCE_KEYS[kind])
    r.refuse_misspellings(_SOURCE_KEYS[kind])
    to: tuple[str, ...] = tuple(r.str_list("to"))
    if not to:
        raise ConfigError(f"{r.at('to')}: a source needs at least one destination")
    allow_cross = r.bool("allow_cross_region", False)
    if kind == "segment":
        cfg = SourceConfig(
            name=name,
            kind=kind,
            to=to,
            region=r.choice("region", SEGMENT_REGIONS, "us"),
            allow_cross_region=allow_cross,
            write_key=r.str("write_key", required=True),
            webhook_secret=r.str("webhook_secret", ""),
        )
    else:
        _check_streams_name(name, r.at("name"))
        if not r.has("data_center"):
            # normalise_data_center would say "got None" of a key the file does not give.
            raise ConfigError(f"{r.at('data_center')}: is required (the Streams source's MoEngage data center)")
        dc = normalise_data_center(r.raw("data_center"), r.at("data_center"))
        cfg = SourceConfig(
            name=name,
            kind=kind,
            to=to,
            region=DATA_CENTER_REGIONS[dc],
            allow_cross_region=allow_cross,
            data_center=dc,
            auth=_streams_auth(r.sub("auth")),
            allow_ips=_networks(r, "allow_ips"),
        )
    r.done()
    return cfg


# What a Streams source's name may not hold: it is the last segment of the URL MoEngage posts
# to (README: /moengage/streams/<source name>), which the route decodes, so a space, a '%', a
# '/' or a '?' reaches it percent-encoded (%20, %25, %2F, %3F), as such names always did.
# Only these reach it in no form: the route's pattern takes no '{' or '}', even decoded, and
# a URL takes '.' and '..' (%2E and %2E%2E too) out of its path.
_STREAMS_NAME_FORBIDDEN = re.compile(r"[{}]")


def _check_streams_name(name: str, where: str) -> None:
    """Refuse a Streams source name that no request reaches: `bridge check` passed it, and
    every batch MoEngage posted got a 404, retried and then dropped. Not one a URL carries
    percent-encoded: refused, a config that delivered stopped the bridge after an upgrade."""
    if name in (".", "..") or _STREAMS_NAME_FORBIDDEN.search(name):
        raise ConfigError(
            f"{where}: {name!r} cannot be the last segment of the Streams URL /moengage/streams/<name>, even "
            "percent-encoded, so no request would reach this source; it may not be '.' or '..', nor hold '{' or '}'"
        )


def _networks(r: Reader, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(_network(ip, f"{r.at(key)}[{i}]") for i, ip in enumerate(r.list(key)))


def _network(text: Any, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str):
        # ip_network takes an integer as an address (10 is 0.0.0.10/32): only text is one here.
        raise ConfigError(f"{where}: expected an IP address or CIDR such as 10.0.0.0/8, got {describe(text)}")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: not an IP address or CIDR: {text!r}") from None


# An HTTP header name is a token (RFC 9110 5.1, 5.6.2).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _streams_auth(r: Reader) -> StreamsAuth:
    if not r.data:
        raise ConfigError(
            f"{r.where}: is required; use type basic, header or oauth2, or `type: none` to accept "
            "unauthenticated requests explicitly"
        )
    r.refuse_misspellings(("type",), allowed=frozenset().union(*_AUTH_KEYS.values()))
    kind = r.choice("type", _AUTH_KEYS)
    r.refuse_misspellings(_AUTH_KEYS[kind])
    if kind == "basic":
        auth = StreamsAuth(kind, username=r.str("username", required=True), password=r.str("password", required=True))
        if ":" in auth.username:
            # Basic credentials are "username:password", split at the first colon: no request
            # could name this user, and every one was refused.
            raise ConfigError(
                f"{r.at('username')}: must not contain ':' (HTTP Basic splits user and password at the first "
                "colon, so no request could match it; a colon may go in the password)"
            )
    elif kind == "header":
        auth = StreamsAuth(kind, header=r.str("header", required=True), value=r.str("value", required=True))
        if not _HEADER_NAME_RE.fullmatch(auth.header):
            # No request carries a header of that name: every one was refused.
            raise ConfigError(f"{r.at('header')}: {auth.header!r} is no HTTP header name (letters, digits, '-')")
        check_header_safe(
            auth.value, r.at("value"), f"no request's {auth.header} header could match it: every one would be refused"
        )
    elif kind == "oauth2":
        auth = StreamsAuth(
            kind,
            client_id=r.str("client_id", required=True),
            client_secret=r.str("client_secret", required=True),
            token_ttl=r.int("token_ttl", DEFAULT_TOKEN_TTL, minimum=MIN_TOKEN_TTL, maximum=MAX_TOKEN_TTL),
        )
    else:
        auth = StreamsAuth(kind)
    r.done()
    return auth


def _statuses(r: Reader, key: str, default: frozenset[int]) -> frozenset[int]:
    """A list of HTTP statuses; a bad one is named by its index and value."""
    statuses = r.raw(key)
    if statuses is None:
        return default
    if not isinstance(statuses, list):
        raise ConfigError(f"{r.at(key)}: expected a list of HTTP statuses from 300 to 599, got {describe(statuses)}")
    for i, s in enumerate(statuses):
        where = f"{r.at(key)}[{i}]"
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"{where}: expected an HTTP status from 300 to 599, got {describe(s)}")
        if 100 <= s < 300:
            # A 1xx is never an answer aiohttp returns, and a 2xx is always a delivery (the
            # policy asks first): listed, it would be ignored while the config claims otherwise.
            raise ConfigError(
                f"{where}: {s} cannot be listed: a 2xx answer is a delivery and a 1xx is no final answer;"
                " list statuses from 300 to 599"
            )
        if not 300 <= s <= 599:
            raise ConfigError(f"{where}: {s} is not an HTTP status from 300 to 599")
    return frozenset(int(s) for s in statuses)


def _retry(r: Reader, also_retryable: frozenset[int] = frozenset()) -> RetryConfig:
    """``also_retryable``: what the destination kind retries besides the usual statuses."""
    retryable = _statuses(r, "retryable_statuses", DEFAULT_RETRYABLE | also_retryable)
    pause = _statuses(r, "pause_statuses", DEFAULT_PAUSE - retryable)
    # The first paused status also retried, named by its index as any bad item is.
    if both := next(((i, s) for i, s in enumerate(r.raw("pause_statuses", [])) if s in retryable), None):
        i, status = both
        listed = "listed in retryable_statuses" if r.has("retryable_statuses") else "retried by default"
        raise ConfigError(
            f"{r.at('pause_statuses')}[{i}]: {status} is also {listed}; a status is one or the other"
            + ("" if r.has("retryable_statuses") else " (set retryable_statuses without it)")
        )
    cfg = RetryConfig(
        base_delay=r.float("base_delay", 1.0, minimum=0),
        max_delay=r.float("max_delay", 300.0, minimum=0),
        max_age=r.float("max_age", 4 * 3600.0, minimum=0),
        min_attempts=r.int("min_attempts", 3, minimum=1),
        max_retry_after=r.float("max_retry_after", 600.0, minimum=0),
        retryable_statuses=retryable,
        pause_statuses=pause,
    )
    if cfg.base_delay > cfg.max_delay:
        # Each backoff is at most min(max_delay, base_delay x 2^n): base_delay would not count.
        # Named: the key set in the file (max_delay alone, below the default base_delay).
        if r.has("base_delay"):
            where, rule = r.at("base_delay"), f"at most retry.max_delay ({cfg.base_delay:g} > {cfg.max_delay:g})"
        else:
            where, rule = (
                r.at("max_delay"),
                f"at least retry.base_delay ({cfg.max_delay:g} < {cfg.base_delay:g}, its default)",
            )
        raise ConfigError(
            f"{where}: must be {rule}; every backoff is capped at max_delay, so base_delay would not count"
        )
    r.done()
    return cfg


def _delivery(r: Reader) -> DeliveryConfig:
    cfg = DeliveryConfig(
        batch_size=r.int("batch_size", 500, minimum=1),
        # No more loops than the destination has connections: they would only wait for one
        # (DestinationWorker sends no more at once), and 10^20 of them hung the start.
        concurrency=r.int("concurrency", 2, minimum=1, maximum=CONNECTIONS),
        ordered=r.bool("ordered", True),
        lease_seconds=r.float("lease_seconds", 120.0, minimum=1),
        request_timeout=r.float("request_timeout", 30.0, minimum=0.1),
        poll_interval=r.float("poll_interval", 1.0, minimum=0.01),
        max_queued_events=None
        if r.raw("max_queued_events") is None
        else r.int("max_queued_events", 0, minimum=1, default_is="no limit"),
    )
    if cfg.lease_seconds <= 2 * cfg.request_timeout:
        # A batch stops starting requests at half its lease; a request may take the whole
        # timeout. Below this, a slow send could outlive its lease and be sent twice.
        raise ConfigError(
            f"{r.at('lease_seconds')}: must be more than twice delivery.request_timeout "
            f"({cfg.lease_seconds:g} <= 2 x {cfg.request_timeout:g})"
        )
    r.done()
    return cfg


def _guard(r: Reader) -> GuardConfig:
    cfg = GuardConfig(
        enabled=r.bool("enabled", True),
        window=r.int("window", 200, minimum=1),
        min_events=r.int("min_events", 20, minimum=1),
        threshold=r.float("threshold", 0.5, minimum=0),
    )
    if cfg.threshold > 1:
        raise ConfigError(f"{r.at('threshold')}: must be a ratio between 0 and 1")
    if cfg.enabled and cfg.min_events > cfg.window:
        # The guard looks at the last `window` outcomes only: it could never see min_events.
        # Named by the key the config set: `window: 10` alone is too small for the default.
        if r.raw("min_events") is None:
            raise ConfigError(
                f"{r.at('window')}: must be at least guard.min_events ({cfg.window} < {cfg.min_events}, its "
                "default); the guard judges the last `window` deliveries, so it would never trip. "
                "Set min_events too"
            )
        raise ConfigError(
            f"{r.at('min_events')}: must be at most guard.window ({cfg.min_events} > {cfg.window}); "
            "the guard judges the last `window` deliveries, so it would never trip"
        )
    r.done()
    return cfg


def _destination(r: Reader, index: int) -> DestinationConfig:
    kinds = destination_kinds()
    every_key = _DESTINATION_COMMON.union(*(k.config_keys for k in kinds.values()))
    r.refuse_misspellings(("name", "kind"), allowed=every_key)
    name = r.str("name", required=True)
    kind = r.choice("kind", sorted(kinds))
    r.refuse_misspellings(_DESTINATION_COMMON | kinds[kind].config_keys)
    mapping = r.str("mapping", required=True)
    options = plain(r.mapping("mapping_options"))  # read by exact type, as an event's values
    delivery = _delivery(r.sub("delivery"))
    retry = _retry(r.sub("retry"), kinds[kind].ALSO_RETRYABLE)
    guard = _guard(r.sub("guard"))
    rates = {str(k): parse_rate(v, f"{r.at('rate_limits')}.{k}") for k, v in r.mapping("rate_limits").items()}
    # Every key a destination takes is known only here: the kind's own check knows its keys
    # alone, so it would offer a `delivry` no 'delivery' and list the valid keys without it.
    r.done(also=kinds[kind].config_keys, takes=f"a {kind} destination", sections=_DESTINATION_SECTIONS)
    client_cfg = {"name": name, **r.rest()}
    client = kinds[kind].from_config(client_cfg, where=r.where, timeout=delivery.request_timeout)
    buckets = client.rate_limits()
    # The first one in the file, named by its own key as every other error is, with a hint.
    if unknown := next((b for b in rates if b not in buckets), None):
        raise ConfigError(
            f"{r.at('rate_limits')}.{unknown}: unknown bucket{did_you_mean(unknown, buckets)}; "
            f"{kind} has {', '.join(sorted(buckets))}"
        )
    return DestinationConfig(
        name=name,
        kind=kind,
        mapping=mapping,
        client=client,
        region=client.region,
        mapping_options=options,
        delivery=delivery,
        retry=retry,
        guard=guard,
        rate_limits=rates,
    )


def _bearer_token(r: Reader, key: str, route: str) -> str:
    """``admin.token`` or ``admin.metrics_token``: compared with a request's Authorization
    header, so one no header carries would lock ``route`` for good."""
    token = r.str(key, "")
    if token:
        check_header_safe(token, r.at(key), f"{route} would refuse every request, the right token included")
    return token


def build_config(data: dict[str, Any], path: str = "", unset_env: frozenset[str] = frozenset()) -> Config:
    top = Reader(data, "")
    server = _server(top.sub("server"))
    store = _store(top.sub("store"))
    mr = top.sub("mappings")
    mappings = MappingsConfig(
        dir=mr.str("dir", "mappings"),
        watch=mr.bool("watch", False),
        watch_interval=mr.float("watch_interval", 2.0, minimum=0.1),
    )
    mr.done()
    ar = top.sub("admin")
    admin_token = _bearer_token(ar, "token", "/admin/*")
    metrics_token = _bearer_token(ar, "metrics_token", "/metrics")
    ar.done()
    sources = tuple(_source(Reader(s, f"sources[{i}]")) for i, s in enumerate(top.list("sources")))
    destinations = tuple(
        _destination(Reader(d, f"destinations[{i}]"), i) for i, d in enumerate(top.list("destinations"))
    )
    top.done(takes="the config", sections=_TOP_SECTIONS)
    cfg = Config(server, store, mappings, admin_token, sources, destinations, path, unset_env, metrics_token)
    validate_routes(cfg)
    return cfg


def validate_routes(cfg: Config) -> None:
    """Names are unique, each Segment write key has one region (``_check_write_keys``),
    routes point at real destinations, once each and at most one Segment destination per
    source (Segment dedupes on messageId everywhere), and no route crosses regions unless
    the source says so (a data-residency guard: the write keys' own regions, which Segment
    enforces by dropping data silently, are checked by ``_check_write_keys``)."""
    seen: dict[str, str] = {}
    for kind, names in (
        ("sources", [s.name for s in cfg.sources]),
        ("destinations", [d.name for d in cfg.destinations]),
    ):
        for i, n in enumerate(names):
            if n in seen:
                raise ConfigError(f"{kind}[{i}].name: {n!r} is used twice")
            seen[n] = kind
    _check_write_keys(cfg)
    dests = {d.name: d for d in cfg.destinations}
    for i, s in enumerate(cfg.sources):
        to_segment: str | None = None
        for j, target in enumerate(s.to):
            d = dests.get(target)
            if d is None:
                raise ConfigError(f"sources[{i}].to[{j}]: no destination named {target!r}{did_you_mean(target, dests)}")
            if target in s.to[:j]:
                raise ConfigError(
                    f"sources[{i}].to[{j}]: {target!r} is listed twice; every event would be delivered to it twice"
                )
            if d.kind == "segment":
                if to_segment is not None:
                    raise ConfigError(
                        f"sources[{i}].to[{j}]: source {s.name!r} is routed to two Segment destinations, "
                        f"{to_segment!r} and {target!r}. Segment deduplicates on messageId across all its "
                        "sources and workspaces, and both copies of an event carry the same messageId "
                        "(the event's own id: a Streams event's event_uuid), so Segment would drop one of them. "
                        "Route a source to one Segment destination."
                    )
                to_segment = target
            if s.allow_cross_region:
                continue
            if s.region is None or d.region is None or s.region != d.region:
                raise ConfigError(
                    f"sources[{i}].to[{j}]: route {s.name!r} ({_region_name(s.region)}) -> "
                    f"{d.name!r} ({_region_name(d.region)}) crosses regions: its users' data would leave "
                    f"{_region_name(s.region)} for {_region_name(d.region)}. Set allow_cross_region: true on "
                    f"source {s.name!r} if this is intended."
                )


@dataclass(frozen=True, slots=True)
class _KeyUse:
    """Where a Segment write key is configured: "sources[0]" or "destinations[2]"."""

    where: str
    name: str
    region: str
    is_source: bool


def _key_digest(key: str) -> bytes:
    # Keys are secrets: the registry holds digests, and errors name places, never keys.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _segment_key_uses(cfg: Config) -> list[tuple[str, _KeyUse]]:
    uses = [
        (s.write_key, _KeyUse(f"sources[{i}]", s.name, s.region or "", is_source=True))
        for i, s in enumerate(cfg.sources)
        if s.kind == "segment" and s.write_key
    ]
    uses += [
        (d.client.write_key, _KeyUse(f"destinations[{i}]", d.name, d.region or "", is_source=False))
        for i, d in enumerate(cfg.destinations)
        if isinstance(d.client, SegmentDestination)
    ]
    return uses


def _check_write_keys(cfg: Config) -> None:
    """One registry over every Segment write key in the config, the sources' (keys the
    bridge accepts) and the Segment destinations' (keys it sends with). A write key belongs
    to one Segment source, in one region: Segment drops what is sent with it to the other
    region's host without an error, so the same key in two regions is refused here.

    In one region, a key may be both a source's and a destination's (Streams relayed into
    the Segment source whose Webhooks destination feeds the bridge), but not two sources'
    (a request's key must name one source) nor two destinations' (both would send to one
    Segment source, which drops the second copy of each event as a duplicate messageId)."""
    seen: dict[bytes, list[_KeyUse]] = {}
    for key, use in _segment_key_uses(cfg):
        earlier = seen.setdefault(_key_digest(key), [])
        here = f"{use.where}.write_key"
        for first in earlier:  # in one region, or the first of them would have been refused
            if first.region != use.region:
                raise ConfigError(
                    f"{here}: this write key is also {first.where}'s ({first.name!r}), in region {first.region}; "
                    f"a write key belongs to one region, and Segment silently drops data sent with it to "
                    f"another region's host (this one is in region {use.region})"
                )
            if use.is_source and first.is_source:
                raise ConfigError(
                    f"{here}: the same write key is used by {first.name!r} ({first.where}); "
                    "each source needs its own, or a request's key would name two sources"
                )
            if not use.is_source and not first.is_source:
                raise ConfigError(
                    f"{here}: this write key is also {first.where}'s ({first.name!r}); two destinations "
                    "would send to one Segment source, and Segment drops the second copy of each event as "
                    "a duplicate (same messageId). Route every source that should reach it to one "
                    "destination (its mapping can tell sources apart by $source)"
                )
        earlier.append(use)


def _region_name(region: str | None) -> str:
    return f"region {region}" if region else "region unknown"


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    data, missing, substituted = read_yaml_and_values(path, env)
    try:
        return build_config(data, str(path), frozenset(missing))
    except ConfigError as exc:
        # An error saying what was given ("expected an integer, got the string ...") must not
        # echo a secret from the environment given to the wrong key.
        message = hide_values(str(exc), substituted)
        if missing:
            # An unset ${VAR} is an empty value, most often the cause ("workspace_id:
            # required"), which the key alone does not say: name the variables left unset.
            unset = ", ".join(f"${{{name}}}" for name in sorted(missing))
            message += f"; the file's {unset} {'is' if len(missing) == 1 else 'are'} unset"
        raise ConfigError(message) from None


def existing_mappings_dir(cfg: Config) -> Path:
    """mappings.dir, or a one-line ConfigError when it names no directory (the mapping
    loader's diagnostic for it took two lines, as a mapping error of `bridge check`)."""
    path = Path(cfg.mappings.dir)
    if path.is_dir():
        return path
    problem = "is not a directory" if path.exists() else "does not exist"
    raise ConfigError(f"mappings.dir: {cfg.mappings.dir!r} {problem}{_relative_to_cwd(path)}")


def _relative_to_cwd(path: Path) -> str:
    """Where a relative path was looked for: `bridge check` run from another directory
    than the server's finds none."""
    if path.is_absolute():
        return ""
    try:
        return f" (relative to the working directory {os.getcwd()})"
    except OSError:  # the working directory was removed
        return ""
