"""Who may call a Streams source's routes: the ``allow_ips`` check shared by the event
route and the OAuth2 token endpoint."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from bridge.config.model import SourceConfig
from bridge.sources.client_ip import IPNetwork, client_address


def client_allowed(
    request: web.Request, source: SourceConfig, trusted_proxies: Sequence[IPNetwork]
) -> tuple[bool, str | None]:
    """Whether ``source`` takes requests from the request's client (any client when it
    has no ``allow_ips``), and the client's address to log (None when unknown)."""
    if not source.allow_ips:
        return True, None
    remote = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted_proxies)
    if remote is None:
        return False, None  # cannot be known: nothing is allowed
    return any(remote in net for net in source.allow_ips), str(remote)
