"""Token merging for Stable Diffusion (ToMe for SD: Bolya & Hoffman 2023, `tomesd`'s method), applied in
Tessera's own transformer blocks (generators/sd_unet.py: `SDUNet.set_tome`).

Before a block's self-attention, the tokens of the feature map [B, N = h*w, C] are split into dst (one
per 2x2 cell: its top-left token, or a random one) and src (the other three); each src token's most
similar dst token is found by cosine similarity of the block's input; the r = ratio * N most similar src
tokens are averaged into their dst ("bipartite soft matching"), attention runs on the N - r tokens left,
and its output is copied back to every merged position ("unmerge"). Attention's cost falls by about
(1 - ratio)^2; the image changes (lossy), so it is off unless asked for.
"""
from __future__ import annotations

from typing import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _partition(h: int, w: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (src indices [1,Ns,1], dst indices [1,Nd,1]) over the h*w grid: one dst per 2x2 cell (top-left, or
    random with `generator`); rows / columns past the last whole cell are src."""
    hc, wc = h // 2, w // 2
    pick = torch.zeros(hc, wc, 1, dtype=torch.int64) if generator is None else \
        torch.randint(4, (hc, wc, 1), generator=generator)
    cells = torch.zeros(hc, wc, 4, dtype=torch.int64).scatter_(2, pick, -1)  # -1 marks the cell's dst
    grid = torch.zeros(h, w, dtype=torch.int64)
    grid[:2 * hc, :2 * wc] = cells.view(hc, wc, 2, 2).transpose(1, 2).reshape(2 * hc, 2 * wc)
    order = grid.reshape(1, -1, 1).argsort(dim=1, stable=True)  # dst first (stable: grid order within each)
    return order[:, hc * wc:], order[:, :hc * wc]


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, r: int,
                            generator: torch.Generator | None = None) -> tuple[Fn, Fn]:
    """(merge, unmerge) for tokens [B, h*w, C] whose similarity `metric` [B, h*w, C'] gives; r tokens go."""
    b, n, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    a_idx, b_idx = (i.to(metric.device) for i in _partition(h, w, generator))
    n_dst = b_idx.shape[1]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return x.gather(1, a_idx.expand(b, n - n_dst, c)), x.gather(1, b_idx.expand(b, n_dst, c))  # src, dst

    with torch.no_grad():
        src, dst = split(metric / metric.norm(dim=-1, keepdim=True))
        node_max, node_idx = (src @ dst.transpose(-1, -2)).max(dim=-1)  # (B, Ns): each src's best dst
        r = min(src.shape[1], r)
        edge = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Ns, 1) most similar first
        unm_idx, src_idx = edge[:, r:], edge[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)  # (B, r, 1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        s, d = split(x)
        c = x.shape[-1]
        unm = s.gather(1, unm_idx.expand(b, unm_idx.shape[1], c))
        d = d.scatter_reduce(1, dst_idx.expand(b, r, c), s.gather(1, src_idx.expand(b, r, c)), reduce="mean")
        return torch.cat([unm, d], dim=1)  # (B, N - r, C)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c, k = x.shape[-1], unm_idx.shape[1]
        unm, d = x[:, :k], x[:, k:]
        out = torch.zeros(b, n, c, dtype=x.dtype, device=x.device)
        out.scatter_(1, b_idx.expand(b, n_dst, c), d)
        src_pos = a_idx.expand(b, n - n_dst, 1)
        out.scatter_(1, src_pos.gather(1, unm_idx).expand(b, k, c), unm)
        out.scatter_(1, src_pos.gather(1, src_idx).expand(b, r, c), d.gather(1, dst_idx.expand(b, r, c)))
        return out  # (B, N, C)

    return merge, unmerge
