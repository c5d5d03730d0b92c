"""The config both token-grid Transformers share (AR `ar.py`, masked `masked.py`): one source of truth
for the vocabulary, grid, width and text-conditioning fields; each model's config extends it."""
from __future__ import annotations

import dataclasses

from tessera.config import Config


@dataclasses.dataclass
class TokenTransformerConfig(Config):
    vocab_size: int = 8192
    grid: tuple[int, int] = (16, 16)
    dim: int = 384
    depth: int = 8
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    cond_dim: int = 384          # prompt-encoder width; 0 = unconditional model
    max_text_tokens: int = 64

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0
