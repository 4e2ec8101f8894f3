"""The SQLite schema and connection settings."""

from __future__ import annotations

import sqlite3

from bridge.store.base import StoreError
from bridge.store.sqlite_dedupe import SQL_KEY_FUNCTION, V4_KEYS

# 2: dedupe keys are digests (dedupe_keys). 3: dedupe_recent holds digests too.
# 4: a dedupe_recent row holds many digests end to end (a version-3 row, one digest, reads
# the same, so the upgrade rewrites nothing; an older bridge would misread the new rows).
# 5: dedupe keys in one table per generation of merges (dedupe_generations); a version-4
# file's dedupe_keys becomes its first generation, read until it ages out whole.
SCHEMA_VERSION = 5

# Job states. Dead-lettered and discarded jobs leave the jobs table for their own tables.
QUEUED = 0
LEASED = 1
DELIVERED = 2

# Unsettled jobs that may not be due (the jobs_waiting index). A query must repeat this
# WHERE as it is for SQLite to use the index.
WAITING = f"settled_at IS NULL AND (attempts > 0 OR state <> {QUEUED})"

PRAGMAS = (
    # Dedupe keys are random, so each commit rewrites many B-tree pages; bigger pages mean
    # fewer WAL frames per commit (measured: ~+20% enqueue throughput). Only takes effect
    # on a new file, and must come before WAL mode.
    "PRAGMA page_size = 16384",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",  # an acknowledged event must survive a power cut
    "PRAGMA busy_timeout = 10000",  # the CLI may write to the same file while the server runs
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -32000",
    "PRAGMA journal_size_limit = 67108864",  # the WAL shrinks back after a burst
)

# A new dedupe key's digest (sqlite_dedupe.dedupe_key), waiting to be merged into
# dedupe_keys. The digest and not the (source, messageId) strings: a merge copies the
# digest as it is, where from the strings it called back into Python to hash every row.
# AUTOINCREMENT: a merge deletes the rows up to the last id it snapshotted. Were ids
# reused (after another writer emptied the table), it would delete new, unmerged keys.
DEDUPE_RECENT = """CREATE TABLE IF NOT EXISTS dedupe_recent (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        k BLOB NOT NULL
    )"""

DDL = (
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)""",
    # AUTOINCREMENT: a job id is never reused, so a stale worker can never settle another job.
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        ordering_key TEXT NOT NULL,
        payload BLOB NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        available_at REAL NOT NULL,
        lease_until REAL,
        created_at REAL NOT NULL,
        first_attempt_at REAL,
        last_error TEXT NOT NULL DEFAULT '',
        mapping_version TEXT NOT NULL DEFAULT '',
        settled_at REAL,
        delivered_outputs BLOB
    )""",
    # Only unsettled jobs are indexed, so lease and depth cost what is queued, not history.
    # "Unsettled" is read off settled_at, which only the ack sets: SQLite maintains a
    # partial index on every UPDATE that writes a column its WHERE names, so an index on
    # ``state < DELIVERED`` (its earlier form, dropped below) was deleted and re-inserted
    # by every lease, retry and release too (about 1.5-3 us per leased job).
    """CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (destination, id) WHERE settled_at IS NULL""",
    # The unsettled jobs that may not be due: tried before (a retry, a lapsed lease of
    # ours) or left LEASED by an earlier version. Every other unsettled job is QUEUED and
    # due from its creation, so a lease whose jobs all come before the first of these
    # takes them in id order without walking their ordering keys (sqlite_ops.lease).
    # Empty while nothing fails: an enqueue or an ack adds no entry.
    f"""CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (destination, id) WHERE {WAITING}""",
    # Earlier versions indexed delivered jobs by message id for ``delivered_version``, an
    # audit lookup nothing on a hot path makes. Every ack inserted its jobs' random message
    # ids into that B-tree, which cost more than the rest of the lease and ack together
    # (docs/benchmarks.md); the lookup now reads the table instead.
    """DROP INDEX IF EXISTS jobs_delivered""",
    # A dedupe key is a 16-byte digest of (source, messageId) (sqlite_dedupe.dedupe_key),
    # not the two strings: SDK message ids are random UUIDs, so every merge inserts its
    # keys at random places in a B-tree and touches about one leaf per key once the table
    # outgrows a merge. Rows half the size mean half the leaves to touch, and half the
    # pages a lookup misses in the cache (docs/benchmarks.md, "Random message ids").
    # The keys of GENERATION_SECONDS of merges share a table (``name``, WITHOUT ROWID, the
    # key its primary key), dropped whole once its ``newest`` merge is older than
    # dedupe_hours; ``keys`` counts them. AUTOINCREMENT: a table's name is never reused.
    """CREATE TABLE IF NOT EXISTS dedupe_generations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        opened_at REAL NOT NULL,
        newest REAL NOT NULL,
        keys INTEGER NOT NULL
    )""",
    # Files written before schema version 2 keep their (source, message_id) ``dedupe``
    # table: it is still read and pruned until its keys age out (sqlite_dedupe).
    # New keys land here first, unindexed (see sqlite_dedupe for why).
    DEDUPE_RECENT,
    """CREATE TABLE IF NOT EXISTS identity_links (
        namespace TEXT NOT NULL,
        from_id TEXT NOT NULL,
        to_id TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, from_id)
    ) WITHOUT ROWID""",
    # The links to a user, which a delivered deletion removes (Store.ack's erase_links):
    # without it each deletion read every link, on the writer that ingest waits for.
    """CREATE INDEX IF NOT EXISTS identity_links_by_target ON identity_links (namespace, to_id)""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        ordering_key TEXT NOT NULL,
        payload BLOB NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        response_body TEXT NOT NULL,
        request_body BLOB NOT NULL,
        label TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at REAL NOT NULL,
        first_attempt_at REAL,
        failed_at REAL NOT NULL,
        mapping_version TEXT NOT NULL,
        delivered_outputs BLOB
    )""",
    """CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (destination, failed_at)""",
    # A user's dead letters, which a delivered deletion removes (Store.ack's erase_links).
    """CREATE INDEX IF NOT EXISTS dead_letters_by_user ON dead_letters (destination, ordering_key)""",
    """CREATE TABLE IF NOT EXISTS discards (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        message_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        reason TEXT NOT NULL,
        label TEXT NOT NULL,
        detail TEXT NOT NULL,
        discarded_at REAL NOT NULL,
        ordering_key TEXT NOT NULL DEFAULT '',
        delivered_outputs BLOB
    )""",
    """CREATE INDEX IF NOT EXISTS discards_by_time ON discards (discarded_at)""",
    """CREATE TABLE IF NOT EXISTS destination_state (
        name TEXT PRIMARY KEY,
        paused INTEGER NOT NULL,
        reason TEXT NOT NULL,
        changed_at REAL NOT NULL,
        extra TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY, at REAL NOT NULL)""",
)


def configure(conn: sqlite3.Connection) -> None:
    for pragma in PRAGMAS:
        conn.execute(pragma)
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"could not switch the SQLite database to WAL mode (it is {mode!r})")


def create_schema(conn: sqlite3.Connection, *, upgrade: bool = True) -> None:
    """Create missing tables and check the version. Runs inside the writer's transaction.

    Without ``upgrade`` (the CLI) a file of an older version is refused, untouched: an
    upgrade rewrites tables that an older server, still running on the file, writes to."""
    if not upgrade:
        found = stored_version(conn)
        if found is not None and found < SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {found}, older than this bridge's ({SCHEMA_VERSION}); "
                "start `bridge serve` of this version on it first (it upgrades the file), then run this again"
            )
    for statement in DDL:
        conn.execute(statement)
    _retire_state_index(conn)
    _upgrade_dedupe_recent(conn)
    _keys_of_version_4_as_a_generation(conn)
    _add_columns(conn)
    for statement in LATE_DDL:
        conn.execute(statement)
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {row[0]}, newer than this bridge understands "
            f"({SCHEMA_VERSION}); upgrade the bridge"
        )
    elif int(row[0]) < SCHEMA_VERSION:
        # Version 2 stores new dedupe keys in dedupe_keys, version 3 its waiting keys as
        # digests, and version 4 many of them per row; a bridge of an older version would
        # not find them and would take those events again, so it must refuse the file.
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


# Columns added to a table after it was first created: (table, column, type and default).
# Each has a default (NULL for the nullable ones), so a bridge of the same schema version
# that does not know of it writes around it, and adding it rewrites no row.
ADDED_COLUMNS = (
    # Discards keep their job's ordering key, so a replayed one keeps its place among its
    # user's events.
    ("discards", "ordering_key", "TEXT NOT NULL DEFAULT ''"),
    # The digests of a job's outputs already delivered (bridge/delivery/outputs.py), kept
    # through retries, releases, dead letters, discards and their replays. NULL for all but
    # a job some of whose outputs went out while another did not.
    ("jobs", "delivered_outputs", "BLOB"),
    ("dead_letters", "delivered_outputs", "BLOB"),
    ("discards", "delivered_outputs", "BLOB"),
)


# Indexes on columns of ADDED_COLUMNS: made once the columns are there. A user's discards,
# which a delivered deletion removes (Store.ack's erase_links).
LATE_DDL = ("""CREATE INDEX IF NOT EXISTS discards_by_user ON discards (destination, ordering_key)""",)


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add to a file made before them the columns of ADDED_COLUMNS it does not have."""
    for table, column, kind in ADDED_COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def stored_version(conn: sqlite3.Connection) -> int | None:
    """The file's schema version; None when it holds no bridge store (yet)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is None:
        return None
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return None if row is None else int(row[0])


def _upgrade_dedupe_recent(conn: sqlite3.Connection) -> None:
    """Rebuild a ``dedupe_recent`` of schema version 1 or 2, which held (source, message_id)
    and, before 2, reused ids: same rows, same ids, the digest in place of the strings.
    Needs the connection's SQL_KEY_FUNCTION (sqlite_dedupe.register_functions)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(dedupe_recent)")}
    if "message_id" not in columns:
        return
    # Ids are never reused: the new table continues from the old one's highest id ever
    # given (AUTOINCREMENT's counter, or the highest row of a version-1 table).
    counter = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'dedupe_recent'").fetchone()
    highest = conn.execute("SELECT MAX(id) FROM dedupe_recent").fetchone()[0]
    last_id = max(int(counter[0]) if counter else 0, int(highest or 0))
    conn.execute("ALTER TABLE dedupe_recent RENAME TO dedupe_recent_v2")
    conn.execute(DEDUPE_RECENT)
    conn.execute(
        f"INSERT INTO dedupe_recent (id, k) SELECT id, {SQL_KEY_FUNCTION}(source, message_id) FROM dedupe_recent_v2"
    )
    conn.execute("DROP TABLE dedupe_recent_v2")
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'dedupe_recent'")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('dedupe_recent', ?)", (last_id,))


def _keys_of_version_4_as_a_generation(conn: sqlite3.Connection) -> None:
    """A version-4 file kept every dedupe key in one ``dedupe_keys`` table, each with its
    merge's ``seen_at``: it becomes the oldest generation as it is, renamed nothing and
    copied nothing (a large file opens as fast as before), read until its newest key ages
    out and it is dropped whole. Its keys are kept until then: longer, never less. Empty,
    it is dropped now."""
    found = conn.execute(f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{V4_KEYS}'").fetchone()
    if found is None:
        return
    if conn.execute("SELECT 1 FROM dedupe_generations WHERE name = ?", (V4_KEYS,)).fetchone() is not None:
        return
    oldest, newest, keys = conn.execute(f"SELECT MIN(seen_at), MAX(seen_at), COUNT(*) FROM {V4_KEYS}").fetchone()
    if not keys:
        conn.execute(f"DROP TABLE {V4_KEYS}")
        return
    # Below every other id: generations are read and pruned oldest (lowest id) first.
    first = conn.execute("SELECT MIN(id) FROM dedupe_generations").fetchone()[0]
    conn.execute(
        "INSERT INTO dedupe_generations (id, name, opened_at, newest, keys) VALUES (?, ?, ?, ?, ?)",
        (0 if first is None else int(first) - 1, V4_KEYS, oldest, newest, keys),
    )


def _retire_state_index(conn: sqlite3.Connection) -> None:
    """Drop the index of unsettled jobs keyed on ``state`` (jobs_pending replaces it).

    Every delivered job has its settled_at, since the ack writes both. Any that did not
    would count as queued under the new index, so the first open fills them in."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'jobs_unsettled'").fetchone()
    if found is None:
        return
    conn.execute(f"UPDATE jobs SET settled_at = created_at WHERE state = {DELIVERED} AND settled_at IS NULL")
    conn.execute("DROP INDEX jobs_unsettled")
