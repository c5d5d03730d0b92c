"""Super-resolution latency and memory on 2 CPU cores, side by side in one run: one of Tessera's cascades
(--fast fidelity | perceptual: 64x16 x4 + 32x8 x2) vs the imported Real-ESRGAN x4plus vs Pillow bicubic, for 256 -> 1024 and
1024 -> 2048 (a real photo, downscaled). Peak RSS of producing a 2048x2048 output is measured in a fresh
child process per case (VmHWM), so earlier cases do not count.

    .venv/bin/python benchmarks/bench_sr.py [--fast fidelity] [--bf16/--fp32] [--x4plus-2048] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from PIL import Image

from tessera.superres.cascade import load_sr_models, upscale

PHOTO = "/usr/share/backgrounds/mate/nature/LadyBird.jpg"  # Debian mate-backgrounds (set-up installs it)


def source(side: int) -> Image.Image:
    im = Image.open(PHOTO).convert("RGB")
    s = min(im.size)
    return im.crop((0, 0, s, s)).resize((side, side), Image.Resampling.LANCZOS)


def run_case(models, src: Image.Image, side: int, bf16: bool, tile: int) -> Image.Image:
    if models is None:
        return src.resize((side, side), Image.Resampling.BICUBIC)
    from tessera.device import placement

    return upscale(src, (side, side), models, placement=placement("cpu", "bfloat16" if bf16 else "float32"), tile=tile)


def best_time(models, src, side, bf16, tile, repeats) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = run_case(models, src, side, bf16, tile)
        best = min(best, time.perf_counter() - t)
    assert out.size == (side, side)
    return best


def peak_rss_self_mb() -> float:
    """VmHWM of this process: unlike ru_maxrss it starts afresh at exec, so the parent's memory at
    fork time is not counted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, src_side: int, side: int, bf16: bool, tile: int) -> None:
    """Run one case in this process and print its peak RSS (MB)."""
    models = None if name == "bicubic" else load_sr_models(name)
    t = time.perf_counter()
    run_case(models, source(src_side), side, bf16, tile)
    rss_mb = peak_rss_self_mb()
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": rss_mb}))


def peak_rss(name, src_side, side, bf16, tile) -> float:
    cmd = [sys.executable, __file__, "--child", name, str(src_side), str(side), "--tile", str(tile),
           "--bf16" if bf16 else "--fp32"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return round(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", default="fidelity", help="a bundled cascade (fidelity | perceptual) or a model folder")
    ap.add_argument("--bf16", dest="bf16", action="store_true", default=True)
    ap.add_argument("--fp32", dest="bf16", action="store_false")
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--x4plus-2048", action="store_true", help="also time x4plus 1024 -> 2048 (minutes)")
    ap.add_argument("--child", nargs=3, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]), args.bf16, args.tile)
    methods = {"bicubic": None, args.fast: load_sr_models(args.fast), "x4plus": load_sr_models("x4plus")}
    rows = []
    for src_side, side in ((256, 1024), (1024, 2048)):
        src = source(src_side)
        row = {"case": f"{src_side}->{side}"}
        for name, models in methods.items():
            if name == "x4plus" and side == 2048 and not args.x4plus_2048:
                continue
            row[f"{name}_s"] = round(best_time(models, src, side, args.bf16, args.tile,
                                               1 if name == "x4plus" else args.repeats), 3)
        rows.append(row)
    rss = {name: peak_rss(name, 1024, 2048, args.bf16, args.tile) for name in ("bicubic", args.fast)}
    rss[f"{args.fast}_128_to_2048"] = peak_rss(args.fast, 128, 2048, args.bf16, args.tile)
    print(json.dumps({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "latency": rows, "peak_rss_mb_2048_output": rss}, indent=2))


if __name__ == "__main__":
    main()
