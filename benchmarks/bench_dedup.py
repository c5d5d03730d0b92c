"""Near-duplicate search at scale (issue 25): multi-index hashing vs the linear scan on 64-bit pHashes, and
SemDeDup vs all-pairs cosine on embeddings, at 10^5 and 10^6 items (synthetic: random hashes / unit vectors
with planted near-duplicates, 1% of the items).

    .venv/bin/python benchmarks/bench_dedup.py [--sizes 100000 1000000] [--queries 2000] [--radius 6]
                                               [--dim 64] [--engine local|ray] [--json OUT]

Hashes: index build time (bulk) and one-at-a-time growth (as `data prepare` does), seconds per query for the
index and for the scan on the same queries (half planted near-duplicates within the radius, half random), and
recall of the index against the scan (exact by construction: 1.0 is the expected value, measured anyway).
Embeddings: SemDeDup time (k-means + per-cluster comparison; k = N / 1000), and its recall / precision against
the exact answer (an earlier item with cosine > threshold) on a random sample of queries; the all-pairs time is
extrapolated from the sample's (each query against every item)."""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def planted_hashes(n: int, queries: int, radius: int, rng) -> tuple[np.ndarray, np.ndarray]:
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, n, dtype=np.uint64)
    near = hashes[rng.integers(0, n, queries // 2)].copy()
    for k in range(len(near)):
        for b in rng.choice(64, int(rng.integers(0, radius + 1)), replace=False):
            near[k] ^= np.uint64(1) << np.uint64(int(b))
    return hashes, np.concatenate([near, rng.integers(0, 2**63, queries - len(near), dtype=np.uint64)])


def bench_hashes(n: int, queries: int, radius: int, seed: int) -> dict:
    from tessera.data.dedup import HashIndex, exact_nearest

    rng = np.random.default_rng(seed)
    hashes, qs = planted_hashes(n, queries, radius, rng)
    t = time.perf_counter()
    index = HashIndex(radius, hashes)
    build = time.perf_counter() - t
    grow_n = min(n, 100_000)
    t = time.perf_counter()
    grown = HashIndex(radius)
    for h in hashes[:grow_n]:
        grown.add(int(h))
    grow = (time.perf_counter() - t) / grow_n
    t = time.perf_counter()
    got = [index.nearest(int(q)) for q in qs]
    t_index = (time.perf_counter() - t) / len(qs)
    t = time.perf_counter()
    want = [exact_nearest(hashes, int(q), radius) for q in qs]
    t_scan = (time.perf_counter() - t) / len(qs)
    found = [w is not None for w in want]
    agree = sum(g is not None and g[1] == w[1] for g, w in zip(got, want) if w is not None)
    false = sum(g is not None for g, w in zip(got, want) if w is None)
    return {"kind": "phash", "n": n, "radius": radius, "chunks": index.chunks, "queries": len(qs),
            "build_s": round(build, 3), "add_us": round(grow * 1e6, 1), "query_ms": round(t_index * 1e3, 3),
            "scan_ms": round(t_scan * 1e3, 3), "speedup": round(t_scan / t_index, 1),
            "with_neighbour": sum(found), "recall": agree / max(1, sum(found)), "false_positives": false}


def planted_embeddings(n: int, dim: int, rng) -> np.ndarray:
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    dups = n // 100
    src, dst = rng.choice(n, dups, replace=False), rng.choice(n, dups, replace=False)
    emb[dst] = emb[src] + 0.1 * rng.standard_normal((dups, dim), dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def bench_embeddings(n: int, queries: int, dim: int, threshold: float, engine: str, seed: int) -> dict:
    from tessera.data.dedup import exact_duplicates, semdedup

    rng = np.random.default_rng(seed)
    emb = planted_embeddings(n, dim, rng)
    t = time.perf_counter()
    dup_of, _ = semdedup(emb, threshold, seed=seed, engine=engine)
    t_sem = time.perf_counter() - t
    sample = np.sort(rng.choice(n, queries, replace=False))
    t = time.perf_counter()
    exact = exact_duplicates(emb, threshold, sample)
    t_exact = (time.perf_counter() - t) / queries * n
    flagged = dup_of[sample] >= 0
    return {"kind": "embedding", "n": n, "dim": dim, "threshold": threshold, "engine": engine,
            "clusters": max(1, round(n / 1000)), "semdedup_s": round(t_sem, 2),
            "all_pairs_s_extrapolated": round(t_exact, 1), "sample": queries,
            "duplicates_in_sample": int(exact.sum()), "flagged": int(flagged.sum()),
            "recall": float((flagged & exact).sum() / max(1, exact.sum())),
            "precision": float((flagged & exact).sum() / max(1, flagged.sum()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--radius", type=int, default=6)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        rows.append(bench_hashes(n, args.queries, args.radius, seed=n))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(bench_embeddings(n, args.queries, args.dim, args.threshold, args.engine, seed=n))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
