"""One scan of a library folder into its catalog: incremental, batched, and never failed by a file.

Files whose (size, mtime_ns) and sidecar signature are unchanged are skipped without opening them; new or changed
files are probed (safetensors header only, never tensor data), hashed (SHA-256) once their header is sound, and their
metadata merged from the header and sidecars. A file moved or renamed inside the library (same SHA-256, old path
gone) keeps its row id, so anything keyed by id (vectors, scores) survives. Files are read outside any lock and
written in batches (:data:`SCAN_BATCH_FILES` files or :data:`SCAN_BATCH_SECONDS` of reading, whichever comes
first), one SQLite transaction each, rows of deleted files last: a scan killed at any point leaves a consistent
catalog that keeps every batch already written.

Each file passes a fault boundary: nothing a file contains (or how it vanishes mid-scan) can fail a scan. Broken
files, pickle checkpoints (refused, never opened), non-regular files (FIFOs, sockets, symlink loops: never opened),
names that are not UTF-8, oversized sidecars, and symlinks that leave the library (refused, never followed) are
recorded with their typed error and listed like any other entry.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fusion.errors import AdapterFormatError, ComposerError, SidecarTooLargeError
from weights_index import reader
from weights_index.catalog_db import assign_names, drop_row, index_text, transaction
from weights_index.hashing import file_sha256
from weights_index.library_walk import FoundFile, is_inside, walk
from weights_index.metadata import AdapterMetadata, read_metadata
from weights_index.safetensors_file import read_header
from weights_index.text_safety import storable_text

SCAN_BATCH_FILES = 64
"""New or changed files written per scan transaction."""
SCAN_BATCH_SECONDS = 2.0
"""Reading time after which the files read so far are written, even when fewer than a batch."""
MAX_HEADER_VALUE_CHARS = 16_384
"""Longer header values (big tag-frequency tables, bucket info) are parsed into metadata but not stored raw."""

_log = logging.getLogger(__name__)


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
class ScannedFile:
    """Everything a scan learned about one new or changed file, ready to be written."""

    found: FoundFile
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


class Scan:
    """Brings the catalog database of the library at ``root`` up to date; see the module docstring.

    Embedded thumbnails are written to ``thumbnail_dir``.
    """

    def __init__(self, root: Path, thumbnail_dir: Path) -> None:
        self.root = root
        self.thumbnail_dir = thumbnail_dir

    def run(self, db: sqlite3.Connection) -> ScanReport:
        """Scan the folder into ``db`` in batches and report what changed."""
        start = time.perf_counter()
        known = {row[0]: row[1:] for row in db.execute("SELECT relpath, file_size, mtime_ns, sidecars FROM adapters")}
        found = walk(self.root)
        work = [
            item for relpath, item in found.items() if known.get(relpath) != (item.size, item.mtime_ns, item.sidecars)
        ]
        tally = _Tally(unchanged=len(found) - len(work))
        batch: list[ScannedFile] = []
        batch_start = time.perf_counter()
        for item in work:
            record = self._inspect_safely(item)
            if record is not None:
                batch.append(record)
            if len(batch) >= SCAN_BATCH_FILES or time.perf_counter() - batch_start >= SCAN_BATCH_SECONDS:
                self._write_batch(db, batch, found, tally)
                batch, batch_start = [], time.perf_counter()
        self._write_batch(db, batch, found, tally)
        with transaction(db):
            gone = [row for row in db.execute("SELECT id, relpath FROM adapters") if row[1] not in found]
            for row_id, _ in gone:
                drop_row(db, row_id)
            if gone:
                for row_id in sorted(assign_names(db)):
                    index_text(db, row_id)
        broken = db.execute("SELECT relpath, error FROM adapters WHERE error IS NOT NULL ORDER BY relpath").fetchall()
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
        self, db: sqlite3.Connection, records: list[ScannedFile], found: Mapping[str, FoundFile], tally: _Tally
    ) -> None:
        """Write one batch of inspected files in one transaction, re-checking each row under the write lock (a
        concurrent scan may have written it meanwhile), then give the new rows their names and search text."""
        if not records:
            return
        touched: set[int] = set()
        with transaction(db):
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
                touched.add(self.write(db, record, row_id, keep_scores=old_sha == record.sha256))
            touched |= assign_names(db)
            for row_id in sorted(touched):
                index_text(db, row_id)

    def _inspect_safely(self, item: FoundFile) -> ScannedFile | None:
        """:meth:`inspect` behind the per-file fault boundary: a file that vanished is left out (None); any
        error no reader anticipated is logged and recorded on the file's row as an :class:`AdapterFormatError`."""
        try:
            return self.inspect(item)
        except FileNotFoundError:
            return None
        except Exception as exc:  # the fault boundary: one file never fails a scan
            _log.exception("unexpected error while indexing %s", item.path)
            error = AdapterFormatError(f"the file could not be read ({type(exc).__name__})", path=item.path)
            return ScannedFile(item, None, None, AdapterMetadata(), {}, error)

    def inspect(self, item: FoundFile) -> ScannedFile:
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
        return ScannedFile(item, sha256, header, metadata, header_metadata, error)

    def write(self, db: sqlite3.Connection, record: ScannedFile, row_id: int | None, *, keep_scores: bool) -> int:
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
        return absolute.relative_to(self.root).as_posix() if is_inside(absolute, self.root) else str(absolute)


def _moved_from(db: sqlite3.Connection, sha256: str | None, found: Mapping[str, FoundFile]) -> tuple[int, str] | None:
    """The (id, relpath) of a row with this content whose file is gone from the folder: the file moved here."""
    if not sha256:
        return None
    for row_id, relpath in db.execute("SELECT id, relpath FROM adapters WHERE sha256 = ? ORDER BY relpath", (sha256,)):
        if relpath not in found:
            return row_id, relpath
    return None


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
