"""No-reference technical quality (seed 000: "Remove low-quality images"), needing no weights: four measured
defects, each mapped to [0, 1] (1 = no defect), and their product x 10 as the score (0-10).

    sharpness   std of the Laplacian over std of the image (contrast-free), at <= 256 px: blur lowers it
    noise       sigma of the noise, MAD estimate on the 3x3 high-pass mask of Immerkaer ("Fast noise variance
                estimation", CVIU 1996) at <= 1024 px: median(|I * M|) / 0.6745 / 6 (M's norm is 6; the median
                ignores the edges the mean of Immerkaer's estimator counts as noise)
    blockiness  JPEG's 8x8 grid at native resolution: mean |step| across block boundaries / within blocks
                (1 without compression artefacts; ~2.5 at JPEG quality 10)
    exposure    fraction of clipped pixels (<= 3 or >= 252) and how far the mean luminance is from mid-grey

The mappings were set on the MATE / GNOME photographs, blurred, noised, JPEG-compressed and darkened by known
amounts, and measured on other photographs (benchmarks/bench_technical.py; RESULTS.md "Curation"); they are
heuristics, not a learned perceptual model. Smooth images (gradients, flat abstract wallpapers) read as
blurred, and cut-outs on white as over-exposed (their background is clipped)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def _gray(im: Image.Image, side: int | None) -> np.ndarray:
    g = im.convert("L")
    if side:
        g.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(g, dtype=np.float64)


def _highpass(a: np.ndarray) -> np.ndarray:
    """Immerkaer's mask [[1,-2,1],[-2,4,-2],[1,-2,1]] (the difference of two Laplacians): zero on planes."""
    return (a[:-2, :-2] - 2 * a[:-2, 1:-1] + a[:-2, 2:] - 2 * a[1:-1, :-2] + 4 * a[1:-1, 1:-1] - 2 * a[1:-1, 2:]
            + a[2:, :-2] - 2 * a[2:, 1:-1] + a[2:, 2:])


def _blockiness(a: np.ndarray) -> float:
    dx, dy = np.abs(np.diff(a, axis=1)), np.abs(np.diff(a, axis=0))
    if dx.shape[1] < 16 or dy.shape[0] < 16:
        return 1.0
    across = dx[:, 7::8].mean() + dy[7::8, :].mean()  # steps from column / row 8k-1 to 8k
    within = np.delete(dx, np.s_[7::8], axis=1).mean() + np.delete(dy, np.s_[7::8], axis=0).mean()
    return float(across / within) if within > 0 else 1.0


def measure(im: Image.Image) -> dict[str, float]:
    """The raw defect measurements."""
    small = _gray(im, 256)
    lap = -4 * small[1:-1, 1:-1] + small[:-2, 1:-1] + small[2:, 1:-1] + small[1:-1, :-2] + small[1:-1, 2:]
    mid = _gray(im, 1024)
    return {"sharpness": float(lap.std() / (small.std() + 1e-6)) if lap.size else 0.0,
            "noise_sigma": float(np.median(np.abs(_highpass(mid))) / 0.6745 / 6) if min(mid.shape) > 2 else 0.0,
            "blockiness": _blockiness(_gray(im, None)),
            "clipped": float(((small <= 3) | (small >= 252)).mean()),
            "mean_luma": float(small.mean())}


def component_scores(m: dict[str, float]) -> dict[str, float]:
    """Each defect as a [0, 1] score (1 = none)."""
    return {"sharp": 1 - np.exp(-(m["sharpness"] / 0.15) ** 2),
            "clean": 1 / (1 + (m["noise_sigma"] / 8) ** 2),
            "unblocked": 1 / (1 + (max(0.0, m["blockiness"] - 1.05) / 0.4) ** 2),
            "exposed": (1 - m["clipped"]) * min(1.0, 4 * min(m["mean_luma"], 255 - m["mean_luma"]) / 255)}


def technical_score(im: Image.Image) -> dict[str, float]:
    """{"score": 0-10 (product of the components x 10), the components, the measurements}."""
    m = measure(im)
    parts = component_scores(m)
    score = 10 * float(np.prod(list(parts.values())))  # a product: one severe defect sinks the score
    return {"score": round(score, 3), **{k: round(float(v), 4) for k, v in {**parts, **m}.items()}}


class TechnicalQuality:
    """`data prepare` scorer `technical`: images scoring below `min_score` (0-10) are rejected."""

    name = "technical"
    reject_above = None

    def __init__(self, min_score: float | None = None):
        self.reject_below = min_score

    def score(self, im: Image.Image, caption: str) -> dict[str, float]:
        return technical_score(im)


def technical(min_score: str | None = None) -> TechnicalQuality:
    """Scorer factory, registered as `technical`: `--scorer 'technical?min_score=4'`."""
    return TechnicalQuality(float(min_score) if min_score is not None else None)
