"""`tessera data prepare` throughput (images/s) on real photos, 1 worker vs 2 workers, in one run.

    .venv/bin/python benchmarks/bench_prepare.py [SRC ...]   (default: tuxpaint stamps + MATE backgrounds)
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

from tessera.data.prepare import PrepareConfig, prepare

DEFAULT_SOURCES = ["/usr/share/tuxpaint/stamps", "/usr/share/backgrounds/mate"]


def main() -> None:
    sources = sys.argv[1:] or DEFAULT_SOURCES
    out = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            rep = prepare(sources, tmp, PrepareConfig(size=128, workers=workers), progress=False)
            dt = time.perf_counter() - t
        out[f"workers_{workers}"] = {"inputs": rep["inputs"], "kept": rep["kept"], "seconds": round(dt, 2),
                                     "images_per_s": round(rep["inputs"] / dt, 1)}
    out["speedup_2_vs_1"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    print(json.dumps({"sources": sources, **out}, indent=2))


if __name__ == "__main__":
    main()
