"""taming-transformers' Stage II transformer (minGPT over VQGAN token ids, Esser et al. 2021 sec. 3.2), under
the checkpoint's own parameter names (`transformer.*` of a Net2NetTransformer release), so it loads strictly:

    ids [B,T] (conditioning ids, e.g. the class or SOS, then image ids) -> tok_emb + pos_emb[:T]
    -> n_layer x (x + attn(ln1 x); x + mlp(ln2 x)) -> ln_f -> head -> logits [B,T,vocab]

Attention is causal, except among the first `n_unmasked` positions (minGPT's `mask` buffer, stored in the
checkpoint); p(s_i | s_<i, c) of the paper's eq. 7 is the softmax of logits[:, i - 1]. It holds no sampling.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.registry import register_family


@dataclasses.dataclass
class TamingGPTConfig(Config):
    vocab_size: int = 1024
    block_size: int = 256
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    n_unmasked: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.key, self.query, self.value, self.proj = (nn.Linear(cfg.n_embd, cfg.n_embd) for _ in range(4))
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        mask[:cfg.n_unmasked, :cfg.n_unmasked] = 1
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size))  # stored, as minGPT does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def heads(m: nn.Linear) -> torch.Tensor:
            return m(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, C/H)

        allowed = self.mask[:, :, :t, :t] != 0  # (1, 1, T, T)
        y = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@register_family("taming-gpt", TamingGPTConfig, role="transformer")
class TamingGPT(nn.Module):
    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B,T] -> logits [B,T',vocab]; `embeddings` [B,K,C] are prepended (T' = K + T <= block_size)."""
        x = self.tok_emb(ids)  # (B, T, C)
        if embeddings is not None:
            x = torch.cat([embeddings, x], dim=1)
        if x.shape[1] > self.config.block_size:
            raise ValueError(f"{x.shape[1]} positions: the transformer's block size is {self.config.block_size}")
        return self.head(self.ln_f(self.blocks(x + self.pos_emb[:, :x.shape[1]])))
