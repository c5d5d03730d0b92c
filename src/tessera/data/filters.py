"""Per-image quality filters and perceptual hashing (seed 000 "Remove low-quality images";
seed 004 "Filtering inappropriate images").

Each filter returns None (pass) or a rejection reason. Scorers (NSFW, aesthetic, caption-image
match) plug in through `Scorer`: later stages register them; `prepare` records every score.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from tessera.config import Config


@dataclasses.dataclass
class FilterConfig(Config):
    min_size: int = 64              # shorter side, pixels
    max_aspect: float = 3.0         # longer / shorter side
    min_std: float = 4.0            # grayscale std (0-255): below = near-constant image
    min_sharpness: float = 5.0      # variance of the Laplacian at 128 px: below = extreme blur
    phash_distance: int = 6         # Hamming distance <= this = near-duplicate of a kept image
    dedup: bool = True


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash: 8x8 lowest frequencies of the 32x32 grayscale DCT vs. their median."""
    g = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x)


def image_stats(im: Image.Image) -> dict[str, float]:
    g = im.convert("L")
    g.thumbnail((128, 128), Image.Resampling.BILINEAR)
    a = np.asarray(g, dtype=np.float64)
    lap = -4 * a[1:-1, 1:-1] + a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]
    return {"std": float(a.std()), "sharpness": float(lap.var()) if lap.size else 0.0}


def quality_reason(im: Image.Image, cfg: FilterConfig, stats: dict[str, float]) -> str | None:
    w, h = im.size
    if min(w, h) < cfg.min_size:
        return "too_small"
    if max(w, h) / min(w, h) > cfg.max_aspect:
        return "extreme_aspect"
    if stats["std"] < cfg.min_std:
        return "low_information"
    if stats["sharpness"] < cfg.min_sharpness:
        return "too_blurry"
    return None


class Scorer(Protocol):
    """Plug-in image scorer. `reject_above`/`reject_below` set which scores are rejected."""

    name: str
    reject_above: float | None
    reject_below: float | None

    def score(self, im: Image.Image, caption: str) -> float: ...


def load_scorer(spec: str) -> Scorer:
    """'package.module:factory' -> factory(); 'package.module:factory?key=value&key=value' -> factory(key='value',
    ...) (string arguments, so that the spec alone rebuilds the scorer in every worker process)."""
    if ":" not in spec:
        raise ValueError(f"scorer {spec!r} must be 'module:factory' or 'module:factory?key=value&...'")
    module, rest = spec.split(":", 1)
    name, _, query = rest.partition("?")
    kwargs = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"scorer {spec!r}: argument {part!r} must be key=value")
        kwargs[key] = value
    factory: Callable[..., Scorer] = getattr(importlib.import_module(module), name)
    return factory(**kwargs)


def score_reason(scores: dict[str, float], scorers: list[Scorer]) -> str | None:
    for s in scorers:
        v = scores[s.name]
        if s.reject_above is not None and v > s.reject_above:
            return f"scorer:{s.name}"
        if s.reject_below is not None and v < s.reject_below:
            return f"scorer:{s.name}"
    return None
