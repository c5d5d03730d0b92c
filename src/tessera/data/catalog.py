"""SQLite catalog of a prepared dataset: one row per input item, kept or rejected, with reasons."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tessera.errors import InvalidInputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id        TEXT PRIMARY KEY,   -- output key (kept) or 'rej-<chunk>-<n>' (rejected)
    source    TEXT NOT NULL,
    sha256    TEXT,
    phash     TEXT,               -- 16 hex digits
    width     INTEGER,
    height    INTEGER,
    caption   TEXT,
    verdicts  TEXT,               -- JSON: filter name -> value / verdict
    status    TEXT NOT NULL,      -- 'kept' | 'rejected'
    reason    TEXT,               -- rejection reason code
    split     TEXT,               -- 'train' | 'val' (kept only)
    shard     TEXT,
    chunk     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
CREATE TABLE IF NOT EXISTS chunks (chunk INTEGER PRIMARY KEY, shard TEXT, n_items INTEGER);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
"""


class Catalog:
    """The catalog of one prepared folder. `Catalog(path)` opens it for writing (creating it);
    `Catalog.read(data_dir)` opens an existing one read-only (every reader goes through here)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
                self.db.execute("SELECT COUNT(*) FROM images").fetchone()
            else:
                self.db = sqlite3.connect(self.path)
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InvalidInputError(f"{self.path}: not a readable catalog ({e}); prepare the data again into a "
                                    f"new folder") from None

    @classmethod
    def read(cls, data_dir: str | Path) -> "Catalog":
        path = Path(data_dir) / "catalog.sqlite"
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir}: no catalog.sqlite; run `tessera data prepare` first")
        return cls(path, readonly=True)

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def settings(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM settings"))

    def set_settings(self, values: dict[str, str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", values.items())

    def done_chunks(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT chunk FROM chunks")}

    def kept_hashes(self) -> list[tuple[str, str, str]]:
        """(id, sha256, phash hex) of every kept row, in the order they were kept."""
        return self.db.execute("SELECT id, sha256, phash FROM images WHERE status='kept' ORDER BY chunk, id").fetchall()

    def kept(self, split: str | None = None) -> list[tuple[str, str, str]]:
        """(id, shard, caption) of the kept images of `split` (all splits when None), in id order."""
        q = "SELECT id, shard, caption FROM images WHERE status='kept'" + (" AND split=?" if split else "")
        return self.db.execute(q + " ORDER BY id", (split,) if split else ()).fetchall()

    def splits(self) -> dict[str, str]:
        """Kept image id -> its split ('train' | 'val')."""
        return dict(self.db.execute("SELECT id, split FROM images WHERE status='kept'"))

    def seen_sha256(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM images WHERE sha256 IS NOT NULL")}

    def commit_chunk(self, chunk: int, shard: str | None, rows: list[dict]) -> None:
        """Record a finished chunk and all its rows in one transaction (resume unit)."""
        with self.db:
            self.db.execute("DELETE FROM images WHERE chunk=?", (chunk,))
            self.db.executemany(
                "INSERT INTO images VALUES (:id,:source,:sha256,:phash,:width,:height,:caption,"
                ":verdicts,:status,:reason,:split,:shard,:chunk)",
                [{**r, "verdicts": json.dumps(r.get("verdicts", {})), "chunk": chunk, "shard": shard} for r in rows])
            self.db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?)", (chunk, shard, len(rows)))

    def counts(self) -> dict:
        kept = self.db.execute("SELECT split, COUNT(*) FROM images WHERE status='kept' GROUP BY split").fetchall()
        rej = self.db.execute("SELECT reason, COUNT(*) FROM images WHERE status='rejected' "
                              "GROUP BY reason ORDER BY reason").fetchall()
        return {"kept": sum(n for _, n in kept), "kept_by_split": dict(kept),
                "rejected": sum(n for _, n in rej), "rejected_by_reason": dict(rej)}

    def source_pixels(self) -> dict:
        """The kept source images (a source cut into crops counts once) and their pixels at full size."""
        n, px = self.db.execute("SELECT COUNT(*), COALESCE(SUM(width * height), 0) FROM (SELECT DISTINCT sha256, "
                                "width, height FROM images WHERE status='kept')").fetchone()
        return {"kept_sources": n, "source_pixels": px}

    def rows(self, status: str | None = None) -> list[dict]:
        cur = self.db.execute("SELECT * FROM images" + (" WHERE status=?" if status else "") + " ORDER BY id",
                              (status,) if status else ())
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def decisions(self, status: str | None = None, reason: str | None = None, recaptioned: bool = False) -> list[dict]:
        """Rows as plain JSON-able dicts (verdicts parsed; a NaN score, e.g. no caption to match, as None),
        filtered by status, rejection reason, or a replaced caption."""
        out = []
        for r in self.rows(status):
            verdicts = {k: (None if v != v else v) for k, v in json.loads(r["verdicts"] or "{}").items()}
            if (reason and r["reason"] != reason) or (recaptioned and "recaptioned" not in verdicts):
                continue
            out.append({k: r[k] for k in ("id", "source", "status", "reason", "caption", "split")} | {"verdicts": verdicts})
        return out

