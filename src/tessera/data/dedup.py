"""Near-duplicate search at scale (seed 004's dataset is 500 M images): perceptual hashes indexed by
multi-index hashing, and embedding-level deduplication in the SemDeDup form.

    HashIndex        64-bit hashes, every neighbour within Hamming radius r found exactly (not approximately):
                     Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index Hashing" (CVPR 2012).
                     The hash is cut into m disjoint substrings; if H(a, b) <= r then some substring of a and b
                     differs in at most floor(r / m) bits (pigeonhole), so probing each substring's table with
                     every value within floor(r / m) of the query's substring yields a candidate set that holds
                     every neighbour; candidates are verified with a popcount.
    EmbeddingIndex   streaming cosine search over unit embeddings (exact, blocked): `data prepare`'s semantic
                     duplicate check, for one prepared folder.
    semdedup         Abbas et al., "SemDeDup" (2023): k-means the embeddings, and within each cluster mark an item
                     a duplicate when its cosine to an EARLIER item of the cluster exceeds the threshold (the
                     paper's 1 - eps). Only pairs in the same cluster are compared: O(N^2 / k) instead of O(N^2),
                     at the price of the pairs a cluster border splits (`recall` in benchmarks/bench_dedup.py).
                     engine="ray" runs the per-cluster step as a Ray Data groupby.
"""
from __future__ import annotations

import itertools
from math import comb

import numpy as np
import torch

from tessera.data.filters import hamming


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-wide value with at most `radius` bits set: the XOR probes of one substring."""
    masks = [sum(1 << i for i in c) for k in range(radius + 1) for c in itertools.combinations(range(bits), k)]
    return np.array(masks, dtype=np.uint64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[i], hi[i]) for all i, without a Python loop."""
    n = hi - lo
    total = int(n.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(n)[:-1])), n)
    return starts + np.arange(total)


def probe_cost(n: int, radius: int, chunks: int) -> float:
    """Expected work of one query: probes x (1 + expected bucket size) over all substrings."""
    bits = 64 // chunks
    probes = sum(comb(bits, k) for k in range(radius // chunks + 1))
    return chunks * probes * (1 + n / 2 ** bits)


class HashIndex:
    """An exact radius index over 64-bit hashes, growing one hash at a time (`add`) or in bulk (`extend`).
    New hashes wait in a small buffer scanned linearly; the substring tables are re-sorted when the buffer
    exceeds an eighth of the index (amortized O(log n) per insertion)."""

    def __init__(self, radius: int, hashes: np.ndarray | list[int] = (), chunks: int | None = None):
        if not 0 <= radius < 64:
            raise ValueError(f"radius must be in [0, 64), got {radius}")
        if chunks is not None and chunks not in (1, 2, 4, 8):
            raise ValueError(f"chunks must be 1, 2, 4 or 8 (64-bit hashes cut evenly), got {chunks}")
        self.radius, self.fixed_chunks = radius, chunks
        self._store = np.asarray(hashes, dtype=np.uint64).copy()  # capacity doubles as hashes are added
        self._n = len(self._store)
        self._indexed = 0
        self._rebuild()

    def __len__(self) -> int:
        return self._n

    @property
    def hashes(self) -> np.ndarray:
        return self._store[:self._n]

    def _rebuild(self) -> None:
        """One sorted table of all substrings, each tagged with its substring number above its bits
        (key = j << bits | substring j), so that one searchsorted call probes every table."""
        n = len(self.hashes)
        self.chunks = self.fixed_chunks or min((1, 2, 4, 8), key=lambda m: probe_cost(max(n, 1), self.radius, m))
        self.bits = 64 // self.chunks
        self.sub_mask = np.uint64((1 << self.bits) - 1)
        if (probes := probe_cost(0, self.radius, self.chunks)) > 1e5:
            raise ValueError(f"radius {self.radius} with {self.chunks} substring(s): {probes:.0f} probes per query; "
                             f"use more substrings (chunks=None chooses)")
        flips = _flip_masks(self.bits, self.radius // self.chunks)
        self.shifts = np.arange(self.chunks, dtype=np.uint64) * np.uint64(self.bits)  # (m,)
        # (m, P) probe masks, tagged with the substring number (no tag needed with one substring)
        tags = (np.arange(self.chunks, dtype=np.uint64) << np.uint64(self.bits)) if self.chunks > 1 else np.zeros(1, np.uint64)
        self.flips, self.tags = flips[None, :], tags[:, None]
        subs = (self.hashes[None, :] >> self.shifts[:, None]) & self.sub_mask  # (m, n) substrings
        keys = (subs | self.tags).ravel()  # (m * n,) tagged substrings
        order = np.argsort(keys, kind="stable")
        self.keys, self.rows = keys[order], (order % max(n, 1)).astype(np.int64)
        self._indexed = n

    def extend(self, hashes: np.ndarray | list[int]) -> None:
        new = np.asarray(hashes, dtype=np.uint64)
        if self._n + len(new) > len(self._store):
            grown = np.zeros(max(2 * len(self._store), self._n + len(new), 1024), dtype=np.uint64)
            grown[:self._n] = self.hashes
            self._store = grown
        self._store[self._n:self._n + len(new)] = new
        self._n += len(new)
        if self._n - self._indexed > max(1024, self._indexed // 8):
            self._rebuild()

    def add(self, h: int) -> None:
        self.extend([h])

    def candidates(self, h: int) -> np.ndarray:
        """Indices (unordered, possibly repeated) of the hashes sharing a substring within floor(r / m) bits
        of h's: a superset of h's neighbours; the unindexed buffer is included whole."""
        q = np.uint64(h)
        probes = ((((q >> self.shifts) & self.sub_mask)[:, None] ^ self.flips) | self.tags).ravel()  # (m * P,)
        lo = np.searchsorted(self.keys, probes, "left")
        hi = np.searchsorted(self.keys, probes, "right")
        return np.concatenate([self.rows[_ranges(lo, hi)], np.arange(self._indexed, self._n)])

    def nearest(self, h: int) -> tuple[int, int] | None:
        """(index, distance) of the closest hash within the radius (the earliest on ties), or None."""
        cand = self.candidates(h)
        if cand.size == 0:
            return None
        d = hamming(self.hashes[cand], h)
        best = int(d.min())
        return (int(cand[d == best].min()), best) if best <= self.radius else None

    def within(self, h: int) -> np.ndarray:
        """Every index within the radius of h, ascending."""
        cand = self.candidates(h)
        return np.unique(cand[hamming(self.hashes[cand], h) <= self.radius])


def exact_nearest(hashes: np.ndarray, h: int, radius: int) -> tuple[int, int] | None:
    """The linear scan HashIndex replaces (its reference in tests and benchmarks)."""
    if len(hashes) == 0:
        return None
    d = hamming(hashes, h)
    i = int(d.argmin())
    return (i, int(d[i])) if d[i] <= radius else None


class EmbeddingIndex:
    """Streaming near-duplicate search on unit embeddings: the kept item with the highest cosine."""

    def __init__(self, dim: int, threshold: float):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
        self.threshold, self.n = threshold, 0
        self.store = np.zeros((1024, dim), dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def nearest(self, e: np.ndarray) -> tuple[int, float] | None:
        """(index, cosine) of the most similar kept embedding when it reaches the threshold, else None."""
        if self.n == 0:
            return None
        sims = self.store[:self.n] @ np.asarray(e, dtype=np.float32)  # (n,) cosines of unit vectors
        i = int(sims.argmax())
        return (i, float(sims[i])) if sims[i] >= self.threshold else None

    def add(self, e: np.ndarray) -> None:
        if self.n == len(self.store):
            self.store = np.concatenate([self.store, np.zeros_like(self.store)])
        self.store[self.n] = e
        self.n += 1


def kmeans(x: torch.Tensor, k: int, iters: int = 10, sample: int = 100_000, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine; Lloyd's iterations on a random sample of at most `sample` rows) -> (k, D)
    unit centroids. Empty clusters are re-seeded from random rows."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    pts = x[torch.randperm(n, generator=g)[:min(n, sample)]]
    cent = pts[torch.randperm(pts.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (pts @ cent.T).argmax(1)  # (S,) nearest centroid by cosine
        sums = torch.zeros_like(cent).index_add_(0, assign, pts)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        sums[empty] = pts[torch.randint(0, pts.shape[0], (int(empty.sum()),), generator=g)]
        cent = torch.nn.functional.normalize(sums, dim=1)
    return cent


def assign_clusters(x: torch.Tensor, cent: torch.Tensor, block: int = 65536) -> torch.Tensor:
    return torch.cat([(x[s:s + block] @ cent.T).argmax(1) for s in range(0, x.shape[0], block)])


def cluster_duplicates(ids: np.ndarray, emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One cluster's SemDeDup step. ids (n,) ascending input positions, emb (n, D) unit rows -> (dup_of (n,) the
    most similar earlier member's id or -1, its cosine (n,))."""
    e = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    sim = (e @ e.T).tril(-1)  # (n, n): cosine to each EARLIER member; zero on and above the diagonal
    if len(ids) < 2:
        return np.full(len(ids), -1), np.zeros(len(ids), dtype=np.float32)
    best, arg = sim[1:].max(1)  # row 0 has no earlier member
    best = torch.cat([torch.zeros(1), best]).numpy()
    arg = np.concatenate([[0], arg.numpy()])
    dup_of = np.where(best > threshold, ids[arg], -1)
    return dup_of, best.astype(np.float32)


def semdedup(emb: np.ndarray, threshold: float, clusters: int | None = None, seed: int = 0,
             engine: str = "local") -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup over unit embeddings (N, D) -> (dup_of (N,): the earlier item it duplicates or -1 (kept), cosine
    to that item (N,)). clusters: k-means k (default ~N/1000, so each cluster's similarity matrix stays small)."""
    n = emb.shape[0]
    k = max(1, min(n, clusters or round(n / 1000)))
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    assign = assign_clusters(x, kmeans(x, k, seed=seed)).numpy()
    if engine == "ray":
        return _semdedup_ray(emb, assign, threshold)
    if engine != "local":
        raise ValueError(f"engine={engine!r}: must be 'local' or 'ray'")
    dup_of, cos = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
    order = np.argsort(assign, kind="stable")  # members of each cluster together, in input order
    bounds = np.searchsorted(assign[order], np.arange(k + 1))
    for c in range(k):
        ids = order[bounds[c]:bounds[c + 1]]
        dup_of[ids], cos[ids] = cluster_duplicates(ids, emb[ids], threshold)
    return dup_of, cos


def _semdedup_ray(emb: np.ndarray, assign: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The per-cluster step as a Ray Data groupby(cluster).map_groups (each group one cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def dedup_group(batch: dict) -> dict:
        order = np.argsort(batch["id"])
        ids, e = batch["id"][order], np.stack(batch["emb"][order])
        dup_of, cos = cluster_duplicates(ids, e, threshold)
        return {"id": ids, "dup_of": dup_of, "cos": cos}

    ds = ray.data.from_items([{"id": i, "cluster": int(c), "emb": emb[i]} for i, c in enumerate(assign)])
    out = ds.groupby("cluster").map_groups(dedup_group, batch_format="numpy").to_pandas()
    n = emb.shape[0]
    dup_of, cos = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
    dup_of[out["id"].to_numpy()] = out["dup_of"].to_numpy()
    cos[out["id"].to_numpy()] = out["cos"].to_numpy()
    return dup_of, cos


def exact_duplicates(emb: np.ndarray, threshold: float, queries: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each query position i: whether some EARLIER item has cosine > threshold (the all-pairs answer
    semdedup approximates; its recall reference)."""
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    pos = torch.arange(x.shape[0])
    out = np.zeros(len(queries), dtype=bool)
    for s in range(0, len(queries), block):
        q = torch.as_tensor(queries[s:s + block])
        sim = x[q] @ x.T  # (b, N)
        sim[pos[None, :] >= q[:, None]] = -2  # only earlier items count
        out[s:s + block] = (sim.max(1).values > threshold).numpy()
    return out
