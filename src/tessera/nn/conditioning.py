"""Prompt conditioning shared by the diffusion denoisers: the learned null condition of
classifier-free guidance and sinusoidal timestep embeddings."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim] (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def with_null_condition(cond: torch.Tensor | None, mask: torch.Tensor | None, drop: torch.Tensor | None,
                        null: torch.Tensor, batch: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt states [B,L,C] + key mask [B,L] for cross-attention. Rows with `drop` set (and every row
    when there is no prompt) see the learned `null` vector [C] as their only valid token."""
    if cond is None:
        dev = null.device
        cond, mask = torch.zeros(batch, 1, null.shape[0], device=dev), torch.ones(batch, 1, dtype=torch.bool, device=dev)
        drop = torch.ones(batch, dtype=torch.bool, device=dev)
    if cond.shape[1] > max_tokens:
        raise ValueError(f"prompt has {cond.shape[1]} tokens; this model takes at most {max_tokens}")
    mask = mask.bool()
    if drop is None:
        return cond, mask
    d = drop.view(batch, 1).bool()
    cond = torch.where(d[..., None], null.to(cond.dtype).expand_as(cond), cond)
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return cond, torch.where(d, first, mask)
