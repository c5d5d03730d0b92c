"""Human evaluation (seeds 000 and 004): people compare two images for the same prompt side by side —
model A vs model B, or generated vs reference — on a local web page; votes go to SQLite; the report is
A's win rate with a 95% Wilson confidence interval.

    pairs    image i of folder A vs image i of folder B. Samples folders (samples.json) must hold the
             same prompt list and show the prompt; plain folders are paired by identical file names.
    sides    each pair is shown with A on a random side (position bias), recorded with the vote.
    order    the pair with the fewest votes comes next (ties broken at random).
"""
from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path

from pydantic import BaseModel

from tessera.eval.frechet import list_images
from tessera.eval.samples import SAMPLES_JSON, read_samples

SCHEMA = """CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY, pair INTEGER NOT NULL,
    a_side TEXT NOT NULL CHECK (a_side IN ('left', 'right')),
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')), voter TEXT, created REAL NOT NULL)"""


def pair_folders(a: str | Path, b: str | Path) -> list[tuple[Path, Path, str]]:
    """-> [(image of A, image of B, prompt)]; a clear error when the folders do not pair up."""
    a, b = Path(a), Path(b)
    if (a / SAMPLES_JSON).is_file() and (b / SAMPLES_JSON).is_file():
        (ra, fa), (rb, fb) = read_samples(a), read_samples(b)
        pa, pb = [r["prompt"] for r in ra["images"]], [r["prompt"] for r in rb["images"]]
        if pa != pb:
            raise ValueError(f"{a} and {b} hold different prompt lists: they cannot be compared pair by pair")
        return list(zip(fa, fb, pa))
    fa = {f.name: f for f in list_images(a)}
    fb = {f.name: f for f in list_images(b)}
    common = sorted(set(fa) & set(fb))
    if not common:
        raise ValueError(f"{a} and {b} share no image file names (plain folders pair by name)")
    return [(fa[n], fb[n], "") for n in common]


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927); (0, 1) with no votes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class VoteStore:
    def __init__(self, db: str | Path, pairs: int):
        self.db, self.pairs = str(db), pairs
        with self._connect() as con:
            con.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db, timeout=30)

    def add(self, pair: int, a_side: str, choice: str, voter: str = "") -> None:
        """`choice` is the side the person picked ('left' | 'right') or 'tie'."""
        if not 0 <= pair < self.pairs:
            raise ValueError(f"pair={pair} is not in [0, {self.pairs})")
        if a_side not in ("left", "right"):
            raise ValueError(f"a_side={a_side!r} must be 'left' or 'right'")
        if choice not in ("left", "right", "tie"):
            raise ValueError(f"choice={choice!r} must be 'left', 'right' or 'tie'")
        winner = "tie" if choice == "tie" else ("a" if choice == a_side else "b")
        with self._connect() as con:
            con.execute("INSERT INTO votes (pair, a_side, winner, voter, created) VALUES (?, ?, ?, ?, ?)",
                        (pair, a_side, winner, voter, time.time()))

    def next_pair(self, rng: random.Random) -> int:
        with self._connect() as con:
            counts = dict(con.execute("SELECT pair, COUNT(*) FROM votes GROUP BY pair"))
        fewest = min(counts.get(i, 0) for i in range(self.pairs))
        return rng.choice([i for i in range(self.pairs) if counts.get(i, 0) == fewest])

    def report(self) -> dict:
        """A's win rate (a tie counts half) with its 95% Wilson interval, and the raw counts."""
        with self._connect() as con:
            rows = dict(con.execute("SELECT winner, COUNT(*) FROM votes GROUP BY winner"))
            sides = dict(con.execute("SELECT a_side, COUNT(*) FROM votes WHERE winner='a' GROUP BY a_side"))
            voted = con.execute("SELECT COUNT(DISTINCT pair) FROM votes").fetchone()[0]
        a, b, tie = rows.get("a", 0), rows.get("b", 0), rows.get("tie", 0)
        n = a + b + tie
        lo, hi = wilson_interval(a + tie / 2, n)
        return {"votes": n, "a_wins": a, "b_wins": b, "ties": tie, "pairs": self.pairs, "pairs_voted": voted,
                "a_win_rate": (a + tie / 2) / n if n else None, "ci95": [lo, hi],
                "a_wins_when_left": sides.get("left", 0), "a_wins_when_right": sides.get("right", 0)}


class Vote(BaseModel):
    """POST /vote body (module level: FastAPI resolves the annotation by name)."""
    pair: int
    a_side: str
    choice: str
    voter: str = ""


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Tessera human evaluation</title><style>
body{{font-family:sans-serif;text-align:center;margin:2em}} img{{width:384px;height:384px;object-fit:contain;
image-rendering:pixelated;border:1px solid #ccc}} button{{font-size:1.2em;margin:.5em 1em}} td{{padding:1em}}
</style></head><body><h2>Which image fits the prompt better?</h2><p><b>{prompt}</b></p>
<table align="center"><tr><td><img src="/image/{left}/{pair}"></td><td><img src="/image/{right}/{pair}"></td></tr>
<tr><td><button onclick="vote('left')">Left</button></td><td><button onclick="vote('right')">Right</button></td>
</tr></table><button onclick="vote('tie')">Same</button><p>{votes} votes so far &middot; <a href="/results">results</a></p>
<script>function vote(c){{fetch('/vote',{{method:'POST',headers:{{'Content-Type':'application/json'}},
body:JSON.stringify({{pair:{pair},a_side:'{a_side}',choice:c}})}}).then(()=>location.reload())}}</script>
</body></html>"""


def make_app(a: str | Path, b: str | Path, db: str | Path, seed: int | None = None):
    """The FastAPI app: GET / (a pair), POST /vote, GET /image/{a|b}/{pair}, GET /results."""
    import html

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    pairs = pair_folders(a, b)
    store = VoteStore(db, len(pairs))
    rng = random.Random(seed)

    app = FastAPI(title="Tessera human evaluation")

    @app.get("/", response_class=HTMLResponse)
    def page():
        i = store.next_pair(rng)
        a_side = rng.choice(["left", "right"])
        left, right = ("a", "b") if a_side == "left" else ("b", "a")
        return PAGE.format(prompt=html.escape(pairs[i][2] or "(no prompt: pick the better image)"), left=left,
                           right=right, pair=i, a_side=a_side, votes=store.report()["votes"])

    @app.post("/vote")
    def vote(v: Vote):
        try:
            store.add(v.pair, v.a_side, v.choice, v.voter)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        return store.report()

    @app.get("/image/{side}/{pair}")
    def image(side: str, pair: int):
        if side not in ("a", "b") or not 0 <= pair < len(pairs):
            raise HTTPException(404, f"no image {side}/{pair}")
        return FileResponse(pairs[pair][0 if side == "a" else 1])

    @app.get("/results")
    def results():
        return store.report()

    return app


def check_host(host: str) -> str:
    """The voting page has no API keys, so it serves this machine only (the rule of `tessera serve`:
    beyond loopback only with keys); share it through an SSH tunnel."""
    from tessera.errors import InvalidInputError
    from tessera.serve.app import LOOPBACK

    if host not in LOOPBACK:
        raise InvalidInputError(f"--host {host}: the voting page has no API keys and serves this machine only "
                                f"({', '.join(LOOPBACK)}); share it through an SSH tunnel")
    return host


def serve_votes(app, host: str, port: int) -> None:
    from tessera.serve.app import run_server
    from tessera.serve.limits import BodyReadTimeout

    check_host(host)
    app.add_middleware(BodyReadTimeout)
    run_server(app, host, port)
