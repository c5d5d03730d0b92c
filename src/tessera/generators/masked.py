"""Masked image generator (seed 003 "Muse"; Chang et al. 2022, MaskGIT): a bidirectional Transformer
over the token grid that predicts every masked token at once.

    tokens [B,N] (ids, MASK = vocab_size) -> embedding + row/col positions
      -> depth x CrossBlock (self-attention over all positions, cross-attention to the prompt's token
         states, MLP) -> LayerNorm -> head -> logits [B,N,vocab_size]

Text conditioning is cross-attention to the prompt encoder's states (Muse); rows with `drop` set see a
learned null condition instead (classifier-free guidance). The network holds no decoding loop:
`tessera.sampling.masked` drives it.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.generators.tokens import TokenTransformerConfig
from tessera.nn.attention import CrossBlock, normal_init
from tessera.nn.conditioning import with_null_condition
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class MaskedConfig(TokenTransformerConfig):
    """The shared token-Transformer fields; one extra embedding row is the [MASK] token."""

    @property
    def mask_id(self) -> int:
        return self.vocab_size


@register_family("masked", MaskedConfig, role="generator", paradigm="masked", sampler="maskgit-cosine", pipeline="tessera.pipelines.masked:MaskedPipeline",
                 task="masked",
                 cache="tessera.train.runs:prepare_token_inputs",
                 train=dict(batch_size=32, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=500, ema_decay=0.999,
                            max_steps=20000))
class MaskedTransformer(nn.Module):
    def __init__(self, cfg: MaskedConfig):
        super().__init__()
        self.config = cfg
        h, w = cfg.grid
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.dim)  # + [MASK]
        self.row_emb = nn.Parameter(torch.randn(h, cfg.dim) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(w, cfg.dim) * 0.02)
        context_dim = cfg.cond_dim if cfg.conditional else cfg.dim
        if cfg.conditional:
            self.null_text = nn.Parameter(torch.randn(cfg.cond_dim) * 0.02)  # learned "no caption"
        else:  # an unconditional model attends to one learned context token
            self.context = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(cfg.dim, context_dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.apply(normal_init)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,N] with MASK = vocab_size where unknown -> logits [B,N,vocab_size] at every position."""
        b, n = tokens.shape
        cfg = self.config
        if n != cfg.num_tokens:
            raise ValueError(f"expected {cfg.num_tokens} tokens (grid {cfg.grid}), got {n}")
        w = cfg.grid[1]
        idx = torch.arange(n, device=tokens.device)
        x = self.tok_emb(tokens) + self.row_emb[idx // w] + self.col_emb[idx % w]  # (B, N, D)
        if cfg.conditional:
            ctx, mask = with_null_condition(cond, mask, drop, self.null_text, b, cfg.max_text_tokens)
        else:
            ctx, mask = self.context.expand(b, -1, -1), None
        for block in self.blocks:
            x = block(x, ctx, mask)
        return self.head(self.norm(x))

# bidirectional masked Transformers over 16x16 vq-f8 tokens (Muse), MiniLM cross-attention;
# masked-xs matches ar-xs in width / depth / heads for the side-by-side comparison
register_preset("masked-s", "masked", dim=384, depth=8, heads=6, cond_dim=384, max_text_tokens=64)
register_preset("masked-xs", "masked", dim=192, depth=6, heads=6, dropout=0.1, cond_dim=384, max_text_tokens=64)
# the bundled masked default: masked-xs with 4 blocks (5.8 M parameters, 11.7 MB fp16) to fit the 60 MB budget
register_preset("masked-xxs", "masked", default=True, dim=192, depth=4, heads=6, dropout=0.1, cond_dim=384,
                max_text_tokens=64)
