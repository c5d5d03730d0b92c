"""Attention kernels for long sequences (the U-Net's high-resolution levels: 4096 tokens at 512²), chosen
per call shape: `attend(q, k, v, impl)` with impl

    sdpa   torch's scaled_dot_product_attention (on a CPU: its flash kernel)
    gemm   the two products as bf16 GEMMs over query tiles sized for the L2 cache, the softmax between them
           in fp32 arithmetic (softmax(q k^T / sqrt(d)) v, Vaswani et al. eq. 1, one tile of rows at a time)
    auto   whichever measures faster for that shape on this machine (timed once per shape and thread
           count, then remembered for the process); sdpa for short key sequences and non-CPU tensors

Both compute the same function; the GEMM path rounds the scores to bf16 before the softmax, so it agrees
with SDPA within bf16 rounding, not bit for bit (tests/test_kernels.py). Which is faster depends on the
torch build: on torch 2.13 here SDPA's CPU kernel already runs near GEMM speed (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

ATTENTION = ("sdpa", "gemm", "auto")
LONG = 1024  # key sequences at least this long are candidates for the GEMM path


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """q [B,H,N,D], k / v [B,H,M,D] -> [B,H,N,D]; `tile` query rows at a time (a tile's scores
    tile x M stay in the L2 cache for M = 4096 in bf16)."""
    q = q * q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)  # (B, H, D, M)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, q.shape[2], tile):
        scores = torch.matmul(q[:, :, s:s + tile], kt)  # (B, H, T, M)
        torch.matmul(torch.softmax(scores, dim=-1), v, out=out[:, :, s:s + tile])  # (B, H, T, D)
    return out


def _first_is_faster(a, b, repeats: int = 2) -> bool:
    times = []
    for fn in (a, b):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append(time.perf_counter() - t)
    return times[0] < times[1]


@functools.lru_cache(maxsize=64)
def _gemm_wins(shape_q: tuple, shape_k: tuple, dtype: torch.dtype, threads: int) -> bool:
    """Time both kernels once on random tensors of this shape (the result is remembered)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k, v = (torch.randn(shape_k, generator=g).to(dtype) for _ in range(2))
    with torch.no_grad():
        return _first_is_faster(lambda: gemm_attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "gemm":
        return gemm_attention(q, k, v)
    if impl != "auto":
        raise ValueError(f"attention={impl!r}: must be one of {ATTENTION}")
    if q.device.type == "cpu" and k.shape[2] >= LONG and q.dtype in (torch.bfloat16, torch.float16) and \
            _gemm_wins(tuple(q.shape), tuple(k.shape), q.dtype, torch.get_num_threads()):
        return gemm_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
