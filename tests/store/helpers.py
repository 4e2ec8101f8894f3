"""Small builders shared by the store tests."""

from __future__ import annotations

import orjson

from bridge.store.base import IdentityLink, IncomingEvent


def event(
    message_id: str,
    user: str = "",
    destinations: tuple[str, ...] = ("moe",),
    links: tuple[IdentityLink, ...] = (),
    size: int = 0,
) -> IncomingEvent:
    body: dict[str, object] = {"messageId": message_id, "userId": user}
    if size:
        body["pad"] = "x" * size
    return IncomingEvent(message_id, user, orjson.dumps(body), destinations, links)
