"""Shared by the benchmark scripts (run as `python benchmarks/bench_X.py`, so this folder is on sys.path)."""
from __future__ import annotations

import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int = 2, warmup: bool = True) -> float:
    """Best wall-clock seconds of `repeats` calls (after one untimed warm-up call)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """Best wall-clock seconds of `a` and of `b`, run alternately (a, b, a, b, ...) after one warm-up
    each, so that a noisy spell on the machine hits both sides alike."""
    a(), b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        best_a = min(best_a, time.perf_counter() - t)
        t = time.perf_counter()
        b()
        best_b = min(best_b, time.perf_counter() - t)
    return best_a, best_b
