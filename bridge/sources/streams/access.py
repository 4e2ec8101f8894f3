"""Who may call a Streams source's routes: the ``allow_ips`` check shared by the event
route and the OAuth2 token endpoint."""

from __future__ import annotations

import secrets
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


# A secret no source has (random in each process, so never a configured one), compared with
# a request's credentials when the request is refused before its source's own could be: an
# unknown name, an address outside allow_ips, a token asked of a source that is not oauth2.
# The refusal then costs the comparisons a known source's does, so the time an answer takes
# tells which source names exist no more than its text does.
DECOY_SECRET = secrets.token_urlsafe(32)
