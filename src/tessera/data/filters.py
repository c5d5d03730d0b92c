"""Per-image quality filters and perceptual hashing (seed 000 "Remove low-quality images";
seed 004 "Filtering inappropriate images").

Each filter returns None (pass) or a rejection reason. Scorers (NSFW, aesthetic, caption-image
match) plug in through `Scorer`: later stages register them; `prepare` records every score.
"""
from __future__ import annotations

import dataclasses
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
    embedding_model: str = ""       # image-text model (clip-xs, a CLIP folder): semantic duplicates by cosine; "" = off
    embedding_threshold: float = 0.95  # cosine >= this to a kept image's embedding = semantic duplicate

    def __post_init__(self):
        if not -1.0 <= self.embedding_threshold <= 1.0:
            raise ValueError(f"embedding_threshold is a cosine: it must be in [-1, 1], got {self.embedding_threshold}")
        if not 0 <= self.phash_distance < 64:
            raise ValueError(f"phash_distance must be in [0, 64) bits, got {self.phash_distance}")


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash (the `imagehash` library's pHash: the 8x8 lowest frequencies of the 32x32
    grayscale DCT against their median), as an integer whose hex digits are imagehash's string."""
    import imagehash

    return int(str(imagehash.phash(im)), 16)


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
    """Plug-in image scorer. `reject_above`/`reject_below` set which scores are rejected. `score` returns the
    score, or a dict with it under "score" and parts the catalog records as "<name>.<part>"."""

    name: str
    reject_above: float | None
    reject_below: float | None

    def score(self, im: Image.Image, caption: str) -> float | dict[str, float]: ...


SCORER_GROUP = "tessera.scorers"  # entry-point group: name -> factory, declared by installed packages
_REGISTERED: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, factory: Callable[..., Scorer]) -> None:
    """Register a scorer factory in this process; prepare hands it to its worker processes by reference, so it is
    a module-level function (packages declare theirs as `tessera.scorers` entry points)."""
    _REGISTERED[name] = factory


def registered_scorers() -> dict[str, Callable[..., Scorer]]:
    """The scorers registered in this process (handed to prepare's worker processes)."""
    return dict(_REGISTERED)


def plugin_names(group: str) -> list[str]:
    from importlib.metadata import entry_points

    local = _REGISTERED if group == SCORER_GROUP else {}
    return sorted({*local, *(ep.name for ep in entry_points(group=group))})


def plugin_factory(group: str, name: str) -> Callable:
    """The factory an installed package registers under `name` in entry-point `group` (scorers, captioners,
    embedders): data/ names its plug-ins and never imports the packages above it that implement them."""
    from importlib.metadata import entry_points

    if group == SCORER_GROUP and name in _REGISTERED:
        return _REGISTERED[name]
    return next(ep for ep in entry_points(group=group) if ep.name == name).load()


def parse_spec(spec: str, group: str, kind: str, example: str) -> tuple[str, dict[str, str]]:
    """'name?key=value&...' -> (name, string arguments); the name must be registered in `group`."""
    name, _, query = spec.partition("?")
    known = plugin_names(group)
    if ":" in name or not name:
        raise ValueError(f"{kind} {spec!r}: give a registered {kind} name, e.g. {example!r} (known: {known}), "
                         f"not a module path")
    if name not in known:
        raise ValueError(f"{kind} {name!r} is not registered; known: {known} (a plug-in package registers one "
                         f"as a {group!r} entry point)")
    kwargs = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"{kind} {spec!r}: argument {part!r} must be key=value")
        kwargs[key] = value
    return name, kwargs


def check_arguments(factory: Callable, kwargs: dict[str, str], spec: str, kind: str) -> None:
    """The spec's key=value arguments must be parameters of the plug-in's factory."""
    import inspect

    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{kind} {spec!r}: unknown argument(s) {unknown}; it takes {sorted(params)}")


def scorer_names() -> list[str]:
    return plugin_names(SCORER_GROUP)


def check_scorer_spec(spec: str) -> tuple[str, dict[str, str]]:
    return parse_spec(spec, SCORER_GROUP, "scorer", "nsfw?max_score=0.8")


def load_scorer(spec: str) -> Scorer:
    """'name' -> the registered factory(); 'name?key=value&key=value' -> factory(key='value', ...) (string
    arguments, so that the spec alone rebuilds the scorer in every worker process). Only registered names:
    a config file is data, never a path to arbitrary code."""
    name, kwargs = check_scorer_spec(spec)
    factory = plugin_factory(SCORER_GROUP, name)
    check_arguments(factory, kwargs, spec, "scorer")
    return factory(**kwargs)


def score_reason(scores: dict[str, float], scorers: list[Scorer]) -> str | None:
    for s in scorers:
        v = scores[s.name]
        if s.reject_above is not None and v > s.reject_above:
            return f"scorer:{s.name}"
        if s.reject_below is not None and v < s.reject_below:
            return f"scorer:{s.name}"
    return None
