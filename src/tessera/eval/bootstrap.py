"""Bootstrap confidence intervals for the gate (seed 004's evaluation gate, with statistics): how much worse a
candidate is than the deployed model, with the noise of a finite held-out set.

Both models draw one image per held-out caption, the same captions in the same order, so the comparison is
PAIRED: a bootstrap replicate draws caption indices with replacement (Efron & Tibshirani 1993, ch. 6) and
recomputes every metric for both models on the SAME draw; the 2.5 / 97.5 percentiles of the difference are
its 95% interval (the percentile method). The real images' features stay fixed (the reference set both are
measured against).

The Fréchet distance of each replicate is computed in the sample space, not the 1024-d feature space: with
centred features A [n, d] and B [m, d] (S_a = A^T A / (n - 1), S_b likewise), the non-zero eigenvalues of
S_a S_b are the squared singular values of A B^T / sqrt((n - 1)(m - 1)), so

    tr sqrt(S_a S_b) = ||A B^T||_* / sqrt((n - 1)(m - 1))       (nuclear norm: the sum of singular values)

an n x m SVD per replicate instead of a d x d matrix square root (equal to eval/frechet.py's value).

KID's kernel matrices (candidate-candidate, candidate-real) are computed once; a replicate's unbiased MMD^2
averages the within-sample kernel over the pairs of DISTINCT captions of its draw (a caption drawn twice is
not its own pair), so the identity draw gives eval/frechet.py's full-set KID.
"""
from __future__ import annotations

import numpy as np

SCORES_FILE = "scores.npz"  # beside a samples folder's images: per-image features and alignment scores


def frechet_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """FD between the Gaussians fitted to features x [n, d] and y [m, d] (the nuclear-norm form above)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    a, b = x - mx, y - my  # centred, (n, d) and (m, d)
    n, m = len(x), len(y)
    tr_a, tr_b = (a * a).sum() / (n - 1), (b * b).sum() / (m - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()  # (n, m) -> its singular values
    return float(((mx - my) ** 2).sum() + tr_a + tr_b - 2 * nuclear / np.sqrt((n - 1) * (m - 1)))


def paired_intervals(candidate: dict, deployed: dict, real: np.ndarray, directions: dict[str, int],
                     replicates: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """95% (`level`) percentile intervals of worse_by = direction * (deployed - candidate) per metric, over
    paired bootstrap replicates. `candidate` / `deployed`: {"feats": [n, d], "clipscore": [n], "hit": [n]}
    (one row per caption, the same captions in both); `real`: the real images' features [r, d]."""
    n = len(candidate["feats"])
    for key in ("feats", "clipscore", "hit"):
        if len(candidate[key]) != n or len(deployed[key]) != n:
            raise ValueError(f"paired bootstrap: {key} has {len(candidate[key])} candidate and {len(deployed[key])} "
                             f"deployed rows, expected {n} (the same captions)")
    rng = np.random.default_rng(seed)
    kernels = {"candidate": _KID(candidate["feats"], real), "deployed": _KID(deployed["feats"], real)}
    diffs: dict[str, list[float]] = {"fd": [], "kid": [], "clipscore": [], "r_precision": []}
    for _ in range(replicates):
        idx = rng.integers(0, n, n)  # one draw of captions, shared by both models
        value = {}
        for name, s in (("candidate", candidate), ("deployed", deployed)):
            value[name] = {"fd": frechet_from_features(s["feats"][idx], real), "kid": kernels[name](idx),
                           "clipscore": float(np.mean(s["clipscore"][idx])),
                           "r_precision": float(np.mean(s["hit"][idx]))}
        for metric in diffs:
            diffs[metric].append(directions[metric] * (value["deployed"][metric] - value["candidate"][metric]))
    tail = 100 * (1 - level) / 2
    return {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in diffs.items()}


def sample_metrics(scores: dict, real: np.ndarray) -> dict[str, float]:
    """The full-set FD, KID, CLIPScore and R-precision of one model's `scores` (the identity draw)."""
    everyone = np.arange(len(scores["feats"]))
    return {"fd": frechet_from_features(scores["feats"], real), "kid": _KID(scores["feats"], real)(everyone),
            "clipscore": float(np.mean(scores["clipscore"])), "r_precision": float(np.mean(scores["hit"]))}


class _KID:
    """The unbiased polynomial-kernel MMD^2 between fake features [n, d] and the fixed real ones, per draw."""

    def __init__(self, fake: np.ndarray, real: np.ndarray):
        from tessera.eval.frechet import polynomial_kernel

        fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
        self.kff, self.kfr = polynomial_kernel(fake, fake), polynomial_kernel(fake, real)  # (n, n), (n, r)
        krr, r = polynomial_kernel(real, real), len(real)
        self.real_term = (krr.sum() - np.trace(krr)) / (r * (r - 1))

    def __call__(self, idx: np.ndarray) -> float:
        distinct = idx[:, None] != idx[None, :]  # (n, n) pairs of different captions
        kff = self.kff[np.ix_(idx, idx)]
        return float(kff[distinct].mean() + self.real_term - 2 * self.kfr[idx].mean())


def save_scores(path, feats: np.ndarray, clipscore: np.ndarray, hit: np.ndarray, prompts: list[str]) -> None:
    np.savez(path, feats=np.asarray(feats, np.float32), clipscore=np.asarray(clipscore, np.float64),
             hit=np.asarray(hit, np.float64), prompts=np.asarray(prompts, dtype=str))


def load_scores(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:  # arrays only: never a pickle
        return {k: z[k] for k in z.files}
