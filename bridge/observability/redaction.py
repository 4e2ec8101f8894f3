"""Secret redaction for log event dicts.

Two independent nets, because either alone leaks:
- value-based: every registered secret (and its percent-encoded and base64 forms) is replaced
  wherever it occurs in any string, at any depth, including rendered tracebacks;
- key-based: values under credential-looking keys are masked even when the secret was never
  registered (a client sending a wrong key, an upstream echoing a header).
Free text additionally gets `Basic <b64>`, `Bearer <token>`, `key=value` and URL-password
credentials masked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from structlog.typing import EventDict, WrappedLogger

# Below this length the 4-character prefix would give away too much of the secret.
_PREFIX_MIN_LEN = 12
# A base64 core shorter than this would match ordinary words.
_B64_MIN_CORE = 6
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")

_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "password",
        "passwd",
        "api_key",
        "apikey",
        "write_key",
        "writekey",
        "token",
        "secret",
        "webhook_secret",
        "x_api_key",
        "cookie",
        "set_cookie",
    }
)
_SECRET_KEY_SUFFIXES = ("_password", "_secret", "_token", "_api_key", "_apikey", "_write_key", "_writekey")

_FINGERPRINT_RE = re.compile(r"^[^\s]{0,4}…[0-9a-f]{8}$")
_FREE_TEXT_RE = re.compile(
    r"(?P<scheme>\b(?:Basic|Bearer|Token))[ \t]+(?P<cred>[A-Za-z0-9._~+/=-]{8,})"
    r"|(?P<key>\b(?:api[_-]?key|write[_-]?key|password|passwd|access_token|token|secret|client_secret))"
    r"=(?P<value>[^\s&\"',;)\]}]+)"
    r"|(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^\s/:@]*:)(?P<pw>[^\s/@]+)@",
    re.IGNORECASE,
)

_MASKED = "[redacted]"


def fingerprint(value: str) -> str:
    """A stable, non-reversible name for a secret: first 4 characters + "…" + 8 hex of sha256.

    Secrets shorter than 12 characters get no prefix (4 characters would be a third of them)."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    prefix = value[:4] if len(value) >= _PREFIX_MIN_LEN else ""
    return f"{prefix}…{digest}"


def is_secret_key(key: str) -> bool:
    """True for keys whose values are credentials whatever they contain (case-insensitive)."""
    k = key.lower().replace("-", "_")
    return k in _SECRET_KEYS or k.endswith(_SECRET_KEY_SUFFIXES)


def _b64_cores(secret: bytes) -> list[str]:
    """The base64 text that encodes `secret` at each of the three byte alignments.

    Whatever precedes the secret ("user:" in a Basic header) shifts it by 0, 1 or 2 bytes
    within a 3-byte group; the characters built only from secret bits are then fixed, so
    these cores appear in the base64 of any string containing the secret."""
    cores: list[str] = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret).decode("ascii")
        first = -(-8 * shift // 6)  # chars touched by the padding bytes
        last = (8 * (shift + len(secret))) // 6  # chars fully inside the secret bits
        core = encoded[first:last]
        if len(core) >= _B64_MIN_CORE:
            cores.append(core)
            cores.append(core.replace("+", "-").replace("/", "_"))  # urlsafe alphabet
    return cores


class _Patterns:
    """The compiled view of the registered secrets; immutable, swapped atomically."""

    __slots__ = ("b64", "longest", "regex", "replacement")

    def __init__(self, secrets: frozenset[str]) -> None:
        self.replacement: dict[str, str] = {}
        self.b64: set[str] = set()
        for secret in secrets:
            fp = fingerprint(secret)
            self.replacement[secret] = fp
            quoted = urllib.parse.quote(secret, safe="")
            self.replacement.setdefault(quoted, fp)
            self.replacement.setdefault(urllib.parse.quote_plus(secret), fp)
            for core in _b64_cores(secret.encode("utf-8", "surrogatepass")):
                if core not in self.replacement:
                    self.replacement[core] = f"b64({fp})"
                    self.b64.add(core)
        # Longest first so a secret containing another secret is replaced whole.
        alternatives = sorted(self.replacement, key=len, reverse=True)
        self.longest = len(alternatives[0]) if alternatives else 0
        self.regex = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def sub(self, text: str) -> str:
        regex = self.regex
        if regex is None:
            return text
        out: list[str] = []
        pos = 0
        for m in regex.finditer(text):
            start, end = m.span()
            if start < pos:
                continue
            token = m.group()
            if token in self.b64:
                # Swallow the rest of the base64 word so no fragment of the credential remains.
                while start > pos and text[start - 1] in _B64_ALPHABET:
                    start -= 1
                while end < len(text) and (text[end] in _B64_ALPHABET or text[end] == "="):
                    end += 1
            out.append(text[pos:start])
            out.append(self.replacement[token])
            pos = end
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)


_lock = threading.Lock()
_secrets: set[str] = set()
_patterns = _Patterns(frozenset())


def register_secret(value: str) -> None:
    """Make `value` unloggable from now on. Empty values are ignored."""
    global _patterns
    if not isinstance(value, str):
        raise TypeError(f"register_secret expects a str, got {type(value).__name__}")
    if not value or value in _secrets:
        return
    with _lock:
        _secrets.add(value)
        _patterns = _Patterns(frozenset(_secrets))


def longest_form() -> int:
    """The length of the longest text replaced by value (a secret, an encoding of it, a base64
    core): a text cut short ends in less than this of one that redaction cannot recognise."""
    return _patterns.longest


def clear_secrets() -> None:
    """Forget every registered secret (tests; a config reload that rotates keys re-registers)."""
    global _patterns
    with _lock:
        _secrets.clear()
        _patterns = _Patterns(frozenset())


def _mask_free_text(m: re.Match[str]) -> str:
    cred = m.group("cred")
    if cred is not None:
        scheme = m.group("scheme")
        if scheme.lower() == "basic" and not _looks_like_basic(cred):
            return m.group()
        if scheme.lower() != "basic" and cred.isalpha() and cred.islower():
            return m.group()  # prose such as "Bearer authentication", not a token
        return f"{scheme} {fingerprint(cred)}"
    if m.group("userinfo") is not None:
        # A password in a URL (store DSNs): keep the user and host, mask only the password.
        pw = m.group("pw")
        return m.group() if _FINGERPRINT_RE.match(pw) else f"{m.group('userinfo')}{fingerprint(pw)}@"
    value = m.group("value")
    if _FINGERPRINT_RE.match(value) or value.startswith("b64("):
        return m.group()
    return f"{m.group('key')}={fingerprint(value)}"


def _looks_like_basic(cred: str) -> bool:
    try:
        return b":" in base64.b64decode(cred + "=" * (-len(cred) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False


def redact_text(text: str) -> str:
    """`text` with every registered secret and every recognisable credential masked."""
    return _FREE_TEXT_RE.sub(_mask_free_text, _patterns.sub(text))


def mask_value(value: Any) -> Any:
    """What a value under a credential key becomes: a fingerprint, keeping the auth scheme."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return _MASKED
    if not value or _FINGERPRINT_RE.match(value):
        return value
    scheme, sep, cred = value.partition(" ")
    if sep and scheme.lower() in ("basic", "bearer", "token", "digest") and cred.strip():
        return f"{scheme} {fingerprint(cred.strip())}"
    return fingerprint(value)


def redact_value(value: Any) -> Any:
    """`value` with secrets removed at any depth. Unknown objects become their redacted str()."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {
            k: (mask_value(v) if isinstance(k, str) and is_secret_key(k) else redact_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = [_redact_pair(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        redacted = redact_text(text)
        return value if redacted == text else redacted
    return redact_text(str(value))


def _redact_pair(value: Any) -> Any:
    # Header lists arrive as (name, value) pairs rather than dicts.
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and is_secret_key(value[0]):
        return (value[0], mask_value(value[1]))
    return redact_value(value)


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: run after exceptions and stacks are rendered to text, before rendering."""
    for key, value in event_dict.items():
        if key.startswith("_"):
            continue  # structlog internals such as _record; never rendered
        event_dict[key] = mask_value(value) if is_secret_key(key) else redact_value(value)
    return event_dict
