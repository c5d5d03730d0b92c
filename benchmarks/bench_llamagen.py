"""LlamaGen class-to-image at the real sizes (random weights of the true shapes; speed does not depend on the
values): GPT-B (111 M) / GPT-L (343 M) + the VQ-16 tokenizer, 256 tokens (256²), CFG (batch 2), top-k 2000,
bf16, 2 threads. Per decode-step setting (`LlamaGenPipeline.set_speed`): seconds per image (the whole call:
prefill, 256 decode steps, sampling, VQ decode), the decode step alone (ms, median over the image's steps),
tokens/s, and the weight traffic per token (every GPT weight but the embeddings is read once per step)
divided by the step time.

    .venv/bin/python benchmarks/bench_llamagen.py [--sizes B,L] [--rows eager,int8,compile,int8+compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

ROWS = {"eager": {}, "int8": {"int8": True}, "compile": {"compile": True}, "int8+compile": {"int8": True, "compile": True}}


def build(size: str):
    from tessera.generators.llamagen import LlamaGenConfig, LlamaGenGPT
    from tessera.pipelines.llamagen import SIZES, LlamaGenPipeline
    from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

    torch.manual_seed(0)
    gpt = LlamaGenGPT(LlamaGenConfig(**SIZES[size], block_size=256))
    return LlamaGenPipeline(gpt.to(torch.bfloat16), LlamaGenVQ(LlamaGenVQConfig()).to(torch.bfloat16))


def weight_bytes(gpt) -> int:
    """Bytes read per decode step: every weight but the embedding tables (one row each is read)."""
    return sum(b.numel() * b.element_size() for n, b in [*gpt.named_parameters(), *gpt.named_buffers()]
               if "embedding" not in n and n != "rope")


def time_call(pipe) -> tuple[float, float]:
    steps: list[float] = []
    step = pipe.gpt.decode_step

    def timed(*a):
        t0 = time.perf_counter()
        out = step(*a)
        steps.append(time.perf_counter() - t0)
        return out
    pipe.gpt.decode_step = timed
    t = time.perf_counter()
    pipe(class_label=207, guidance_scale=4.0, top_k=2000, generator=torch.Generator().manual_seed(0))
    total = time.perf_counter() - t
    del pipe.gpt.decode_step
    return total, statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="B,L")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("LlamaGen c2i 256², 256 tokens, CFG 4 (batch 2), top-k 2000, bf16, 2 threads; second call of each setting")
    print("| model | decode step | first call s (incl. compile) | s / image | step ms | tokens/s | weights / token MB | GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        for row in args.rows.split(","):
            pipe = build(size).set_speed(**ROWS[row])
            with torch.no_grad():
                first = time_call(pipe)[0]
                total, step = time_call(pipe)
            mb = weight_bytes(pipe.gpt) / 1e6
            print(f"| GPT-{size} | {row} | {first:.1f} | {total:.2f} | {step * 1e3:.1f} | {256 / total:.1f} | "
                  f"{mb:.0f} | {mb / 1e3 / step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
