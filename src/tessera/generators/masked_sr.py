"""Muse's super-resolution transformer (seed 003, "3.3 Super-Resolution Model"; Chang et al. 2023, Fig. 4):
a second masked transformer that predicts the high-resolution token grid from the low-resolution tokens
and the text. Here over Tessera's vq-f8: the 16x16 grid of a 128² image -> the 32x32 grid of 256².

    low ids [B,n] -> embedding + row/col positions -> low_depth x Block (self-attention)  -> low states
    context = [low states; prompt states (projected to dim)], the null condition for dropped prompts
    high ids [B,N] (MASK = vocab_size where unknown) -> embedding + row/col positions
      -> depth x CrossBlock (self-attention, cross-attention to the context, MLP) -> LayerNorm -> head
      -> logits [B,N,vocab_size]

Trained with the masked objective on pairs (tokens of a 256² image, tokens of the same image at 128²) and
decoded with `sampling/masked.sample` like the base model (`pipelines/masked.py`'s `sr=` stage).
`WithLow(model, low)` binds the low-resolution grids so the base model's guided logits / objective
functions drive it unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.generators.tokens import TokenTransformerConfig
from tessera.nn.attention import Block, CrossBlock, normal_init
from tessera.nn.conditioning import with_null_condition
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class MaskedSRConfig(TokenTransformerConfig):
    """The token-Transformer fields for the HIGH-resolution grid, plus the low-resolution grid and its encoder."""

    grid: tuple[int, int] = (32, 32)
    low_grid: tuple[int, int] = (16, 16)
    low_depth: int = 2

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def scale(self) -> int:
        return self.grid[0] // self.low_grid[0]


@register_family("masked-sr", MaskedSRConfig, role="token-superres", task="masked_sr",
                 cache="tessera.train.runs:prepare_sr_token_inputs",
                 train=dict(batch_size=8, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=200,
                            ema_decay=0.999, max_steps=3000))
class MaskedSRTransformer(nn.Module):
    def __init__(self, cfg: MaskedSRConfig):
        super().__init__()
        if cfg.grid[0] % cfg.low_grid[0] or cfg.grid[1] % cfg.low_grid[1]:
            raise ValueError(f"grid {cfg.grid} must be a multiple of low_grid {cfg.low_grid}")
        self.config = cfg
        d = cfg.dim
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, d)  # + [MASK]
        self.low_emb = nn.Embedding(cfg.vocab_size, d)
        self.row_emb, self.col_emb = (nn.Parameter(torch.randn(n, d) * 0.02) for n in cfg.grid)
        self.low_row_emb, self.low_col_emb = (nn.Parameter(torch.randn(n, d) * 0.02) for n in cfg.low_grid)
        self.low_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.low_depth))
        if cfg.conditional:
            self.text_proj = nn.Linear(cfg.cond_dim, d)
            self.null_text = nn.Parameter(torch.randn(cfg.cond_dim) * 0.02)  # learned "no caption"
        self.blocks = nn.ModuleList(CrossBlock(d, d, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size)
        self.apply(normal_init)

    @staticmethod
    def _positions(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return (rows[:, None] + cols[None]).flatten(0, 1)  # (h*w, D), row-major

    def context(self, low: torch.Tensor, cond: torch.Tensor | None, mask: torch.Tensor | None,
                drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """low [B,n] ids -> the cross-attention context [B, n + L, D] and its key mask [B, n + L]."""
        cfg, b = self.config, low.shape[0]
        if low.shape[1] != cfg.low_grid[0] * cfg.low_grid[1]:
            raise ValueError(f"expected {cfg.low_grid} low-resolution tokens, got {low.shape[1]}")
        x = self.low_emb(low) + self._positions(self.low_row_emb, self.low_col_emb)  # (B, n, D)
        for block in self.low_blocks:
            x = block(x)
        if not cfg.conditional:
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        text, tmask = with_null_condition(cond, mask, drop, self.null_text, b, cfg.max_text_tokens)
        ctx = torch.cat([x, self.text_proj(text.to(x.dtype))], dim=1)  # (B, n + L, D)
        return ctx, torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), tmask], dim=1)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, low: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,N] (high grid, MASK where unknown), low [B,n] -> logits [B,N,vocab_size]."""
        cfg = self.config
        if low is None:
            raise ValueError("the super-resolution transformer needs the low-resolution tokens (low=)")
        if tokens.shape[1] != cfg.num_tokens:
            raise ValueError(f"expected {cfg.num_tokens} tokens (grid {cfg.grid}), got {tokens.shape[1]}")
        ctx, ctx_mask = self.context(low, cond, mask, drop)
        x = self.tok_emb(tokens) + self._positions(self.row_emb, self.col_emb)  # (B, N, D)
        for block in self.blocks:
            x = block(x, ctx, ctx_mask)
        return self.head(self.norm(x))


class WithLow(nn.Module):
    """`model` with its low-resolution grids bound: forward(tokens, cond, mask, drop) as the base masked
    generator's, the low grids repeated when the batch is (classifier-free guidance doubles it)."""

    def __init__(self, model: MaskedSRTransformer, low: torch.Tensor):
        super().__init__()
        self.model, self.low, self.config = model, low.flatten(1), model.config

    def forward(self, tokens, cond=None, mask=None, drop=None):
        low = self.low.repeat(tokens.shape[0] // self.low.shape[0], 1)
        return self.model(tokens, cond, mask, drop, low=low)


# 16x16 -> 32x32 vq-f8 tokens (128² -> 256²), MiniLM cross-attention; xs: ~0.4 s per batch-8 step on 2 cores
register_preset("masked-sr-s", "masked-sr", dim=256, depth=6, low_depth=2, heads=8, dropout=0.1, cond_dim=384,
                max_text_tokens=64)
register_preset("masked-sr-xs", "masked-sr", dim=128, depth=3, low_depth=1, heads=4, dropout=0.1, cond_dim=384,
                max_text_tokens=64)
