"""The address a request really came from, for `allow_ips`.

Behind a load balancer or an ingress the TCP peer is the proxy, not MoEngage. Proxies
append the address they saw to X-Forwarded-For, so the client is the right-most entry
that is not itself one of our proxies. Only peers listed in `server.trusted_proxies`
may speak for someone else: anyone else could write any X-Forwarded-For they like.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443", as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:5123"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address, or None when it cannot be known (then nothing is allowed).

    ``forwarded_for`` is every X-Forwarded-For header value, in the order received.
    """
    address = parse_address(peer or "")
    if address is None or not _inside(address, trusted):
        return address
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return None  # a garbled chain proves nothing about the client
        if not _inside(address, trusted):
            return address
    # Every hop is one of our proxies: the request started inside; the first hop is it.
    return address


def _inside(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address in net for net in networks)
