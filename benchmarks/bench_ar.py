"""AR sampling speed at 256 image tokens + a text prefix, side by side in one run:
KV cache vs recompute-everything, bf16 vs fp32, and x-transformers' cached `generate` at matched
width / depth / heads / vocabulary (the peer gets the same number of prefix positions as prompt).

    .venv/bin/python benchmarks/bench_ar.py [--preset ar-s] [--batch 4] [--text 16] [--skip-recompute]
"""
from __future__ import annotations

import argparse
import json

import torch
from common import timed

from tessera.registry import build
from tessera.sampling.ar import cached_logits_fn, recompute_logits_fn, sample


def ours(model, cond, mask, batch, cached: bool, bf16: bool):
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn = (cached_logits_fn(model, batch, cond, mask) if cached else recompute_logits_fn(model, batch, cond, mask))
            sample(fn, batch, model.config.num_tokens, generator=torch.Generator().manual_seed(0), top_k=100)
    return run


def peer(cfg, batch, prefix_len, bf16: bool):
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    net = TransformerWrapper(num_tokens=cfg.vocab_size, max_seq_len=prefix_len + cfg.num_tokens,
                             attn_layers=Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                                 ff_mult=cfg.mlp_ratio)).eval()
    wrapper = AutoregressiveWrapper(net)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prefix_len))
    params = sum(p.numel() for p in net.parameters())

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            wrapper.generate(prompt, cfg.num_tokens, cache_kv=True, filter_logits_fn="top_k", filter_kwargs={"k": 100})
    return run, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ar-s")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=16, help="text prefix tokens")
    ap.add_argument("--skip-recompute", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.preset).eval()
    cfg = model.config
    cond = torch.randn(args.batch, args.text, cfg.cond_dim)
    mask = torch.ones(args.batch, args.text, dtype=torch.bool)
    n = args.batch * cfg.num_tokens
    res = {"preset": args.preset, "batch": args.batch, "image_tokens": cfg.num_tokens, "text_prefix": args.text,
           "params_ours": sum(p.numel() for p in model.parameters())}
    runs = {"ours_kv_fp32": ours(model, cond, mask, args.batch, True, False),
            "ours_kv_bf16": ours(model, cond, mask, args.batch, True, True)}
    peer_fp32, res["params_peer"] = peer(cfg, args.batch, args.text + 1, False)
    runs["xtransformers_kv_fp32"] = peer_fp32
    runs["xtransformers_kv_bf16"] = peer(cfg, args.batch, args.text + 1, True)[0]
    if not args.skip_recompute:
        runs["ours_recompute_fp32"] = ours(model, cond, mask, args.batch, False, False)
    for name, fn in runs.items():
        fn()  # warm-up
    for name, fn in runs.items():  # interleaved measurement order, best of 2
        res[f"{name}_tok_s"] = round(n / timed(fn, 1 if "recompute" in name else 2, warmup=False), 1)
    r = res
    if "ours_recompute_fp32_tok_s" in r:
        r["kv_cache_speedup"] = round(r["ours_kv_fp32_tok_s"] / r["ours_recompute_fp32_tok_s"], 2)
    r["bf16_speedup"] = round(r["ours_kv_bf16_tok_s"] / r["ours_kv_fp32_tok_s"], 2)
    r["ours_vs_xtransformers_fp32"] = round(r["ours_kv_fp32_tok_s"] / r["xtransformers_kv_fp32_tok_s"], 2)
    r["ours_vs_xtransformers_bf16"] = round(r["ours_kv_bf16_tok_s"] / r["xtransformers_kv_bf16_tok_s"], 2)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
