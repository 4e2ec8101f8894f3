"""Which address `allow_ips` checks: the peer, or what trusted proxies say in X-Forwarded-For."""

from __future__ import annotations

import ipaddress

import pytest

from bridge.sources.client_ip import IPNetwork, client_address, parse_address

LB = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # No proxies trusted: the header is whatever the caller wrote, so it is ignored.
        ("198.51.100.7", ["203.0.113.9"], [], "198.51.100.7"),
        # A peer that is not a trusted proxy cannot speak for anyone else.
        ("198.51.100.7", ["203.0.113.9"], LB, "198.51.100.7"),
        # Through one trusted load balancer.
        ("10.1.2.3", ["203.0.113.9"], LB, "203.0.113.9"),
        # A client that forges a first hop: the right-most untrusted hop is what the LB saw.
        ("10.1.2.3", ["192.0.2.1, 203.0.113.9"], LB, "203.0.113.9"),
        # Two layers of our own proxies, and the header split across two lines.
        ("10.1.2.3", ["203.0.113.9", "10.9.9.9"], LB, "203.0.113.9"),
        # Ports and brackets as some proxies write them; IPv4-mapped IPv6 peers.
        ("10.1.2.3", ["[2001:db8::5]:443"], LB, "2001:db8::5"),
        ("10.1.2.3", ["203.0.113.9:5123"], LB, "203.0.113.9"),
        ("::ffff:10.1.2.3", ["203.0.113.9"], LB, "203.0.113.9"),
        # Every hop is one of ours: the request started inside.
        ("10.1.2.3", ["10.4.4.4"], LB, "10.4.4.4"),
        # A trusted proxy that forwards nothing: the proxy is the client.
        ("10.1.2.3", [], LB, "10.1.2.3"),
    ],
)
def test_client_address(peer: str, xff: list[str], trusted: list[IPNetwork], expected: str) -> None:
    assert client_address(peer, xff, trusted) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(("peer", "xff"), [("10.1.2.3", ["203.0.113.9, not-an-ip"]), ("", []), (None, [])])
def test_unknowable_clients_are_none(peer: str | None, xff: list[str]) -> None:
    assert client_address(peer, xff, LB) is None


def test_parse_address_rejects_names() -> None:
    assert parse_address("proxy.internal") is None
    assert parse_address(" 192.0.2.1 ") == ipaddress.ip_address("192.0.2.1")
