"""SQLite storage of the server: jobs (the queue itself), the image index and feedback. Images live on
disk under the data folder, named by their random id; they are found by id only.

Jobs go queued -> running -> succeeded | failed | cancelled. The queue is the jobs table, so a restart
loses nothing: on start, jobs left running are queued again (or failed, visibly, after `max_attempts`)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from tessera.errors import InvalidInputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    batch_key TEXT,
    paradigm TEXT NOT NULL,
    n INTEGER NOT NULL,
    api_key TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    deadline REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    batch INTEGER,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    file TEXT NOT NULL,
    format TEXT NOT NULL,
    prompt TEXT NOT NULL,
    revised_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    paradigm TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL REFERENCES images (id),
    rating INTEGER NOT NULL,
    comment TEXT NOT NULL,
    api_key TEXT,
    created REAL NOT NULL
);
"""
TERMINAL = ("succeeded", "failed", "cancelled")


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after: int):
        self.queued, self.retry_after = queued, retry_after
        super().__init__(f"the queue is full ({queued} jobs waiting); retry after {retry_after} s")


def new_id() -> str:
    return uuid.uuid4().hex


class Store:
    def __init__(self, root: str | Path, max_queue: int = 64, max_attempts: int = 2):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        for d in (self.root, self.images_dir):
            if d.exists() and not d.is_dir():
                raise InvalidInputError(f"--data-dir {root}: {d} is a file, not a folder")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.max_queue, self.max_attempts = max_queue, max_attempts
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.root / "serve.sqlite", check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InvalidInputError(f"{self.root / 'serve.sqlite'}: not a readable Tessera store ({e}); move it "
                                    f"away or serve from another --data-dir") from None

    def _q(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tx(self, fn):
        """Run fn(db) in one write transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    # -- jobs -----------------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """After a restart: jobs left running are queued again, or failed after max_attempts."""
        gave_up = json.dumps({"code": "server_restarted",
                              "message": f"the server stopped during this job {self.max_attempts} times; "
                                         "not retried again"})

        def fix(db):
            failed = db.execute(
                "UPDATE jobs SET status='failed', finished=?, error=? WHERE status='running' AND attempts>=?",
                (time.time(), gave_up, self.max_attempts)).rowcount
            requeued = db.execute("UPDATE jobs SET status='queued', started=NULL WHERE status='running'").rowcount
            return {"requeued": requeued, "failed": failed}
        return self._tx(fix)

    def add_job(self, request_json: str, batch_key: str | None, paradigm: str, n: int, deadline: float | None,
                api_key: str | None, retry_after=lambda queued: 1) -> str:
        job_id = new_id()

        def add(db):
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
            if queued >= self.max_queue:
                raise QueueFull(queued, retry_after(queued))
            db.execute("INSERT INTO jobs (id, status, request, batch_key, paradigm, n, api_key, created, deadline) "
                       "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, request_json, batch_key, paradigm, n, api_key, time.time(), deadline))
        self._tx(add)
        return job_id

    def expire_queued(self) -> int:
        """Fail the queued jobs whose deadline has passed (the gateway calls this every second, so a job
        fails at its deadline even while the worker is busy); returns how many."""
        return self._tx(lambda db: _expire(db, time.time()))

    def claim(self, max_batch: int, max_images: int) -> list[sqlite3.Row]:
        """The oldest queued job and up to max_batch - 1 later ones with its batch key (at most max_images
        images in all), marked running. Queued jobs past their deadline are failed on the way."""
        def take(db):
            now = time.time()
            _expire(db, now)
            first = db.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if first is None:
                return []
            jobs, images = [first], first["n"]
            if first["batch_key"] is not None:
                for row in db.execute("SELECT * FROM jobs WHERE status='queued' AND batch_key=? AND seq>? ORDER BY seq",
                                      (first["batch_key"], first["seq"])):
                    if len(jobs) == max_batch or images + row["n"] > max_images:
                        break
                    jobs.append(row)
                    images += row["n"]
            ids = [j["id"] for j in jobs]
            db.execute(f"UPDATE jobs SET status='running', started=?, attempts=attempts+1, batch=? "
                       f"WHERE id IN ({','.join('?' * len(ids))})", (now, len(ids), *ids))
            return [db.execute("SELECT * FROM jobs WHERE id=?", (i,)).fetchone() for i in ids]
        return self._tx(take)

    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None) -> None:
        assert status in TERMINAL
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status=?, finished=?, result=?, error=? WHERE id=? AND status NOT IN "
            "('succeeded', 'failed', 'cancelled')",
            (status, time.time(), json.dumps(result) if result is not None else None,
             json.dumps(error) if error is not None else None, job_id)))

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is not queued."""
        return self._tx(lambda db: db.execute(
            "UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status='queued'",
            (time.time(), job_id)).rowcount) == 1

    def job(self, job_id: str) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM jobs WHERE id=?", (job_id,))
        return rows[0] if rows else None

    def queued(self) -> int:
        return self._q("SELECT COUNT(*) FROM jobs WHERE status='queued'")[0][0]

    # -- images and feedback --------------------------------------------------------------------------------
    def add_images(self, rows: list[dict]) -> None:
        now = time.time()
        self._tx(lambda db: db.executemany(
            "INSERT INTO images (id, job_id, idx, file, format, prompt, revised_prompt, seed, paradigm, created) "
            "VALUES (:id, :job_id, :idx, :file, :format, :prompt, :revised_prompt, :seed, :paradigm, :created)",
            [{**r, "created": now} for r in rows]))

    def image(self, image_id: str) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM images WHERE id=?", (image_id,))
        return rows[0] if rows else None

    def add_feedback(self, image_id: str, rating: int, comment: str, api_key: str | None) -> int:
        return self._tx(lambda db: db.execute(
            "INSERT INTO feedback (image_id, rating, comment, api_key, created) VALUES (?, ?, ?, ?, ?)",
            (image_id, rating, comment, api_key, time.time())).lastrowid)

    def accepted_prompts(self, limit: int = 10000) -> list[tuple[str | None, str]]:
        """(key id, prompt) of succeeded jobs, newest first (auto-complete learns each key's own)."""
        return [(r[0], r[1]) for r in self._q(
            "SELECT j.api_key, i.prompt FROM images i JOIN jobs j ON j.id = i.job_id "
            "GROUP BY j.api_key, i.prompt ORDER BY MAX(i.created) DESC LIMIT ?", (limit,))]

    # -- metrics --------------------------------------------------------------------------------------------
    def metrics(self, window_s: float = 300.0, key_id: str | None = None) -> dict:
        """Server-wide numbers; usage by key shows the caller's own key only (`key_id`), the others summed."""
        now = time.time()
        status = {r[0]: r[1] for r in self._q("SELECT status, COUNT(*) FROM jobs GROUP BY status")}
        done = self._q("SELECT created, started, finished, n, batch FROM jobs WHERE status='succeeded' "
                       "ORDER BY finished DESC LIMIT 1000")
        recent = self._q("SELECT COUNT(*) FROM images WHERE created>?", (now - window_s,))[0][0]
        recent_jobs = self._q("SELECT COUNT(*) FROM jobs WHERE status='succeeded' AND finished>?",
                              (now - window_s,))[0][0]
        fb = self._q("SELECT f.rating, i.paradigm FROM feedback f JOIN images i ON i.id=f.image_id")
        by_rating = {str(k): sum(1 for r in fb if r[0] == k) for k in range(1, 6)}
        by_paradigm = {}
        for p in sorted({r[1] for r in fb}):
            rs = [r[0] for r in fb if r[1] == p]
            by_paradigm[p] = {"count": len(rs), "mean_rating": round(sum(rs) / len(rs), 3)}
        usage = self._q("SELECT paradigm, COUNT(*), SUM(n) FROM jobs GROUP BY paradigm")
        keys = self._q("SELECT COALESCE(api_key, 'local'), COUNT(*), SUM(n) FROM jobs GROUP BY api_key")
        return {
            "jobs": {s: status.get(s, 0) for s in ("queued", "running", *TERMINAL)},
            "queue": {"queued": status.get("queued", 0), "max": self.max_queue},
            "latency_s": _percentiles([r["finished"] - r["created"] for r in done]),
            "run_s": _percentiles([r["finished"] - r["started"] for r in done]),
            "mean_batch": round(sum(r["batch"] or 1 for r in done) / len(done), 3) if done else None,
            "throughput": {"window_s": window_s, "images": recent, "jobs": recent_jobs,
                           "images_per_min": round(recent / window_s * 60, 3)},
            "usage": {"by_paradigm": {r[0]: {"jobs": r[1], "images": r[2]} for r in usage},
                      "by_key": _own_key_usage(keys, key_id)},
            "feedback": {"count": len(fb), "mean_rating": round(sum(r[0] for r in fb) / len(fb), 3) if fb else None,
                         "by_rating": by_rating, "by_paradigm": by_paradigm},
        }


def _expire(db, now: float) -> int:
    return db.execute("UPDATE jobs SET status='failed', finished=?, error=? WHERE status='queued' AND deadline<?",
                      (now, json.dumps({"code": "deadline_exceeded", "message": "the deadline passed while queued"}),
                       now)).rowcount


def _own_key_usage(rows, key_id: str | None) -> dict:
    """{own key: usage, "other keys": summed usage} (without keys: everything is 'local')."""
    out: dict = {}
    for key, jobs, images in rows:
        name = key if key in (key_id, "local") else "other keys"
        slot = out.setdefault(name, {"jobs": 0, "images": 0})
        slot["jobs"], slot["images"] = slot["jobs"] + jobs, slot["images"] + (images or 0)
    return out


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    xs = sorted(xs)

    def q(p):
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 4)
    return {"count": len(xs), "mean": round(sum(xs) / len(xs), 4), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}
