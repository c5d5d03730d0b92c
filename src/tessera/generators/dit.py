"""Diffusion Transformer denoiser (seed 004 Figure 11; Peebles & Xie 2023, DiT; PixArt-alpha's text
cross-attention).

    x_t [B,C,H,W] --patchify (p x p conv)--> tokens [B, N=(H/p)(W/p), D] + fixed 2-D sin-cos positions
      --> depth x Block:  x += gate1 * SelfAttn(adaLN(x; shift1, scale1))
                          x += CrossAttn(LN(x), prompt states)
                          x += gate2 * MLP(adaLN(x; shift2, scale2))
      --> final adaLN + linear --> unpatchify --> predicted noise (or v) [B,C,H,W]

adaLN-Zero: shift/scale/gate come from c = timestep embedding + pooled prompt, through a linear layer
initialised to zero, so every block starts as the identity. The network knows nothing of noise
schedules; `tessera.sampling.diffusion` drives it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.nn.attention import MLP, Attention, CrossAttention
from tessera.nn.conditioning import timestep_embedding, with_null_condition


@dataclasses.dataclass
class DiTConfig(Config):
    in_channels: int = 8             # latent channels (vq-f8 latents: 8) or 3 for pixels
    sample_size: int = 16            # latent side
    patch_size: int = 2
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    cond_dim: int = 384              # prompt-encoder width; 0 = unconditional
    max_text_tokens: int = 64

    def __post_init__(self):
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}")

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [grid*grid, dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for 2-D sin-cos positions")
    pos = torch.arange(grid, dtype=torch.float32)
    emb = timestep_embedding(pos, dim // 2)  # (grid, dim/2)
    rows = emb[:, None, :].expand(grid, grid, -1)  # (H, W, dim/2)
    cols = emb[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # shift, scale [B, D] -> over all tokens


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, cond_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross = CrossAttention(dim, cond_dim, heads) if cond_dim else None
        self.norm_cross = nn.LayerNorm(dim) if cond_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None, mask: torch.Tensor | None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), ctx, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        p, d = cfg.patch_size, cfg.dim
        self.grid = cfg.sample_size // p
        self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.register_buffer("pos", sincos_pos_embed_2d(d, self.grid), persistent=False)  # (N, D)
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        if cfg.conditional:
            self.null_text = nn.Parameter(torch.randn(cfg.cond_dim) * 0.02)  # learned "no caption"
            self.pooled = nn.Linear(cfg.cond_dim, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.cond_dim) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, p * p * cfg.in_channels)
        for m in (self.ada_out, self.out):  # zero-initialised output: predicts 0 at the start
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, c, g = x.shape[0], self.config.patch_size, self.config.in_channels, self.grid
        x = x.view(b, g, g, p, p, c)  # (B, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,H,W], t [B] -> model output [B,C,H,W]."""
        b = x.shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.time_mlp(timestep_embedding(t, 256))  # (B, D)
        ctx = None
        if self.config.conditional:
            ctx, mask = with_null_condition(cond, mask, drop, self.null_text, b, self.config.max_text_tokens)
            w = mask.to(ctx.dtype)[..., None]  # (B, L, 1)
            c = c + self.pooled((ctx * w).sum(1) / w.sum(1))  # masked mean of the prompt states
        for block in self.blocks:
            h = block(h, c, ctx, mask)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        return self.unpatchify(self.out(modulate(self.norm_out(h), shift, scale)))
