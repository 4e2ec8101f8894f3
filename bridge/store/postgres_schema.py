"""The PostgreSQL schema. Every table lives in one schema (``bridge`` by default), so
several bridges (or tests) can share a database without seeing each other."""

from __future__ import annotations

import hashlib
import re

from bridge.store.base import StoreError
from bridge.store.sqlite_schema import DELIVERED, LEASED, QUEUED

# PostgreSQL's own version: SQLite's moved to 3 for a change of its dedupe tables alone,
# and a database written by this bridge is still readable by one that says 2.
SCHEMA_VERSION = 2

__all__ = ["DDL", "DELIVERED", "DIGEST_MARK", "LEASED", "QUEUED", "SCHEMA_VERSION", "check_schema_name", "link_key"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Any constant shared by every node: schema creation takes this lock so two nodes
# starting together do not race on CREATE ... IF NOT EXISTS.
DDL_LOCK = 0x62726964676501

DDL = (
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        ordering_key TEXT NOT NULL,
        payload BYTEA NOT NULL,
        state SMALLINT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        available_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        first_attempt_at DOUBLE PRECISION,
        last_error TEXT NOT NULL DEFAULT '',
        mapping_version TEXT NOT NULL DEFAULT '',
        settled_at DOUBLE PRECISION
    )""",
    f"""CREATE INDEX IF NOT EXISTS jobs_unsettled ON jobs (destination, id) WHERE state < {DELIVERED}""",
    # Earlier versions indexed delivered jobs by message id for ``delivered_version``, an
    # audit lookup nothing on a hot path makes. Every ack inserted its jobs' random message
    # ids into that B-tree, which cost more than the rest of the lease and ack together
    # (docs/benchmarks.md); the lookup now reads the table instead.
    """DROP INDEX IF EXISTS jobs_delivered""",
    """CREATE TABLE IF NOT EXISTS dedupe (
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, message_id)
    )""",
    # seen_at only grows, so this index is appended to; prune reads a range of it.
    """CREATE INDEX IF NOT EXISTS dedupe_by_time ON dedupe (seen_at)""",
    """CREATE TABLE IF NOT EXISTS identity_links (
        namespace TEXT NOT NULL,
        from_id TEXT NOT NULL,
        to_id TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (namespace, from_id)
    )""",
    # The links to a user, which a delivered deletion removes (Store.ack's erase_links).
    # A hash index: a to_id is as long as its event lets it be, past what a B-tree takes.
    """CREATE INDEX IF NOT EXISTS identity_links_by_target ON identity_links USING hash (to_id)""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        ordering_key TEXT NOT NULL,
        payload BYTEA NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        response_body TEXT NOT NULL,
        request_body BYTEA NOT NULL,
        label TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        first_attempt_at DOUBLE PRECISION,
        failed_at DOUBLE PRECISION NOT NULL,
        mapping_version TEXT NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (destination, failed_at)""",
    # A user's dead letters, which a delivered deletion removes (Store.ack's erase_links).
    # A hash index, as identity_links_by_target: an ordering key is as long as its id.
    """CREATE INDEX IF NOT EXISTS dead_letters_by_user ON dead_letters USING hash (ordering_key)""",
    """CREATE TABLE IF NOT EXISTS discards (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        payload BYTEA NOT NULL,
        reason TEXT NOT NULL,
        label TEXT NOT NULL,
        detail TEXT NOT NULL,
        discarded_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS discards_by_time ON discards (discarded_at)""",
    """CREATE TABLE IF NOT EXISTS destination_state (
        name TEXT PRIMARY KEY,
        paused BOOLEAN NOT NULL,
        reason TEXT NOT NULL,
        changed_at DOUBLE PRECISION NOT NULL,
        extra TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY, at DOUBLE PRECISION NOT NULL)""",
)


# PostgreSQL cannot put a key of more than about 2.7 KB in a B-tree, and identity_links is
# keyed by (namespace, from_id), a Segment userId that nothing else bounds but the 32 KB
# of its event. A longer id is kept under its digest instead: written as the key, and
# looked up the same way, so the table and its primary key stay as they are, and older
# bridges on the same database keep working. Any id that starts with the marker is
# digested too, so no id can pass for another's digest.
LINK_KEY_BYTES = 1024
DIGEST_MARK = "bridge-sha256:"


def link_key(from_id: str) -> str:
    """What identity_links stores as ``from_id`` for the id ``from_id``."""
    if (len(from_id) <= LINK_KEY_BYTES // 4 or len(from_id.encode()) <= LINK_KEY_BYTES) and not from_id.startswith(
        DIGEST_MARK
    ):
        return from_id
    return DIGEST_MARK + hashlib.sha256(from_id.encode("utf-8", "surrogatepass")).hexdigest()


def check_schema_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"invalid PostgreSQL schema name {name!r}: use lower-case letters, digits and '_' "
            "(not starting with a digit, at most 63 characters)"
        )
    return name


def schema_error(found: int) -> StoreError:
    return StoreError(
        f"the database has schema version {found}, newer than this bridge understands "
        f"({SCHEMA_VERSION}); upgrade the bridge"
    )


# Columns added to a table after it was first created: (table, column, type and default).
# Added only where missing: even a no-op ALTER TABLE takes the table's exclusive lock, and
# every open (each node's start, each CLI command) would wait behind any reader of it.
ADDED_COLUMNS = (
    # A replayed discard keeps its place among its user's events.
    ("discards", "ordering_key", "TEXT NOT NULL DEFAULT ''"),
    # The digests of a job's outputs already delivered (bridge/delivery/outputs.py), kept
    # through retries, releases, dead letters, discards and their replays. NULL for all but
    # a job some of whose outputs went out while another did not. Nullable, with no
    # default: adding it rewrites no row, and older nodes on the database write around it.
    ("jobs", "delivered_outputs", "BYTEA"),
    ("dead_letters", "delivered_outputs", "BYTEA"),
    ("discards", "delivered_outputs", "BYTEA"),
)
# Indexes on columns of ADDED_COLUMNS: made once the columns are there. A user's discards,
# which a delivered deletion removes (Store.ack's erase_links).
LATE_DDL = ("""CREATE INDEX IF NOT EXISTS discards_by_user ON discards USING hash (ordering_key)""",)
