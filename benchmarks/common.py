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
