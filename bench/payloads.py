"""Request bodies for the load generator: realistic ~1 KB events with fresh ids every time.

Bodies are pre-encoded once as byte fragments split around an id marker; each request
joins the fragments with new ids, so producing a 100-event body costs one ``bytes.join``
instead of a JSON encode, and the load generator stays off the critical path.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

MARKER = "@@BENCH-ID@@"
_MARKER_BYTES = orjson.dumps(MARKER)
USERS = 5000
KINDS = ("identify", "track", "page")
SINGLE_CALLS = KINDS
# How many distinct pre-encoded bodies each mode cycles through (variety of users and shapes).
VARIANTS = 64

_PRODUCTS = ("Trail Runner 2", "Merino Hoodie", "Ceramic Pour-Over", "Bike Light Pro", "Linen Sheet Set")
_CITIES = ("Lisbon", "Austin", "Pune", "Osaka", "Leeds", "Recife")
_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15"
)
_TIMESTAMP = "2026-11-23T21:14:07.512Z"


def _context(rng: random.Random, user: int) -> dict[str, Any]:
    return {
        "library": {"name": "analytics.js", "version": "5.2.1"},
        "ip": f"203.0.113.{user % 250 + 1}",
        "locale": "en-US",
        "timezone": "Europe/Lisbon",
        "userAgent": _AGENT,
        "page": {
            "path": "/collections/outdoor",
            "referrer": "https://www.example-search.com/",
            "title": "Outdoor collection",
            "url": "https://shop.example.com/collections/outdoor?utm_source=newsletter",
        },
        "campaign": {"name": "autumn_sale", "source": "newsletter", "medium": "email"},
        "device": {"id": f"dev-{user:06d}", "type": "web"},
        "os": {"name": "Mac OS", "version": "14.5"},
    }


def segment_event(kind: str, rng: random.Random) -> dict[str, Any]:
    """One Segment call of ``kind`` with the messageId left as the marker."""
    user = rng.randrange(USERS)
    event: dict[str, Any] = {
        "type": kind,
        "messageId": MARKER,
        "userId": f"user-{user:06d}",
        "anonymousId": f"anon-{uuid.UUID(int=rng.getrandbits(128))}",
        "timestamp": _TIMESTAMP,
        "context": _context(rng, user),
    }
    if kind == "identify":
        event["traits"] = {
            "email": f"user{user}@example.com",
            "firstName": "Ada",
            "lastName": f"Lovelace-{user}",
            "phone": f"+35191{user:07d}",
            "plan": rng.choice(("free", "pro", "team")),
            "createdAt": "2025-03-14T09:26:53.000Z",
            "address": {"city": rng.choice(_CITIES), "country": "PT"},
            "logins": rng.randrange(1, 400),
        }
    elif kind == "track":
        product = rng.choice(_PRODUCTS)
        event["event"] = rng.choice(("Order Completed", "Product Viewed", "Product Added", "Checkout Started"))
        event["properties"] = {
            "order_id": f"o-{rng.getrandbits(40):x}",
            "revenue": round(rng.uniform(5, 400), 2),
            "currency": "EUR",
            "coupon": "AUTUMN10",
            "products": [{"product_id": f"p-{rng.randrange(900)}", "name": product, "price": 49.9, "quantity": 1}],
        }
    else:
        event["name"] = "Outdoor collection"
        event["properties"] = {
            "path": "/collections/outdoor",
            "referrer": "https://www.example-search.com/",
            "title": "Outdoor collection",
            "url": "https://shop.example.com/collections/outdoor",
            "search": "?utm_source=newsletter",
        }
    return event


def streams_event(rng: random.Random) -> dict[str, Any]:
    """One MoEngage Streams campaign event with event_uuid left as the marker."""
    user = rng.randrange(USERS)
    name, code = rng.choice(
        (("Email Sent", "MOE_EMAIL_SENT"), ("Email Opened", "MOE_EMAIL_OPEN"), ("Email Clicked", "MOE_EMAIL_CLICK"))
    )
    return {
        "event_name": name,
        "event_code": code,
        "event_uuid": MARKER,
        "event_time": 1795468447,
        "event_type": "CAMPAIGN_EVENT",
        "event_source": "MOENGAGE",
        "uid": f"user-{user:06d}",
        "email_id": f"user{user}@example.com",
        "event_attributes": {
            "campaign_id": f"65a{rng.getrandbits(40):x}",
            "campaign_name": "Autumn sale — reminder",
            "campaign_type": "GENERAL",
            "campaign_channel": "EMAIL",
            "readable_campaign_id": "AUTUMN_SALE_REMINDER_2026",
            "email_subject": "Your basket is waiting (10% off inside)",
            "moe_campaign_tags": ["autumn", "retention"],
            "moe_delivery_type": "One Time",
            "moe_variation_id": rng.randrange(1, 4),
            "moe_locale": "default",
        },
        "user_attributes": {
            "moengage_user_id": f"6553{user:020d}",
            "first_name": "Ada",
            "last_name": f"Lovelace-{user}",
            "email": f"user{user}@example.com",
            "city": rng.choice(_CITIES),
            "plan": rng.choice(("free", "pro", "team")),
            "signup_source": "organic_search",
            "last_order_at": "2026-11-02T18:40:11Z",
            "lifetime_value": round(rng.uniform(10, 2500), 2),
            "preferred_language": "pt-PT",
        },
        "device_attributes": {"moengage_device_id": f"dev-{user:06d}", "platform": "web"},
    }


@dataclass(frozen=True)
class Template:
    """A body split around its id slots: parts[0] id parts[1] id ... parts[n]."""

    parts: tuple[bytes, ...]

    @property
    def ids(self) -> int:
        return len(self.parts) - 1

    def render(self, ids: list[bytes]) -> bytes:
        pieces: list[bytes] = [b""] * (2 * len(self.parts) - 1)
        pieces[0::2] = self.parts
        pieces[1::2] = ids
        return b"".join(pieces)


def _template(body: Any) -> Template:
    raw = orjson.dumps(body)
    parts = raw.split(_MARKER_BYTES)
    # Ids are inserted with their quotes so the marker's quotes are dropped here.
    return Template(tuple(parts))


class IdSource:
    """Fresh JSON-quoted ids, random UUID4s as the Segment SDKs send (analytics-python
    ``uuid4()``, analytics.js, the mobile SDKs), and as MoEngage sends ``event_uuid``.

    Random, not counted: an id that sorts after the last one lands at the end of every
    B-tree keyed by it (the dedupe index) and hides what random ids cost there.
    """

    def take(self, n: int) -> list[bytes]:
        # os.urandom once per request, not uuid.uuid4() per id: about a third of the cost,
        # which keeps the generator's core free at 100 ids per request.
        raw = os.urandom(16 * n)
        ids = []
        for i in range(0, 16 * n, 16):
            h = _v4(raw[i : i + 16]).hex()
            ids.append(f'"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"'.encode())
        return ids


def _v4(b: bytes) -> bytes:
    """Set the version (4) and variant (RFC 4122) bits of 16 random bytes."""
    return b[:6] + bytes(((b[6] & 0x0F) | 0x40, b[7], (b[8] & 0x3F) | 0x80)) + b[9:]


@dataclass(frozen=True)
class Workload:
    """What one request of a mode looks like: path, per-request headers and body factory."""

    mode: str
    events_per_request: int
    next_request: Callable[[], tuple[bytes, bytes]]  # -> (path, body)
    headers: bytes  # extra header lines, each ending in CRLF


def basic_header(user: str, password: str = "") -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Authorization: Basic {token}\r\n".encode()


def _cycle(templates: list[tuple[bytes, Template]], ids: IdSource) -> Callable[[], tuple[bytes, bytes]]:
    it: Iterator[tuple[bytes, Template]] = itertools.cycle(templates)

    def next_request() -> tuple[bytes, bytes]:
        path, template = next(it)
        return path, template.render(ids.take(template.ids))

    return next_request


def single_workload(write_key: str, seed: int = 1) -> Workload:
    """Single Tracking API calls (/v1/identify, /v1/track, /v1/page), an even mix."""
    rng = random.Random(seed)
    templates = []
    for i in range(VARIANTS):
        kind = KINDS[i % len(KINDS)]
        templates.append((f"/v1/{kind}".encode(), _template(segment_event(kind, rng))))
    return Workload("single", 1, _cycle(templates, IdSource()), basic_header(write_key))


def batch_workload(write_key: str, size: int = 100, seed: int = 2) -> Workload:
    """/v1/batch with ``size`` events each, an identify/track/page mix (1:3:2)."""
    rng = random.Random(seed)
    mix = ("identify", "track", "track", "track", "page", "page")
    templates = []
    for _ in range(VARIANTS // 4):
        events = [segment_event(rng.choice(mix), rng) for _ in range(size)]
        templates.append((b"/v1/batch", _template({"batch": events, "sentAt": _TIMESTAMP})))
    return Workload("batch", size, _cycle(templates, IdSource()), basic_header(write_key))


def streams_workload(source: str, user: str, password: str, size: int = 100, seed: int = 3) -> Workload:
    """MoEngage Streams batches of ``size`` events to /moengage/streams/{source}."""
    rng = random.Random(seed)
    templates = []
    for _ in range(VARIANTS // 4):
        events = [streams_event(rng) for _ in range(size)]
        templates.append((f"/moengage/streams/{source}".encode(), _template({"events": events})))
    return Workload("streams", size, _cycle(templates, IdSource()), basic_header(user, password))


def mean_event_bytes(workload: Workload, samples: int = 20) -> float:
    """Average encoded size of one event in this workload's requests."""
    total = 0
    for _ in range(samples):
        _path, body = workload.next_request()
        total += len(body)
    return total / samples / workload.events_per_request
