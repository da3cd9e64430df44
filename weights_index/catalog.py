"""The library catalog: a folder of adapter files indexed in SQLite (with FTS5 search) and kept current by scans.

:class:`Library` is the one way in: :meth:`Library.scan` brings the catalog up to date (incremental, batched, never
failed by a file: :mod:`weights_index.scan`), and the queries read it (entries, lookup by name, full-text search,
reading an adapter's tensors). The database itself is :mod:`weights_index.catalog_db`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import ComposerError, UnknownAdapterError, UnsafePathError
from weights_index import reader
from weights_index.catalog_db import connect, ensure_schema, transaction
from weights_index.catalog_entry import ROW_COLUMNS, CatalogEntry, SearchHit, entry_from_row
from weights_index.families import ALL_FAMILIES
from weights_index.library_walk import ADAPTER_SUFFIXES, is_inside
from weights_index.scan import SCAN_BATCH_FILES, SCAN_BATCH_SECONDS, Scan, ScanReport

if TYPE_CHECKING:
    from fusion.adapters import Adapter

__all__ = [
    "ADAPTER_SUFFIXES",
    "CATALOG_DIRNAME",
    "SCAN_BATCH_FILES",
    "SCAN_BATCH_SECONDS",
    "CatalogEntry",
    "Library",
    "ScanReport",
    "SearchHit",
    "UnknownAdapterError",
]

CATALOG_DIRNAME = ".lora-composer"
"""Folder inside the library holding the catalog database and extracted thumbnails (skipped by scans)."""
FTS_WEIGHTS = (4.0, 4.0, 8.0, 1.0, 0.5)
"""bm25 column weights: name, title, trigger words, tags (labels, category, caption tags), description."""
_TOKEN = re.compile(r"\w+", re.UNICODE)


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
        with connect(self.db_path) as db:
            ensure_schema(db)

    def scan(self) -> ScanReport:
        """Bring the catalog up to date with the folder, in batches (see :mod:`weights_index.scan`)."""
        with connect(self.db_path) as db:
            return Scan(self.root, self.thumbnail_dir).run(db)

    # ------------------------------------------------------------------------------------------------ queries
    def entries(self, family: str | None = None) -> list[CatalogEntry]:
        """Every catalogued file (broken ones too), by name; only ``family`` ones when given."""
        with connect(self.db_path) as db:
            if family is None:
                rows = db.execute(f"SELECT {ROW_COLUMNS} FROM adapters ORDER BY name").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {ROW_COLUMNS} FROM adapters WHERE family = ? ORDER BY name", (family,)
                ).fetchall()
        return [entry_from_row(row, self.root) for row in rows]

    def get(self, name_or_id: str | int) -> CatalogEntry:
        """The entry with this id, name, relative path, or (when unambiguous) case-insensitive name or title."""
        key = str(name_or_id)
        clauses = ["name = ?", "relpath = ?", "lower(name) = lower(?)", "lower(title) = lower(?)"]
        if isinstance(name_or_id, int) or key.isdigit():
            clauses.insert(0 if isinstance(name_or_id, int) else 2, "id = ?")
        with connect(self.db_path) as db:
            for clause in clauses:
                rows = db.execute(f"SELECT {ROW_COLUMNS} FROM adapters WHERE {clause} LIMIT 2", (key,)).fetchall()
                if len(rows) == 1:
                    return entry_from_row(rows[0], self.root)
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
        weights = ", ".join(str(w) for w in FTS_WEIGHTS)
        columns = ", ".join(f"a.{c.strip()}" for c in ROW_COLUMNS.split(","))
        with connect(self.db_path) as db:
            rows = db.execute(
                f"SELECT {columns}, bm25(adapters_fts, {weights}) AS relevance FROM adapters_fts "
                "JOIN adapters a ON a.id = adapters_fts.rowid WHERE adapters_fts MATCH ? "
                f"{'' if include_broken else 'AND a.error IS NULL '}"
                "ORDER BY relevance LIMIT ?",
                (query, limit),
            ).fetchall()
        return [SearchHit(entry_from_row(row[:-1], self.root), -float(row[-1])) for row in rows]

    def resolve(self, name: str | int) -> Path:
        """The real path of an adapter, checked (again, at use time) to lie inside the library."""
        entry = self.get(name)
        real = Path(os.path.realpath(entry.path))  # never fails, even on a symlink loop
        if not is_inside(real, self.root):
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
        with connect(self.db_path) as db, transaction(db):
            db.execute("UPDATE adapters SET scores = ? WHERE id = ?", (json.dumps(merged), entry.id))

    def set_vector_id(self, name_or_id: str | int, vector_id: int | None) -> None:
        """Record the id of the adapter's vector in the vector store; cleared when the file's content changes."""
        entry = self.get(name_or_id)
        with connect(self.db_path) as db, transaction(db):
            db.execute("UPDATE adapters SET vector_id = ? WHERE id = ?", (vector_id, entry.id))
