"""The library catalog: a folder of adapter files indexed in SQLite (with FTS5 search) and kept current by scans.

A scan is incremental. Files whose (size, mtime_ns) and sidecar signature are unchanged are skipped without
opening them; new or changed files are probed (safetensors header only, never tensor data), hashed (SHA-256) once
their header is sound, and their metadata merged from the header and sidecars. A file moved or renamed inside the
library (same SHA-256, old path gone) keeps its row id, so anything keyed by id (vectors, scores) survives.
Files are read outside any lock and written in batches (:data:`SCAN_BATCH_FILES` files or
:data:`SCAN_BATCH_SECONDS` of reading, whichever comes first), one SQLite transaction each, rows of deleted files
last: a scan killed at any point leaves a consistent catalog that keeps every batch already written.

Each file passes a fault boundary: nothing a file contains (or how it vanishes mid-scan) can fail a scan. Broken
files, pickle checkpoints (refused, never opened), non-regular files (FIFOs, sockets, symlink loops: never opened),
names that are not UTF-8, oversized sidecars, and symlinks that leave the library (refused, never followed) are
recorded with their typed error and listed like any other entry.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import posixpath
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import (
    AdapterFormatError,
    ComposerError,
    NonRegularFileError,
    SidecarTooLargeError,
    UnknownAdapterError,
    UnsafePathError,
)
from weights_index import reader
from weights_index.families import ALL_FAMILIES
from weights_index.hashing import file_sha256
from weights_index.metadata import SIDECAR_SUFFIXES, AdapterMetadata, read_metadata
from weights_index.safetensors_file import PICKLE_SUFFIXES, read_header, refuse_non_regular, refuse_pickle
from weights_index.text_safety import is_valid_unicode, storable_text

if TYPE_CHECKING:
    from fusion.adapters import Adapter

CATALOG_DIRNAME = ".lora-composer"
"""Folder inside the library holding the catalog database and extracted thumbnails (skipped by scans)."""

ADAPTER_SUFFIXES = (".safetensors",)
SCHEMA_VERSION = 3
MAX_HEADER_VALUE_CHARS = 16_384
"""Longer header values (big tag-frequency tables, bucket info) are parsed into metadata but not stored raw."""
LOCK_TIMEOUT_S = 120.0
"""How long a scan waits for another process's scan of the same catalog to finish."""
SCAN_BATCH_FILES = 64
"""New or changed files written per scan transaction."""
SCAN_BATCH_SECONDS = 2.0
"""Reading time after which the files read so far are written, even when fewer than a batch."""

_log = logging.getLogger(__name__)

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
_FTS_WEIGHTS = (4.0, 4.0, 8.0, 1.0, 0.5)
"""bm25 column weights: name, title, trigger words, tags (labels, category, caption tags), description."""
_FTS_CAPTION_TAGS = 64
_TOKEN = re.compile(r"\w+", re.UNICODE)
_ROW_COLUMNS = (
    "id, name, relpath, title, format, family, ranks, rank, num_layers, has_text_encoder, file_size, mtime_ns, "
    "sha256, metadata, header_metadata, preview, error, error_type, scores, vector_id"
)


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued file: what its header and metadata say, or why it could not be read (``error``)."""

    id: int
    name: str
    relpath: str
    path: Path
    title: str
    format: str | None
    family: str
    ranks: tuple[int, ...]
    num_layers: int | None
    has_text_encoder: bool
    file_size: int
    mtime_ns: int
    sha256: str | None
    metadata: AdapterMetadata
    header_metadata: dict[str, str]
    preview: Path | None
    error: str | None
    error_type: str | None
    scores: dict[str, Any] = field(default_factory=dict)
    vector_id: int | None = None

    @property
    def rank(self) -> int | None:
        """The largest rank among the adapted modules (None for broken or rank-less files)."""
        return max(self.ranks) if self.ranks else None

    @property
    def trigger_words(self) -> tuple[str, ...]:
        """Words/phrases that activate the adapter, from every metadata source."""
        return self.metadata.trigger_words

    @property
    def ok(self) -> bool:
        """True when the file was read without error."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field (paths as strings)."""
        return {
            "id": self.id,
            "name": self.name,
            "title": self.title,
            "relpath": self.relpath,
            "path": str(self.path),
            "format": self.format,
            "family": self.family,
            "rank": self.rank,
            "ranks": list(self.ranks),
            "num_layers": self.num_layers,
            "has_text_encoder": self.has_text_encoder,
            "file_size": self.file_size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "trigger_words": list(self.trigger_words),
            "preview": None if self.preview is None else str(self.preview),
            "error": self.error,
            "error_type": self.error_type,
            "metadata": self.metadata.to_json(),
            "header_metadata": self.header_metadata,
            "scores": self.scores,
            "vector_id": self.vector_id,
        }


@dataclass(frozen=True)
class SearchHit:
    """A full-text search result: the entry and its bm25 relevance (higher is better)."""

    entry: CatalogEntry
    score: float


@dataclass(frozen=True)
class ScanReport:
    """What one scan changed. Paths are relative to the library; ``broken`` lists every entry now in error."""

    added: tuple[str, ...]
    updated: tuple[str, ...]
    unchanged: int
    removed: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    broken: tuple[tuple[str, str], ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "added": list(self.added),
            "updated": list(self.updated),
            "unchanged": self.unchanged,
            "removed": list(self.removed),
            "renamed": [list(pair) for pair in self.renamed],
            "broken": [{"relpath": p, "error": e} for p, e in self.broken],
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Found:
    """A candidate file seen by the directory walk (stat only, nothing opened)."""

    relpath: str
    path: str
    size: int
    mtime_ns: int
    sidecars: str
    refusal: ComposerError | None


@dataclass(frozen=True)
class _Record:
    """Everything a scan learned about one new or changed file, ready to be written."""

    found: _Found
    sha256: str | None
    header: reader.AdapterHeader | None
    metadata: AdapterMetadata
    header_metadata: dict[str, str]
    error: BaseException | None


@dataclass
class _Tally:
    """What a scan has done so far, batch by batch."""

    unchanged: int = 0
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)


class Library:
    """A folder of adapter files and its catalog (``<dir>/.lora-composer/catalog.sqlite`` unless ``db_path``).

    Opening does not scan; call :meth:`scan` to bring the catalog up to date (cheap when little changed).
    """

    def __init__(self, directory: str | Path, db_path: str | Path | None = None) -> None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise ComposerError(
                "library folder does not exist or is not a folder", path=root, hint="pass the folder holding your LoRAs"
            )
        self.root = root.resolve()
        self.db_path = (
            Path(db_path).expanduser().resolve() if db_path else self.root / CATALOG_DIRNAME / "catalog.sqlite"
        )
        self.thumbnail_dir = self.db_path.parent / "previews"
        with self._connect() as db:
            self._ensure_schema(db)

    # ----------------------------------------------------------------------------------------------- storage
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.db_path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ComposerError(
                f"cannot open the catalog database: {exc}",
                path=self.db_path,
                hint="make the folder writable or pass db_path to a writable location",
            ) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        except sqlite3.DatabaseError as exc:
            raise ComposerError(
                f"catalog database error: {exc}",
                path=self.db_path,
                hint="if the file is corrupt, delete it; the next scan rebuilds it",
            ) from exc
        finally:
            db.close()

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        """Create the tables on first use; a catalog from another schema version is dropped (it is a cache)."""
        if _schema_version(db) == SCHEMA_VERSION:
            return
        with _transaction(db):
            version = _schema_version(db)
            if version == SCHEMA_VERSION:
                return
            for table in ("adapters_fts", "adapters", "catalog_info"):
                db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO catalog_info (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    # -------------------------------------------------------------------------------------------------- scan
    def scan(self) -> ScanReport:
        """Bring the catalog up to date with the folder, in batches; see the module docstring."""
        start = time.perf_counter()
        with self._connect() as db:
            known = {
                row[0]: row[1:] for row in db.execute("SELECT relpath, file_size, mtime_ns, sidecars FROM adapters")
            }
            found = self._walk()
            work = [
                item
                for relpath, item in found.items()
                if known.get(relpath) != (item.size, item.mtime_ns, item.sidecars)
            ]
            tally = _Tally(unchanged=len(found) - len(work))
            batch: list[_Record] = []
            batch_start = time.perf_counter()
            for item in work:
                record = self._inspect_safely(item)
                if record is not None:
                    batch.append(record)
                if len(batch) >= SCAN_BATCH_FILES or time.perf_counter() - batch_start >= SCAN_BATCH_SECONDS:
                    self._write_batch(db, batch, found, tally)
                    batch, batch_start = [], time.perf_counter()
            self._write_batch(db, batch, found, tally)
            with _transaction(db):
                gone = [row for row in db.execute("SELECT id, relpath FROM adapters") if row[1] not in found]
                for row_id, _ in gone:
                    db.execute("DELETE FROM adapters WHERE id = ?", (row_id,))
                    db.execute("DELETE FROM adapters_fts WHERE rowid = ?", (row_id,))
                if gone:
                    for row_id in sorted(_assign_names(db)):
                        _index_text(db, row_id)
            broken = db.execute(
                "SELECT relpath, error FROM adapters WHERE error IS NOT NULL ORDER BY relpath"
            ).fetchall()
        return ScanReport(
            added=tuple(tally.added),
            updated=tuple(tally.updated),
            unchanged=tally.unchanged,
            removed=tuple(sorted(relpath for _, relpath in gone)),
            renamed=tuple(tally.renamed),
            broken=tuple((p, e) for p, e in broken),
            seconds=time.perf_counter() - start,
        )

    def _write_batch(
        self, db: sqlite3.Connection, records: list[_Record], found: Mapping[str, _Found], tally: _Tally
    ) -> None:
        """Write one batch of inspected files in one transaction, re-checking each row under the write lock (a
        concurrent scan may have written it meanwhile), then give the new rows their names and search text."""
        if not records:
            return
        touched: set[int] = set()
        with _transaction(db):
            for record in records:
                item = record.found
                row = db.execute(
                    "SELECT id, file_size, mtime_ns, sidecars, sha256 FROM adapters WHERE relpath = ?", (item.relpath,)
                ).fetchone()
                if row is not None and tuple(row[1:4]) == (item.size, item.mtime_ns, item.sidecars):
                    tally.unchanged += 1
                    continue
                if row is not None:
                    row_id, old_sha = row[0], row[4]
                    tally.updated.append(item.relpath)
                else:
                    moved = _moved_from(db, record.sha256, found)
                    if moved is not None:
                        row_id, old_sha = moved[0], record.sha256
                        tally.renamed.append((moved[1], item.relpath))
                    else:
                        row_id, old_sha = None, None
                        tally.added.append(item.relpath)
                touched.add(self._write(db, record, row_id, keep_scores=old_sha == record.sha256))
            touched |= _assign_names(db)
            for row_id in sorted(touched):
                _index_text(db, row_id)

    def _walk(self) -> dict[str, _Found]:
        """Every candidate file under the root (hidden folders skipped, folder symlinks not followed); stat only.

        Works on plain strings: this is the whole cost of a no-change rescan, so it stays lean. A file that
        vanishes while it is looked at is left out.
        """
        found: dict[str, _Found] = {}
        prefix = str(self.root) + os.sep
        pending = [str(self.root)]
        while pending:
            folder = pending.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError:
                continue
            by_name = {entry.name: entry for entry in entries}
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                        continue
                except OSError:
                    continue
                stem, suffix = os.path.splitext(entry.name)
                suffix = suffix.lower()
                if suffix in ADAPTER_SUFFIXES or suffix in PICKLE_SUFFIXES:
                    relpath = entry.path.removeprefix(prefix).replace(os.sep, "/")
                    try:
                        item = self._found(entry, storable_text(relpath), stem, suffix in PICKLE_SUFFIXES, by_name)
                    except FileNotFoundError:
                        continue
                    if not is_valid_unicode(relpath):
                        item = replace(item, refusal=_not_unicode(entry.path))
                    found[item.relpath] = item
        return found

    def _found(
        self, entry: os.DirEntry[str], relpath: str, stem: str, pickle: bool, siblings: Mapping[str, os.DirEntry[str]]
    ) -> _Found:
        refusal: ComposerError | None = None
        own = entry.stat(follow_symlinks=False)
        stat = own
        try:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if not _is_inside(target, self.root):
                    refusal = UnsafePathError(
                        f"symlink points outside the library (to {target}); it is not followed",
                        path=entry.path,
                        hint="copy the file into the library, or link to a file inside it",
                    )
            if refusal is None:
                stat = entry.stat(follow_symlinks=True)
                refuse_non_regular(Path(entry.path), stat)
        except FileNotFoundError as exc:
            if entry.is_symlink():
                refusal = AdapterFormatError(
                    "broken symlink: its target does not exist", path=entry.path, hint="fix or remove the link"
                )
            else:
                raise exc
        except OSError as exc:
            refusal = NonRegularFileError(
                f"symlink cannot be followed ({exc.strerror or exc}); it is not opened",
                path=entry.path,
                hint="fix or remove the link",
            )
        except NonRegularFileError as exc:
            refusal = exc
        if refusal is not None:
            stat = own
        if refusal is None and pickle:
            try:
                refuse_pickle(Path(entry.path))
            except ComposerError as exc:
                refusal = exc
        sidecars = []
        for suffix in SIDECAR_SUFFIXES:
            sibling = siblings.get(stem + suffix)
            try:
                if sibling is not None and sibling.is_file(follow_symlinks=False):
                    info = sibling.stat(follow_symlinks=False)
                    sidecars.append(f"{storable_text(sibling.name)}:{info.st_size}:{info.st_mtime_ns}")
            except FileNotFoundError:
                continue
        return _Found(
            relpath=relpath,
            path=entry.path,
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            sidecars="|".join(sidecars),
            refusal=refusal,
        )

    def _inspect_safely(self, item: _Found) -> _Record | None:
        """:meth:`_inspect` behind the per-file fault boundary: a file that vanished is left out (None); any
        error no reader anticipated is logged and recorded on the file's row as an :class:`AdapterFormatError`."""
        try:
            return self._inspect(item)
        except FileNotFoundError:
            return None
        except Exception as exc:  # the fault boundary: one file never fails a scan
            _log.exception("unexpected error while indexing %s", item.path)
            error = AdapterFormatError(f"the file could not be read ({type(exc).__name__})", path=item.path)
            return _Record(item, None, None, AdapterMetadata(), {}, error)

    def _inspect(self, item: _Found) -> _Record:
        """Probe (header only), then hash, and gather metadata for a new or changed file; errors are recorded.

        The header is checked first, so a large file that is not an adapter is never read whole.
        """
        path = Path(item.path)
        sha256: str | None = None
        header: reader.AdapterHeader | None = None
        error: BaseException | None = item.refusal
        header_metadata: dict[str, str] = {}
        if error is None:
            if not path.exists():
                raise FileNotFoundError(item.path)
            try:
                header = reader.probe(path)
                header_metadata = header.metadata
                sha256 = file_sha256(path)
            except ComposerError as exc:  # a scan never fails on a file: every error is recorded on its row
                error = exc
                header_metadata = header.metadata if header is not None else _header_metadata_or_empty(path)
                header = None
        try:
            metadata = read_metadata(path, header_metadata, sha256=sha256, thumbnail_dir=self.thumbnail_dir)
        except SidecarTooLargeError as exc:
            metadata, error = AdapterMetadata(), error or exc
        except (OSError, ComposerError) as exc:  # e.g. the thumbnail folder is not writable
            metadata = AdapterMetadata(warnings=(f"metadata could not be read: {exc}",))
        return _Record(item, sha256, header, metadata, header_metadata, error)

    def _write(self, db: sqlite3.Connection, record: _Record, row_id: int | None, *, keep_scores: bool) -> int:
        """Insert or update one row; returns its id. Scores and vector ids are dropped when the content changed."""
        header, metadata, item = record.header, record.metadata, record.found
        family = header.family if header is not None and header.family != "unknown" else None
        stored_meta = replace(metadata, previews=tuple(self._store_path(p) for p in metadata.previews))
        shown_header = {k: _elide(k, v) for k, v in record.header_metadata.items()}
        values = {
            "relpath": item.relpath,
            "title": metadata.title or Path(item.relpath).stem,
            "format": header.format if header else None,
            "family": family or metadata.family_hint or "unknown",
            "ranks": json.dumps(list(header.ranks) if header else []),
            "rank": max(header.ranks) if header and header.ranks else None,
            "num_layers": header.num_layers if header else None,
            "has_text_encoder": int(bool(header and header.has_text_encoder)),
            "file_size": item.size,
            "mtime_ns": item.mtime_ns,
            "sidecars": item.sidecars,
            "sha256": record.sha256,
            "metadata": json.dumps(stored_meta.to_json(), ensure_ascii=False),
            "header_metadata": json.dumps(shown_header, ensure_ascii=False),
            "preview": stored_meta.previews[0] if stored_meta.previews else None,
            "error": None if record.error is None else str(record.error),
            "error_type": None if record.error is None else type(record.error).__name__,
            "scanned_at": time.time(),
        }
        values = {column: storable_text(v) if isinstance(v, str) else v for column, v in values.items()}
        if row_id is None:
            values["name"] = f"//pending/{item.relpath}"
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cursor = db.execute(f"INSERT INTO adapters ({columns}) VALUES ({marks})", tuple(values.values()))
            return int(cursor.lastrowid or 0)
        if not keep_scores:
            values["scores"] = "{}"
            values["vector_id"] = None
        assignments = ", ".join(f"{column} = ?" for column in values)
        db.execute(f"UPDATE adapters SET {assignments} WHERE id = ?", (*values.values(), row_id))
        return row_id

    def _store_path(self, path: str) -> str:
        """Paths inside the library are stored relative to it, so a moved library keeps working."""
        absolute = Path(path)
        return absolute.relative_to(self.root).as_posix() if _is_inside(absolute, self.root) else str(absolute)

    # ------------------------------------------------------------------------------------------------ queries
    def entries(self, family: str | None = None) -> list[CatalogEntry]:
        """Every catalogued file (broken ones too), by name; only ``family`` ones when given."""
        with self._connect() as db:
            if family is None:
                rows = db.execute(f"SELECT {_ROW_COLUMNS} FROM adapters ORDER BY name").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_ROW_COLUMNS} FROM adapters WHERE family = ? ORDER BY name", (family,)
                ).fetchall()
        return [self._entry(row) for row in rows]

    def get(self, name_or_id: str | int) -> CatalogEntry:
        """The entry with this id, name, relative path, or (when unambiguous) case-insensitive name or title."""
        key = str(name_or_id)
        clauses = ["name = ?", "relpath = ?", "lower(name) = lower(?)", "lower(title) = lower(?)"]
        if isinstance(name_or_id, int) or key.isdigit():
            clauses.insert(0 if isinstance(name_or_id, int) else 2, "id = ?")
        with self._connect() as db:
            for clause in clauses:
                rows = db.execute(f"SELECT {_ROW_COLUMNS} FROM adapters WHERE {clause} LIMIT 2", (key,)).fetchall()
                if len(rows) == 1:
                    return self._entry(rows[0])
            names = [row[0] for row in db.execute("SELECT name FROM adapters")]
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `compose index DIR` to list the library"
        raise UnknownAdapterError(f"no adapter named {key!r} in the library {self.root}", hint=hint)

    def search(self, text: str, limit: int = 20, *, include_broken: bool = False) -> list[SearchHit]:
        """Full-text search (any word matches; ranked by FTS5 bm25, trigger words weigh most), best first.

        Entries in error are left out unless ``include_broken``.
        """
        tokens = list(dict.fromkeys(_TOKEN.findall(text.lower())))
        if not tokens or limit <= 0:
            return []
        query = " OR ".join(f'"{token}"' for token in tokens)
        weights = ", ".join(str(w) for w in _FTS_WEIGHTS)
        columns = ", ".join(f"a.{c.strip()}" for c in _ROW_COLUMNS.split(","))
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {columns}, bm25(adapters_fts, {weights}) AS relevance FROM adapters_fts "
                "JOIN adapters a ON a.id = adapters_fts.rowid WHERE adapters_fts MATCH ? "
                f"{'' if include_broken else 'AND a.error IS NULL '}"
                "ORDER BY relevance LIMIT ?",
                (query, limit),
            ).fetchall()
        return [SearchHit(self._entry(row[:-1]), -float(row[-1])) for row in rows]

    def resolve(self, name: str | int) -> Path:
        """The real path of an adapter, checked (again, at use time) to lie inside the library."""
        entry = self.get(name)
        real = Path(os.path.realpath(entry.path))  # never fails, even on a symlink loop
        if not _is_inside(real, self.root):
            raise UnsafePathError(
                f"adapter {entry.name!r} resolves to {real}, outside the library",
                path=entry.path,
                hint="copy the file into the library, or link to a file inside it",
            )
        return real

    def read(
        self,
        name: str | int,
        *,
        allow_non_finite: bool = False,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> Adapter:
        """Load an adapter's tensors into a :class:`fusion.adapters.Adapter` (named after its catalog name).

        ``shapes`` (a pipeline's ``model_shapes()``) reads it for that model (see
        :func:`weights_index.reader.read_adapter`).

        What the catalog knows travels along in ``Adapter.meta``: ``category`` (Switch and CMLoRA order by it),
        ``scores`` (e.g. CMLoRA's ``delta_h``), ``trigger_words``, ``title`` and ``preferred_weight``.
        """
        entry = self.get(name)
        path = self.resolve(entry.id)
        family = entry.family if entry.family in ALL_FAMILIES else None
        adapter = reader.read_adapter(path, family, name=entry.name, allow_non_finite=allow_non_finite, shapes=shapes)
        known = {
            "category": entry.metadata.category,
            "scores": dict(entry.scores),
            "trigger_words": list(entry.trigger_words),
            "title": entry.title,
            "preferred_weight": entry.metadata.preferred_weight,
        }
        adapter.meta.update({key: value for key, value in known.items() if value not in (None, {}, [], "")})
        return adapter

    def update_scores(self, name_or_id: str | int, scores: Mapping[str, Any]) -> None:
        """Merge per-adapter scores (e.g. a frequency score) into the entry; kept until the file's content changes."""
        entry = self.get(name_or_id)
        merged = {**entry.scores, **scores}
        with self._connect() as db, _transaction(db):
            db.execute("UPDATE adapters SET scores = ? WHERE id = ?", (json.dumps(merged), entry.id))

    def set_vector_id(self, name_or_id: str | int, vector_id: int | None) -> None:
        """Record the id of the adapter's vector in the vector store; cleared when the file's content changes."""
        entry = self.get(name_or_id)
        with self._connect() as db, _transaction(db):
            db.execute("UPDATE adapters SET vector_id = ? WHERE id = ?", (vector_id, entry.id))

    def _entry(self, row: tuple[Any, ...]) -> CatalogEntry:
        (row_id, name, relpath, title, fmt, family, ranks, _rank, num_layers, has_te, size, mtime_ns) = row[:12]
        sha256, metadata, header_metadata, preview, error, error_type, scores, vector_id = row[12:]
        meta = AdapterMetadata.from_json(json.loads(metadata))
        meta = replace(meta, previews=tuple(str(self.root / p) for p in meta.previews))
        return CatalogEntry(
            id=row_id,
            name=name,
            relpath=relpath,
            path=self.root / relpath,
            title=title,
            format=fmt,
            family=family,
            ranks=tuple(json.loads(ranks)),
            num_layers=num_layers,
            has_text_encoder=bool(has_te),
            file_size=size,
            mtime_ns=mtime_ns,
            sha256=sha256,
            metadata=meta,
            header_metadata=json.loads(header_metadata),
            preview=None if preview is None else self.root / preview,
            error=error,
            error_type=error_type,
            scores=json.loads(scores),
            vector_id=vector_id,
        )


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
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


def _schema_version(db: sqlite3.Connection) -> int | None:
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'catalog_info'").fetchone() is None:
        return None
    row = db.execute("SELECT value FROM catalog_info WHERE key = 'schema'").fetchone()
    return int(row[0]) if row else None


def _assign_names(db: sqlite3.Connection) -> set[int]:
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


def _index_text(db: sqlite3.Connection, row_id: int) -> None:
    """Refresh the full-text row of one adapter from its catalog row."""
    name, title, metadata = db.execute("SELECT name, title, metadata FROM adapters WHERE id = ?", (row_id,)).fetchone()
    meta = AdapterMetadata.from_json(json.loads(metadata))
    tags = [*meta.labels, *([meta.category] if meta.category else []), *list(meta.tags)[:_FTS_CAPTION_TAGS]]
    db.execute("DELETE FROM adapters_fts WHERE rowid = ?", (row_id,))
    db.execute(
        "INSERT INTO adapters_fts (rowid, name, title, trigger_words, tags, description) VALUES (?, ?, ?, ?, ?, ?)",
        (row_id, name, title, ", ".join(meta.trigger_words), ", ".join(tags), meta.description or ""),
    )


def _moved_from(db: sqlite3.Connection, sha256: str | None, found: Mapping[str, _Found]) -> tuple[int, str] | None:
    """The (id, relpath) of a row with this content whose file is gone from the folder: the file moved here."""
    if not sha256:
        return None
    for row_id, relpath in db.execute("SELECT id, relpath FROM adapters WHERE sha256 = ? ORDER BY relpath", (sha256,)):
        if relpath not in found:
            return row_id, relpath
    return None


def _not_unicode(path: str) -> UnsafePathError:
    return UnsafePathError(
        "the file name is not valid UTF-8; it is listed with the odd bytes replaced by '?' and never read",
        path=storable_text(path),
        hint="rename the file",
    )


def _header_metadata_or_empty(path: Path) -> dict[str, str]:
    """The header's metadata of a file that failed to probe (a bad layout can still carry a title)."""
    try:
        return read_header(path).metadata
    except ComposerError:
        return {}


def _elide(key: str, value: str) -> str:
    """Header values kept in the catalog: embedded images and huge values (already parsed) are summarised."""
    if key == "modelspec.thumbnail":
        return "<embedded image>"
    if len(value) > MAX_HEADER_VALUE_CHARS:
        return f"<{len(value)} characters, not stored>"
    return value


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)
