"""Stateless OAuth2 access tokens for Streams sources: signed, never stored.

A token is ``base64url(payload) + "." + base64url(HMAC-SHA256(key, payload))``, the payload
a small JSON object with the source name, the expiry (epoch seconds) and a random nonce.
Nothing is kept about issued tokens, so every bridge node sharing the config (PostgreSQL
scale-out) accepts the tokens any other node issued. The key is derived from the source's
client secret: changing the secret revokes every token issued under the old one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

# Fixed and versioned: a key derived for tokens is never the secret itself, nor a key any
# other use of the same secret would derive.
_KEY_LABEL = b"bridge moengage-streams oauth2 access-token v1"
# Random bytes in each token: two tokens issued in the same second still differ.
_NONCE_BYTES = 16
# Far longer than any token this module issues (~150 characters for a 100-character name);
# a longer one is refused before any decoding.
MAX_TOKEN_LENGTH = 1024
_TOKEN = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")

# Why a token is refused, as logged (``streams_request_refused``'s reason).
MALFORMED = "malformed_token"
BAD_SIGNATURE = "invalid_token_signature"
OTHER_SOURCE = "token_for_another_source"
EXPIRED = "token_expired"


def token_key(client_secret: str) -> bytes:
    """The signing key of a source's tokens (HMAC of a fixed label under its secret)."""
    return hmac.new(client_secret.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def issue_token(source: str, key: bytes, ttl: int, now: float | None = None) -> str:
    """A token for ``source`` that expires ``ttl`` seconds after ``now`` (default: the clock)."""
    issued = time.time() if now is None else now
    payload = json.dumps(
        {"src": source, "exp": int(issued) + ttl, "nonce": secrets.token_urlsafe(_NONCE_BYTES)},
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return f"{_b64(payload)}.{_b64(_sign(key, payload))}"


def token_problem(token: str, source: str, key: bytes, now: float | None = None) -> str | None:
    """Why ``token`` does not let a request into ``source`` (see the reasons above), or
    None when it does. The signature is checked before anything in the payload is read."""
    match = _TOKEN.fullmatch(token) if len(token) <= MAX_TOKEN_LENGTH else None
    if match is None:
        return MALFORMED
    payload, signature = _unb64(match.group(1)), _unb64(match.group(2))
    if payload is None or signature is None:
        return MALFORMED
    # Constant time: the time taken must not tell how much of a forged signature is right.
    if not hmac.compare_digest(signature, _sign(key, payload)):
        # Tampered with, signed under another secret (another source's, or this source's
        # before it changed), or not one of ours at all.
        return BAD_SIGNATURE
    claims = _claims(payload)
    if claims is None:
        return MALFORMED  # signed by us, so never seen: a later format read by this version
    if claims["src"] != source:
        # Two sources sharing one client secret: a token is still for its own source only.
        return OTHER_SOURCE
    if claims["exp"] <= (time.time() if now is None else now):
        return EXPIRED
    return None


def _claims(payload: bytes) -> dict[str, Any] | None:
    try:
        claims = json.loads(payload)
    except ValueError:
        return None
    if (
        not isinstance(claims, dict)
        or not isinstance(claims.get("src"), str)
        or isinstance(claims.get("exp"), bool)
        or not isinstance(claims.get("exp"), int)
    ):
        return None
    return claims


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    # Unpadded base64url: the token goes in a header as it is, nothing to escape.
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
