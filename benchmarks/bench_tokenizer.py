"""Tokenizer encode+decode throughput, fp32 vs bf16 autocast, side by side in one run.

    .venv/bin/python benchmarks/bench_tokenizer.py [--model vq-f8] [--batch 16] [--size 128] [--repeats 5]

Also reports the PSNR gap between bf16 and fp32 reconstructions of the same images.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import tessera
from tessera.eval.metrics import psnr
from tessera.registry import build
from tessera.tokenizer.tools import roundtrip


def time_roundtrip(model, x, bf16: bool, repeats: int) -> float:
    roundtrip(model, x, bf16)  # warm-up (oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        roundtrip(model, x, bf16)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vq-f8")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    try:
        model = tessera.load(args.model)
    except Exception:  # no bundled weights: speed does not depend on the weights
        model = build(args.model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1
    res = {}
    for bf16 in (False, True):  # interleaved twice to even out machine noise
        for _ in range(2):
            t = time_roundtrip(model, x, bf16, args.repeats)
            key = "bf16" if bf16 else "fp32"
            res[key] = min(res.get(key, float("inf")), t)
    _, r32 = roundtrip(model, x, False)
    _, r16 = roundtrip(model, x, True)
    out = {
        "model": args.model, "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
        "fp32_images_per_s": round(args.batch / res["fp32"], 2), "bf16_images_per_s": round(args.batch / res["bf16"], 2),
        "bf16_speedup": round(res["fp32"] / res["bf16"], 2),
        "psnr_bf16_vs_fp32_db": round(float(psnr(r16, r32).mean()), 2),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
