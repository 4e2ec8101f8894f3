"""Durable job stores. ``open_store(url)`` picks one from a URL; see ``base`` for the seam."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bridge.store.base import Store, StoreError, StoreFull

__all__ = ["Store", "StoreError", "StoreFull", "open_store"]

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


# Query parameters of a PostgreSQL URL that are the bridge's own, not the driver's: asyncpg
# sends unknown parameters to the server as settings, and the server refuses those.
# ``statement_cache_size`` is asyncpg's connection option, 0 behind PgBouncer in transaction
# mode (before 1.21, or without max_prepared_statements): its server connections do not
# keep a client's named prepared statements, which asyncpg's cache relies on.
OWN_PARAMETERS = ("schema", "statement_cache_size")


def _split_own(url: str) -> tuple[str, dict[str, str]]:
    """Take our own query parameters (``OWN_PARAMETERS``) out of a PostgreSQL URL; the
    last of each wins."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {key: value for key, value in query if key in OWN_PARAMETERS}
    if not own:
        return url, {}
    rest = urlencode([(key, value) for key, value in query if key not in OWN_PARAMETERS])
    return urlunsplit(parts._replace(query=rest)), own


def _cache_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = -1
    if size < 0:
        raise ValueError(
            f"statement_cache_size in the store URL must be a whole number, 0 or more, got {value!r} "
            "(0 behind PgBouncer in transaction mode)"
        )
    return size


def shown_url(url: str) -> str:
    """``url`` as it may appear in a message: a password in it is masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        if "@" in url and "@" not in parts.netloc:
            # An '@' urlsplit did not read as user:password@: a mistyped scheme ("bridge:pw@db",
            # no "//"), or a '/' in the password that ended the host early. What precedes it
            # may be a password: shown as "…" (the scheme kept, to say which one is unknown).
            head, _, tail = url.rpartition("@")
            scheme = head.partition("://")[0] + "://" if "://" in head else ""
            return f"{scheme}…@{tail}"
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _bad_port(url: str) -> bool:
    """Whether a host of the URL (asyncpg takes several: h1:5432,h2:5433) has a port that is
    no port. The driver's own error came only when the server started ("invalid literal
    for int()"), after `bridge check` had passed the URL."""
    for host in urlsplit(url).netloc.rpartition("@")[2].split(","):
        tail = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in tail:
            port = tail.rpartition(":")[2]
            if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                return True
    return False


def _password_cut_short(url: str) -> bool:
    """Whether a '/', '?' or '#' in the user:password part ended the host early. An '@'
    after the host is not that in itself: a query's value may hold one (user=admin@server,
    application_name=bridge@node1)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return False
    if "@" in parts.path or "@" in parts.fragment:
        return True
    if "@" not in parts.query:
        return False
    if any("@" in param.partition("=")[0] for param in parts.query.split("&")):
        return True  # "u:pa?ss@host/db": the '@' is in no value
    # "u:pa?x=y@host/db": what was read as host:port is user:password
    port = parts.netloc.rpartition("]")[2].rpartition(",")[2]
    return ":" in port and not port.rpartition(":")[2].isdigit()


def check_store_url(url: str) -> None:
    """Raise ValueError (naming the URL without its password) unless ``url`` names a store."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the store URL is empty; use e.g. sqlite:///var/bridge.db or postgresql://host/db")
    url = url.strip()
    if url.startswith(SQLITE_PREFIX):
        path = url[len(SQLITE_PREFIX) :]
        if not path or path.endswith("/"):
            raise ValueError(
                f"store URL {shown_url(url)!r} names no file: use sqlite:///relative/path.db or sqlite:////abs/path.db"
            )
        if "\0" in path:
            # No file name holds one: the store failed only when the server opened it.
            raise ValueError(
                f"store URL {shown_url(url)!r}: the SQLite path holds a NUL character (character "
                f"{path.index(chr(0)) + 1} of the path), which no file name can"
            )
        return
    if url.startswith(POSTGRES_PREFIXES):
        if _password_cut_short(url):
            # A '/', '?' or '#' in the user:password part ends the host early: the password
            # would then be read as a port, path or query, and quoted in the driver's errors.
            # Never echo the URL here: it holds the password.
            raise ValueError(
                "the user:password part of the PostgreSQL URL holds '/', '?' or '#': percent-encode "
                "them (%2F, %3F, %23)"
            )
        if _bad_port(url):
            # Never echo the URL or the port: "postgresql://user:password" without its "@host"
            # reads the password as a port.
            raise ValueError(
                "a port in the PostgreSQL URL is not a number from 1 to 65535 "
                "(postgresql://user@host:port/db, or host1:port1,host2:port2 for several hosts)"
            )
        size = _split_own(url)[1].get("statement_cache_size")
        if size is not None:
            _cache_size(size)
        return
    if url.startswith("sqlite:"):
        raise ValueError(
            f"store URL {shown_url(url)!r} is malformed: SQLite URLs start with sqlite:/// (three slashes)"
        )
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {shown_url(url)!r}: "
        "use sqlite:///path.db or postgresql://user@host:port/db"
    )


def open_store(url: str, **opts: Any) -> Store:
    """Build the store a URL names; the caller awaits ``store.open()`` before use.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` give a SqliteStore;
    ``postgresql://user@host:port/db`` (or ``postgres://``) a PostgresStore, whose tables
    live in schema ``bridge`` unless the URL says ``?schema=NAME``, and whose connections
    cache prepared statements unless it says ``statement_cache_size=0``. ``opts`` go
    to the store's constructor (``max_bytes``, ...). With ``create=False`` ``open()``
    refuses a store that does not exist yet instead of creating it (the CLI: a relative
    SQLite path taken from another working directory must not become a new, empty file).
    """
    check_store_url(url)
    url = url.strip()
    if url.startswith(SQLITE_PREFIX):
        from bridge.store.sqlite import SqliteStore

        return SqliteStore(url[len(SQLITE_PREFIX) :], **opts)
    from bridge.store.postgres import PostgresStore

    dsn, own = _split_own(url)
    if "schema" in own:
        opts.setdefault("schema", own["schema"])
    if "statement_cache_size" in own:
        opts.setdefault("statement_cache_size", _cache_size(own["statement_cache_size"]))
    return PostgresStore(dsn, **opts)
