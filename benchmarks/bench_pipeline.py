"""End-to-end `tessera generate` latency per paradigm on 2 CPU cores (issue 8; seed 000's target:
1024x1024 in <= 5 s, 2048x2048 in <= 15 s, peak RSS <= 4 GB): the full pipeline (prompt safety,
enhancement, generation, decoding, harm detection, SR cascade) with the per-stage breakdown. Each
(paradigm, size) case runs in a fresh child process, so its peak RSS (VmHWM) is its own; inside it the
models are loaded once, one warm-up request is made, then the best of `--repeats` requests is kept.
All cases run in one invocation, one after the other.

    .venv/bin/python benchmarks/bench_pipeline.py [--sizes 1024 2048] [--masked-model models/masked-xs]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPT = "a red apple on a table"


def child(paradigm: str, size: int, model: str | None, repeats: int) -> dict:
    from tessera.pipelines.text2image import Request, TextToImage

    pipe = TextToImage({paradigm: model} if model else None)
    req = Request(PROMPT, paradigm=paradigm, size=size, seed=0)
    pipe(req)  # warm-up (also loads the generator)
    best = None
    for _ in range(repeats):
        r = pipe(req)
        if best is None or r.timings["total"] < best["total"]:
            best = r.timings
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {"paradigm": paradigm, "size": size, "model": pipe.models[paradigm], **best, "peak_rss_mb": hwm / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--paradigms", nargs="+", default=["ar", "masked", "diffusion"])
    ap.add_argument("--masked-model", default=None, help="masked generator (default: the bundled one, if any)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("PARADIGM", "SIZE", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        p, size, model = a.child
        print(json.dumps(child(p, int(size), None if model == "-" else model, a.repeats)))
        return
    rows = []
    for size in a.sizes:
        for p in a.paradigms:
            model = a.masked_model if p == "masked" and a.masked_model else "-"
            out = subprocess.run([sys.executable, __file__, "--child", p, str(size), model, "--repeats",
                                  str(a.repeats)], capture_output=True, text=True)
            if out.returncode:
                print(f"{p} {size}: failed: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = ["prompt_safety", "enhance", "generate", "decode", "image_safety", "upscale", "total"]
    print("| paradigm | model | size | " + " | ".join(stages) + " | peak RSS (MB) |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in stages) + " | ---: |")
    for r in rows:
        print(f"| {r['paradigm']} | {r['model']} | {r['size']} | " + " | ".join(f"{r[s]:.2f}" for s in stages)
              + f" | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
