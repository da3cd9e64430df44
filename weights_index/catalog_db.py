"""The catalog's SQLite database: its schema, connections, write transactions, unique names and full-text rows.

One row per file in ``adapters``; ``adapters_fts`` (FTS5) holds the searchable text of each row under the same id.
The database is a cache of the folder: a catalog from another schema version is dropped and rebuilt by the next scan.
"""

from __future__ import annotations

import json
import posixpath
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion.errors import ComposerError
from weights_index.metadata import AdapterMetadata

SCHEMA_VERSION = 3
LOCK_TIMEOUT_S = 120.0
"""How long a scan waits for another process's scan of the same catalog to finish."""
FTS_CAPTION_TAGS = 64
"""Caption tags (most frequent first) put in an adapter's searchable text."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    relpath TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    format TEXT,
    family TEXT NOT NULL,
    ranks TEXT NOT NULL,
    rank INTEGER,
    num_layers INTEGER,
    has_text_encoder INTEGER NOT NULL DEFAULT 0,
    file_size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sidecars TEXT NOT NULL,
    sha256 TEXT,
    metadata TEXT NOT NULL,
    header_metadata TEXT NOT NULL,
    preview TEXT,
    error TEXT,
    error_type TEXT,
    scanned_at REAL NOT NULL,
    scores TEXT NOT NULL DEFAULT '{}',
    vector_id INTEGER
);
CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters (sha256);
CREATE INDEX IF NOT EXISTS adapters_family ON adapters (family);
CREATE VIRTUAL TABLE IF NOT EXISTS adapters_fts USING fts5 (
    name, title, trigger_words, tags, description, tokenize = 'unicode61 remove_diacritics 2'
);
"""


@contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    """An autocommit connection in WAL mode; database errors become :class:`ComposerError` naming the file."""
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(db_path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ComposerError(
            f"cannot open the catalog database: {exc}",
            path=db_path,
            hint="make the folder writable or pass db_path to a writable location",
        ) from exc
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        yield db
    except sqlite3.DatabaseError as exc:
        raise ComposerError(
            f"catalog database error: {exc}",
            path=db_path,
            hint="if the file is corrupt, delete it; the next scan rebuilds it",
        ) from exc
    finally:
        db.close()


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed on success, rolled back on any error (or never committed if killed)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise ComposerError(
            f"the catalog is busy ({exc})", hint="another scan is running; wait for it and try again"
        ) from exc
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the tables on first use; a catalog from another schema version is dropped (it is a cache)."""
    if _schema_version(db) == SCHEMA_VERSION:
        return
    with transaction(db):
        if _schema_version(db) == SCHEMA_VERSION:
            return
        for table in ("adapters_fts", "adapters", "catalog_info"):
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO catalog_info (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))


def _schema_version(db: sqlite3.Connection) -> int | None:
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'catalog_info'").fetchone() is None:
        return None
    row = db.execute("SELECT value FROM catalog_info WHERE key = 'schema'").fetchone()
    return int(row[0]) if row else None


def assign_names(db: sqlite3.Connection) -> set[int]:
    """Give every row its unique name (file stem; relative path without suffix when stems collide).

    Returns the ids whose name changed. Changed names go through a temporary value first so that two rows
    swapping names never violate the UNIQUE constraint mid-update.
    """
    rows = db.execute("SELECT id, relpath, name FROM adapters").fetchall()
    stems: dict[str, int] = {}
    for _, relpath, _ in rows:
        stem = _stem(relpath)
        stems[stem] = stems.get(stem, 0) + 1
    changes = []
    for row_id, relpath, name in rows:
        stem = _stem(relpath)
        wanted = stem if stems[stem] == 1 else _without_adapter_suffix(relpath)
        if wanted != name:
            changes.append((row_id, wanted))
    for row_id, _ in changes:
        db.execute("UPDATE adapters SET name = ? WHERE id = ?", (f"//renaming/{row_id}", row_id))
    for row_id, wanted in changes:
        db.execute("UPDATE adapters SET name = ? WHERE id = ?", (wanted, row_id))
    return {row_id for row_id, _ in changes}


def _stem(relpath: str) -> str:
    return posixpath.splitext(posixpath.basename(relpath))[0]


def _without_adapter_suffix(relpath: str) -> str:
    return relpath[: -len(".safetensors")] if relpath.lower().endswith(".safetensors") else relpath


def index_text(db: sqlite3.Connection, row_id: int) -> None:
    """Refresh the full-text row of one adapter from its catalog row."""
    name, title, metadata = db.execute("SELECT name, title, metadata FROM adapters WHERE id = ?", (row_id,)).fetchone()
    meta = AdapterMetadata.from_json(json.loads(metadata))
    tags = [*meta.labels, *([meta.category] if meta.category else []), *list(meta.tags)[:FTS_CAPTION_TAGS]]
    db.execute("DELETE FROM adapters_fts WHERE rowid = ?", (row_id,))
    db.execute(
        "INSERT INTO adapters_fts (rowid, name, title, trigger_words, tags, description) VALUES (?, ?, ?, ?, ?, ?)",
        (row_id, name, title, ", ".join(meta.trigger_words), ", ".join(tags), meta.description or ""),
    )


def drop_row(db: sqlite3.Connection, row_id: int) -> None:
    """Delete one adapter's row and its full-text row."""
    db.execute("DELETE FROM adapters WHERE id = ?", (row_id,))
    db.execute("DELETE FROM adapters_fts WHERE rowid = ?", (row_id,))
