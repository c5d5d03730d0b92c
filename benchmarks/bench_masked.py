"""Masked (Muse/MaskGIT) vs autoregressive sampling, side by side in one run at matched width / depth /
heads / vocabulary on 256 image tokens: wall-clock per image at 8, 12 and 24 parallel-decoding steps vs
the AR generator with its KV cache (one forward per token), both with CFG in one batched forward and
bf16 autocast, random weights (speed does not depend on them).

    .venv/bin/python benchmarks/bench_masked.py [--masked masked-s --ar ar-s] [--batch 4] [--text 16]
"""
from __future__ import annotations

import argparse
import json

import torch
from common import timed

from tessera.registry import build
from tessera.sampling import ar as ar_sampling
from tessera.sampling import masked as masked_sampling


def masked_run(model, cond, mask, batch: int, steps: int, cfg_scale: float):
    c = model.config

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fn = masked_sampling.guided_logits_fn(model, cond, mask, cfg_scale)
            start = torch.full((batch, c.num_tokens), c.mask_id)
            masked_sampling.sample(fn, start, c.mask_id, steps, generator=torch.Generator().manual_seed(0))
    return run


def ar_run(model, cond, mask, batch: int, cfg_scale: float):
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fn = ar_sampling.cached_logits_fn(model, batch, cond, mask, guided=True)
            ar_sampling.sample(fn, batch, model.config.num_tokens, generator=torch.Generator().manual_seed(0),
                               cfg_scale=cfg_scale)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masked", default="masked-s")
    ap.add_argument("--ar", default="ar-s")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=16, help="prompt tokens")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    mg, ag = build(args.masked).eval(), build(args.ar).eval()
    cond = torch.randn(args.batch, args.text, mg.config.cond_dim)
    mask = torch.ones(args.batch, args.text, dtype=torch.bool)
    per_image = {"ar_kv": timed(ar_run(ag, cond, mask, args.batch, args.cfg), args.repeats) / args.batch}
    for steps in (8, 12, 24):
        t = timed(masked_run(mg, cond, mask, args.batch, steps, args.cfg), args.repeats) / args.batch
        per_image[f"masked_{steps}"] = t
    rows = {k: round(v, 4) for k, v in per_image.items()}
    speedup = {f"ar_over_masked_{s}": round(per_image["ar_kv"] / per_image[f"masked_{s}"], 2) for s in (8, 12, 24)}
    params = {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for n, m in ((args.masked, mg), (args.ar, ag))}
    print(json.dumps({"args": vars(args), "params_M": params, "seconds_per_image": rows, "speedup": speedup,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
