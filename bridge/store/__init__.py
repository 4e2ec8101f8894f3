"""Durable job stores. ``open_store(url)`` picks one from a URL; see ``base`` for the seam."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bridge.store.base import Store, StoreError, StoreFull

__all__ = ["Store", "StoreError", "StoreFull", "open_store"]

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take our own ``schema=NAME`` query parameter out of a PostgreSQL URL (asyncpg would
    send unknown parameters to the server as settings)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return url, None
    rest = urlencode([(key, value) for key, value in query if key != "schema"])
    return urlunsplit(parts._replace(query=rest)), schemas[-1]


def shown_url(url: str) -> str:
    """``url`` as it may appear in a message: a password in it is masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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
                f"store URL {url!r} names no file: use sqlite:///relative/path.db or sqlite:////abs/path.db"
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
        return
    if url.startswith("sqlite:"):
        raise ValueError(f"store URL {url!r} is malformed: SQLite URLs start with sqlite:/// (three slashes)")
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {shown_url(url)!r}: "
        "use sqlite:///path.db or postgresql://user@host:port/db"
    )


def open_store(url: str, **opts: Any) -> Store:
    """Build the store a URL names; the caller awaits ``store.open()`` before use.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` give a SqliteStore;
    ``postgresql://user@host:port/db`` (or ``postgres://``) a PostgresStore, whose tables
    live in schema ``bridge`` unless the URL says ``?schema=NAME``. ``opts`` go
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

    dsn, schema = _split_schema(url)
    if schema is not None:
        opts.setdefault("schema", schema)
    return PostgresStore(dsn, **opts)
