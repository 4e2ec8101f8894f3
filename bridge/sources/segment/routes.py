"""HTTP handlers for the Segment Tracking API and the Segment Webhooks destination."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from bridge.config.model import DEFAULT_REGION_HOSTS, Config, SourceConfig
from bridge.httpx import (
    ApiError,
    basic_credentials,
    check_containers,
    header_digest,
    parse_json,
    read_body,
    same_secret,
    secret_digest,
)
from bridge.routing import Routes
from bridge.sources.base import BACKPRESSURE, Collected, Ingestor, SourceKind, given_id, store_collected
from bridge.sources.encoding import encode_event, too_deep
from bridge.sources.segment.spec import (
    CALL_TYPES,
    WEBHOOK_ONLY_TYPES,
    Envelope,
    Invalid,
    ReceivedClock,
    batch_of,
    normalise_in,
)
from bridge.store.base import IncomingEvent

# /v1/import is the legacy batch path; /v1/b is where Segment's mobile SDKs (Swift, Kotlin,
# Flutter, React Native) post their batches, {apiHost}/b, with the writeKey in the body:
# pointed at the bridge with apiHost "<bridge>/v1", they post to /v1/b.
BATCH_CALLS = ("batch", "import", "b")
_dumps = orjson.dumps
_new_tuple = tuple.__new__  # IncomingEvent(...) without its generated __new__'s frame, as Collected.accept
# analytics.js (the browser SDK) posts each call to /v1/<its type's first letter>, as
# text/plain with the writeKey in the body; pointed at the bridge with the Segment.io
# integration's apiHost "<bridge>/v1". Its batching mode posts to /v1/b.
BROWSER_CALLS = {"t": "track", "i": "identify", "p": "page", "s": "screen", "g": "group", "a": "alias"}
# Authorization headers remembered once authenticated (see SegmentSources._source_for_header).
AUTH_CACHE_SIZE = 256
WEBHOOK_METHODS = ("POST", "PUT", "PATCH")
# Backpressure on /segment/webhook: Segment's (classic) Webhooks destination retries a 5xx, for
# up to 4 hours, and nothing else, so the 429 the Tracking API's clients wait out would drop
# the events there (its deletion requests among them). Webhooks (Actions) retries either.
WEBHOOK_BACKPRESSURE = 503
# Segment's own ingestion hosts, which server.region_hosts names by default (written as a
# URL or a bare host): a wrong-region webhook is not sent there, back to Segment.
_SEGMENT_HOSTNAMES = tuple(url.split("//", 1)[-1] for url in DEFAULT_REGION_HOSTS.values())


class SegmentSources(SourceKind):
    kind = "segment"

    def __init__(self, config: Config, ingestor: Ingestor) -> None:
        self.config = config
        self.ingestor = ingestor
        self._by_key = {secret_digest(s.write_key): s for s in config.sources if s.kind == "segment"}
        self._digests = {s.name: digest for digest, s in self._by_key.items()}
        # Digest of an exact Authorization header -> the source it authenticated as. Filled
        # only after the full check (decode, digest lookup, region) succeeded, so a hit is a
        # header already accepted; anything else (a wrong key, a malformed header) takes the
        # full path every time. Keyed by digest, as ``_by_key`` is: a dict looked up by the
        # raw header compares the caller's text with a stored write key's. Bounded: cleared
        # when full. The sources are fixed for the life of this object (a config change
        # builds a new app).
        self._by_header: dict[bytes, SourceConfig] = {}
        self._clock = ReceivedClock()
        # An event's size limit: Segment's 32 KB per call, measured as sent. A webhook's
        # event is Segment's, not the client's: Segment measured the call against its
        # 32 KB before adding its own fields, so those do not count here.
        self._event_limit = config.server.max_event_bytes
        self._webhook_event_limit = config.server.max_event_bytes + _SEGMENT_ADDED

    def add_routes(self, routes: Routes) -> None:
        for call in (*sorted(CALL_TYPES), *BATCH_CALLS, *BROWSER_CALLS):
            routes.add_post(f"/v1/{call}", self.tracking_api, cors=True)
        # analytics-java posts to "<endpoint>/v1/import/", with the slash: pointed at the
        # bridge, every batch got a 404, which it does not retry. The server calls take one.
        # Counted under the route without the slash in the metrics, as Streams' are.
        for call in (*sorted(CALL_TYPES), *BATCH_CALLS):
            routes.add_post(f"/v1/{call}/", self.tracking_api, cors=True, label=f"/v1/{call}")
        # Webhooks (Actions) sends with the method its mapping names: POST (the default),
        # PUT or PATCH. A 405 would be a failed delivery Segment never retries.
        for method in WEBHOOK_METHODS:
            routes.add(method, "/segment/webhook", self.webhook)

    # -- auth -------------------------------------------------------------------
    def _source_for(self, key: Any, *, webhook: bool = False) -> SourceConfig:
        if not isinstance(key, str) or not key:
            raise ApiError(
                401,
                "write_key_required",
                "send the write key as the Basic auth username or as writeKey in the body",
            )
        source = self._by_key.get(secret_digest(key))
        if source is None:
            raise ApiError(401, "invalid_write_key", "unknown write key")
        if source.region != self.config.server.region:
            theirs, ours = (source.region or "").upper(), self.config.server.region.upper()
            host = self.config.server.region_hosts.get(source.region or "", "")
            if webhook:
                # The sender is Segment's Webhooks destination: "send it to Segment's API
                # host" would point it back at Segment. It belongs on the other region's
                # bridge, which server.region_hosts may name.
                bridge = "" if not host or any(name in host for name in _SEGMENT_HOSTNAMES) else f" ({host})"
                raise ApiError(
                    403,
                    "wrong_region",
                    f"this write key's source is configured for the {theirs} region but this bridge serves"
                    f" {ours}: point the Webhooks destination at the bridge serving {theirs}{bridge}, or"
                    " correct the source's region in the bridge's config",
                )
            raise ApiError(
                403,
                "wrong_region",
                f"this write key belongs to the {theirs} region but this bridge serves "
                f"{ours}; Segment would silently drop it. Send it to {host}",
            )
        return source

    def _source_for_header(self, request: web.Request, *, webhook: bool = False) -> SourceConfig | None:
        """The source named by the Basic auth username (the write key), or None without
        Basic credentials; raises ApiError like ``_source_for`` (``webhook``: for
        /segment/webhook, whose sender is Segment itself)."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        digest = header_digest(header)
        source = self._by_header.get(digest)
        if source is not None:
            return source
        creds = basic_credentials(request)
        if creds is None or not creds[0]:
            return None  # no Basic key (e.g. "Basic Og==", an empty username): the body's writeKey decides
        source = self._source_for(creds[0], webhook=webhook)
        if len(self._by_header) >= AUTH_CACHE_SIZE:
            self._by_header.clear()
        self._by_header[digest] = source
        return source

    # -- /v1/* --------------------------------------------------------------------
    async def tracking_api(self, request: web.Request) -> web.Response:
        # Authenticate before reading the body whenever the header allows it.
        source = self._source_for_header(request)
        body = await self._read_call(request)
        # Parsed and validated in a plain function, so the parsed body is freed before
        # the wait for the commit (see ``Collected``).
        # (the "or" only for a path ending in "/", e.g. analytics-java's /v1/import/)
        call = request.path.rsplit("/", 1)[-1] or request.path[:-1].rsplit("/", 1)[-1]
        collected = self._collect_call(BROWSER_CALLS.get(call, call), source, body)
        return await store_collected(self.ingestor, collected)

    async def _read_call(self, request: web.Request) -> bytes:
        """The body of a Tracking API call, at most server.max_request_bytes.

        A body past the limit gets 400, as Segment's API answers one past its 500 KB (and
        as the SDKs expect: analytics-node drops a 400 but retries anything else). A 413
        is a failure most SDKs do not treat as final: analytics-swift deletes a stored
        batch only on a 2xx or a 400, so it re-sent the same oversized batch at every
        flush for ever, and the good events in it with it."""
        try:
            return await read_body(request, self.config.server.max_request_bytes)
        except ApiError as err:
            if err.status == 413:
                err.status = 400
            raise

    def _collect_call(self, call: str, source: SourceConfig | None, body: bytes) -> Collected:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "expected a JSON object")
        body_key = data.get("writeKey")
        if source is None:
            if (body_key is None or body_key == "") and call in BATCH_CALLS:
                body_key = _first_item_key(data.get("batch"))
            source = self._source_for(body_key)
        elif body_key not in (None, "") and not same_secret(str(body_key), source.write_key):
            # Two different keys: which source (and region) was meant is unknowable.
            raise ApiError(
                401, "write_key_mismatch", "the Basic auth write key and writeKey in the body are different keys"
            )
        collected = self.ingestor.collector(source)
        if call in BATCH_CALLS:
            try:
                items = batch_of(data)
            except Invalid as exc:
                raise ApiError(400, exc.code, exc.message) from None
            envelope = Envelope(
                *self._clock.now(),
                sent_at=data.get("sentAt"),
                context=data.get("context"),
                integrations=data.get("integrations"),
                write_key_digest=self._digests[source.name],
            )
            if envelope.merges:
                self._check_shared(envelope, len(items))
            self._collect_many(collected, items, envelope)
            return collected
        try:
            if len(body) > self._event_limit:
                # A single call is its body: Segment's 32 KB per call, measured as sent.
                raise _too_large(len(body), self._event_limit)
            self._accept_each(collected, (data,), call, self._clock.envelope(), self._event_limit, single=True)
        except Invalid as exc:
            self.ingestor.metrics.rejected(source.name, exc.code)
            raise ApiError(400, exc.code, exc.message) from None
        return collected

    def _check_shared(self, envelope: Envelope, events: int) -> None:
        """Refuse a batch whose top-level context and integrations, stored again in each of
        its events, would add more than MAX_SHARED_COPIES request bodies' worth of data.
        They do not count against an event's own limit, so without this one request of 2500
        events sharing a 300 KB context stored (and held in memory) some 750 MB."""
        shared = _json_size(envelope.context) + _json_size(envelope.integrations)
        copies = min(events, self.config.server.max_batch_events)
        budget = MAX_SHARED_COPIES * self.config.server.max_request_bytes
        if shared * copies > budget:
            raise ApiError(
                400,
                "batch_context_too_large",
                f"the batch's context and integrations ({shared} bytes) are merged into each of its {copies}"
                f" events, {shared * copies} bytes in all; at most {budget}",
            )

    def _collect_many(self, collected: Collected, items: list[Any], envelope: Envelope) -> None:
        if not items:
            raise ApiError(400, "empty_batch", "the batch has no events")
        keep = envelope.keep_timestamp
        limit = self.config.server.max_webhook_events if keep else self.config.server.max_batch_events
        if len(items) <= limit:
            event_limit = self._webhook_event_limit if keep else self._event_limit
            self._accept_each(collected, items, None, envelope, event_limit)
            return
        if keep:
            # Segment's own batch: a 400 shows as a failed delivery in its UI.
            raise ApiError(400, "too_many_events", f"the batch has {len(items)} events; at most {limit}")
        # As Segment's Tracking API does: 200, the first `limit` events taken and each one
        # past them rejected. A 400 cost the client every event of the batch.
        self._accept_each(collected, items[:limit], None, envelope, self._event_limit)
        excess = len(items) - limit
        message = (
            f"the batch has {len(items)} events; the first {limit} are taken, and the {excess}"
            f" from index {limit} on are rejected"
        )
        collected.reject_from(limit, excess, "too_many_events", message)

    def _accept_each(
        self,
        collected: Collected,
        items: Sequence[Any],
        call: str | None,
        envelope: Envelope,
        limit: int,
        *,
        single: bool = False,
    ) -> None:
        """Normalise and keep each of ``items``, each at most ``limit`` bytes as sent. A
        batch's invalid event is rejected by its index; a ``single`` call (one item, whose
        body the caller has measured against ``limit``) raises Invalid. One loop for both:
        it runs per event."""
        near_limit = limit - _NORMALISED_GROWTH
        # What collected.accept(event, message_id, key, payload) uses, for the loop to do
        # what it does written out: a call and a frame less an event.
        incoming, destinations, links_of = collected.incoming, collected.destinations, collected.links_of
        gate_field, gate_values = collected.gate_field, collected.gate_values
        for i, item in enumerate(items):
            try:
                event, message_id, key = normalise_in(item, call, envelope)
                try:
                    payload = _dumps([[event]])[2:-2]  # encode_event, written out: it runs per event
                except orjson.JSONEncodeError:
                    raise too_deep() from None
                if len(payload) > near_limit and not single:
                    # The limit is on the event as the client sent it, not as normalised
                    # (receivedAt, timestamps, a batch's context merged in): re-measured
                    # only near the limit.
                    size = len(encode_event(item))
                    if size > limit:
                        raise _too_large(size, limit)
                try:
                    learns = gate_field is None or event.get(gate_field) in gate_values
                except TypeError:  # an unhashable value: none of the values
                    learns = False
                links = links_of(event) if learns else ()
                incoming.append(_new_tuple(IncomingEvent, (message_id, key, payload, destinations, links)))
            except Invalid as exc:
                if single:
                    raise
                collected.reject(i, exc.code, exc.message, given_id(item, "messageId"))

    # -- /segment/webhook -----------------------------------------------------------
    async def webhook(self, request: web.Request) -> web.Response:
        source = self._source_for_header(request, webhook=True)
        if source is None:
            raise ApiError(401, "write_key_required", "the webhook needs the write key as the Basic auth username")
        signature = request.headers.get("X-Signature", "")
        if source.webhook_secret and not signature:
            # Refused on its headers: the body, up to max_webhook_bytes, is never read, and
            # the connection closes rather than drain it.
            raise ApiError(401, "signature_required", "X-Signature header is missing", headers={"Connection": "close"})
        body = await read_body(request, self.config.server.max_webhook_bytes)
        collected = self._collect_webhook(source, body, signature)
        try:
            return await store_collected(self.ingestor, collected)
        except ApiError as err:
            if err.status != BACKPRESSURE:
                raise
            raise ApiError(WEBHOOK_BACKPRESSURE, err.code, err.message, err.extra, err.headers) from None

    def _collect_webhook(self, source: SourceConfig, body: bytes, signature: str) -> Collected:
        if source.webhook_secret:
            # On the bytes, before they are parsed: an unsigned body costs no more than its read.
            _verify_signature(signature, source.webhook_secret, body, self._webhook_event_limit * _SIGNED_ITEM_SCAN)
        # Bounded by the events a webhook may carry (Segment's batches), not /v1/batch's.
        check_containers(body, self.config.server.max_webhook_events)
        data = parse_json(body)
        items = data if isinstance(data, list) else [data]
        _drop_applied_all(items)
        collected = self.ingestor.collector(source)
        # Classic Webhooks also send deletion requests (type delete): stored like any call,
        # ordered with the user's other events, so the user's earlier events reach the
        # destination before the deletion does. Only from a source whose requests Segment
        # signs: the write key alone would let anyone who reads it off a web page or out of
        # an app delete any user (which is why the Tracking API refuses the type).
        deletions = WEBHOOK_ONLY_TYPES if source.webhook_secret else frozenset[str]()
        received = self._clock.now()
        envelope = Envelope(*received, keep_timestamp=True, more_types=deletions)
        if not deletions or len(items) < 2 or len(items) > self.config.server.max_webhook_events:
            self._collect_many(collected, items, envelope)  # (too many: refused whole, there)
            return collected
        # Segment signs only a batch's first item (_verify_signature): the others are vouched
        # for by the write key alone, which is no reason to delete anyone. Deletions are taken
        # from the first item only; one further on is refused as unsigned, by its index.
        self._collect_many(collected, items[:1], envelope)
        signed = len(collected.rejected)
        self._collect_many(collected, items[1:], Envelope(*received, keep_timestamp=True))
        rest = collected.rejected[signed:]
        collected.rejected[signed:] = [
            replace(r, index=r.index + 1, message=_UNSIGNED_IN_BATCH)
            if r.code == "unsigned_deletion"
            else replace(r, index=r.index + 1)
            for r in rest
        ]
        return collected


def _first_item_key(items: Any) -> Any:
    """The writeKey of a batch's first item carrying one, for a batch sent with no other (no
    Basic auth, no top-level writeKey): a client that keys each event (as analytics.js does)
    rather than its batch. The batch's other items are held to it (Envelope.write_key_digest)."""
    if type(items) is list:
        for item in items:
            if type(item) is dict:
                key = item.get("writeKey")
                if key is not None and key != "":
                    return key
    return None


def _drop_applied_all(items: list[Any]) -> None:
    """Take "All": false out of each event's integrations (in place: the parsed body is ours).

    {"All": false, "Webhooks": true} is how a call picks Segment's destinations, and Segment
    has applied it: the event reached its Webhooks destination, the bridge, because it was
    picked. Left in, the mappings read it as a call keeping the event from MoEngage, and
    discarded every event (a deletion request too) routed to the bridge that way. A name
    set to false ("MoEngage": false) is kept, and still keeps the event from that destination."""
    for item in items:
        if type(item) is dict:
            integrations = item.get("integrations")
            if type(integrations) is dict and integrations.get("All") is False:
                del integrations["All"]


_UNSIGNED_IN_BATCH = (
    "a delete is taken from the first item of a webhook batch only: Segment signs that item"
    " alone, and the write key does not vouch for a deletion (apps carry it for anyone to read)"
)


def _verify_signature(given: str, secret: str, body: bytes, max_item: int) -> None:
    """Segment signs the JSON body, or for a batch (array) only its first item, looked for
    in the first ``max_item`` bytes after the '[' only (see _SIGNED_ITEM_SCAN)."""
    if not given:
        raise ApiError(401, "signature_required", "X-Signature header is missing")
    signed: bytes | None = body
    text = body.strip()
    if text[:1] == b"[":
        # The scan is a Python loop over the bytes: unbounded, one gzip'd request of 16 KB
        # (a 16 MB string as the first item) held the event loop half a second, for anyone
        # with the write key and any signature.
        window = text[: max_item + 2]  # "[", the item, and the "," or "]" that ends it
        item = first_array_item(window)
        if item is None and len(window) < len(text):
            raise ApiError(
                400,
                "event_too_large",
                f"the batch's first item, the one Segment signs, runs past {max_item} bytes: no event is that large",
            )
        if item is None and text[1:].strip() == b"]":
            # An empty batch has no first item to sign (Segment never sends one) and
            # nothing to take: its answer is the precise 400 empty_batch, not a signature
            # no sender could have made.
            return
        signed = item
    if signed is None:
        raise ApiError(401, "invalid_signature", "X-Signature does not match the body")
    expected = hmac.new(secret.encode("utf-8"), signed, hashlib.sha1).hexdigest()
    # surrogatepass: a header aiohttp could not read as UTF-8 is a wrong signature, not a crash.
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "surrogatepass")):
        raise ApiError(401, "invalid_signature", "X-Signature does not match the body")


# Normalising adds receivedAt, timestamp, originalTimestamp and maybe messageId (~200 bytes),
# and merges a batch's context: below limit minus this, the raw event is surely within it.
_NORMALISED_GROWTH = 1024
# How far past the '[' of a signed webhook batch its first item is looked for, in webhook
# events' size limits: the item is one event, which Segment writes as compact JSON; six
# times over still leaves room for every character written as a \uXXXX escape.
_SIGNED_ITEM_SCAN = 6
# What Segment's servers add to a call before its Webhooks destination forwards it
# (receivedAt, sentAt, originalTimestamp, version, channel, projectId, a messageId, the
# client's IP in context): a few hundred bytes, allowed twice over and then some.
_SEGMENT_ADDED = 2048


# How many request bodies' worth (server.max_request_bytes) a batch's top-level context and
# integrations may add, merged into each of its events: 8 MB at the default, room for 2500
# events sharing a 3 KB context, where a real batch's shared context is a few hundred bytes.
MAX_SHARED_COPIES = 16


def _json_size(value: Any) -> int:
    """The bytes ``value`` (a batch's context or integrations) takes in each stored event."""
    if not value:
        return 0
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return 0  # nested too deep to store: each event holding it is refused (event_too_deep)


def _too_large(size: int, limit: int) -> Invalid:
    # Segment answers "Exceed payload limit" for an event over 32 KB.
    return Invalid("event_too_large", f"Exceed payload limit: the event is {size} bytes; at most {limit}")


def first_array_item(body: bytes) -> bytes | None:
    """The exact bytes of the first element of a top-level JSON array.

    Segment signs JSON.stringify(items[0]); in the posted body that is exactly the text
    between '[' and the first top-level ',' (or ']'), so we slice rather than re-encode
    (re-encoding could format numbers differently and break the signature).
    """
    text = body.strip()
    if not text.startswith(b"["):
        return None
    depth = 0
    in_string = False
    escaped = False
    start = None
    for i in range(1, len(text)):
        c = text[i]
        if start is None:
            if c in b" \t\r\n":
                continue
            start = i
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
            continue
        if c == 0x22:
            in_string = True
        elif c in b"{[":
            depth += 1
        elif c in b"}]":
            if depth == 0:
                return text[start:i].rstrip() or None
            depth -= 1
        elif c == 0x2C and depth == 0:
            return text[start:i].rstrip()
    return None
