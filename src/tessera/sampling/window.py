"""Sliding-window autoregressive sampling of a token grid larger than the transformer's context (taming-
transformers' way to megapixel images; seed 003 "local attention in a sliding-window manner").

    logits_fn(ids [B, K + w*w - 1]) -> logits [B, K + w*w - 1, V]     (K conditioning ids, then the window)

Tokens are drawn in raster order; for position (i, j) of an H x W grid the w x w window is the one centred
on it, pushed inside the grid at the borders, and the token is drawn from the logits of its place in that
window (the window's earlier rows and its row's earlier columns are already drawn; later ones are ignored
by causality). When the grid is the window (H = W = w), this is plain left-to-right sampling.
"""
from __future__ import annotations

from typing import Callable

import torch

from tessera.sampling.ar import sample_next


def _window_start(pos: int, size: int, w: int) -> int:
    """The first row (column) of the window for `pos`: centred, clamped to [0, size - w]."""
    return min(max(pos - w // 2, 0), size - w)


def sample_grid(logits_fn: Callable[[torch.Tensor], torch.Tensor], cond: torch.Tensor, grid: tuple[int, int],
                window: int, *, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """cond [B,K] conditioning ids (SOS or class) -> token ids [B,H,W]."""
    (h, w), b = grid, cond.shape[0]
    if window > min(h, w):
        raise ValueError(f"window {window} is larger than the grid {h}x{w}")
    ids = torch.zeros(b, h, w, dtype=torch.long, device=cond.device)
    for i in range(h):
        for j in range(w):
            i0, j0 = _window_start(i, h, window), _window_start(j, w, window)
            patch = ids[:, i0:i0 + window, j0:j0 + window].reshape(b, -1)  # (B, w*w)
            logits = logits_fn(torch.cat([cond, patch], dim=1)[:, :-1])[:, cond.shape[1] - 1:]  # (B, w*w, V)
            at = (i - i0) * window + (j - j0)
            ids[:, i, j] = sample_next(logits[:, at].float(), generator, temperature, top_k).to(ids.device)
            if callback is not None:
                callback(i * w + j + 1, h * w)
    return ids
