"""LlamaGen's autoregressive transformer (Sun et al. 2024, "Autoregressive Model Beats Diffusion") under its
checkpoint's parameter names (`c2i_B_256.pt`'s `model`), so a release loads strictly:

    [cond (1 class embedding, or 120 projected caption states); token embeddings] -> n_layer x Llama blocks
    (RMSNorm, attention with a fused wqkv and 2-D RoPE, SwiGLU w2(silu(w1 x) * w3 x)) -> RMSNorm -> output

2-D RoPE: the head dimension's first half rotates by a token's grid row, the second half by its column;
the conditioning positions get an all-zero table (LlamaGen's choice: their rotated q / k are zero).
Class-to-image keeps one extra class row, the null class of classifier-free guidance. No sampling here
(sampling/ar.py drives it through `logits_fn`s over `forward` / `KVCache`).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.nn.layers import RMSNorm
from tessera.registry import register_family


@dataclasses.dataclass
class LlamaGenConfig(Config):
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    model_type: str = "c2i"            # c2i: class labels | t2i: caption states (FLAN-T5)
    num_classes: int = 1000
    class_dropout_prob: float = 0.1    # > 0: a null-class row for CFG
    caption_dim: int = 2048
    cls_token_num: int = 1             # 1 (c2i) or 120 (t2i)
    vocab_size: int = 16384
    block_size: int = 256              # image tokens: a square grid

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type={self.model_type!r}: must be 'c2i' or 't2i'")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size={self.block_size}: the token grid must be square")

    @property
    def hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return -(-h // self.multiple_of) * self.multiple_of  # rounded up to a multiple

    @property
    def conditional(self) -> bool:
        return True


def rope_2d(grid: int, head_dim: int, base: float, cond_tokens: int) -> torch.Tensor:
    """(cond_tokens + grid², head_dim/2, 2) cos / sin: pairs [0, head_dim/4) by row, the rest by column."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(0, head_dim // 2, 2)[:quarter].float() / (head_dim // 2))  # (head_dim/4,)
    angles = torch.arange(grid).float()[:, None] * freqs[None]  # (grid, head_dim/4)
    table = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([table.cos(), table.sin()], dim=-1).flatten(0, 1)  # (grid², head_dim/2, 2)
    return torch.cat([torch.zeros(cond_tokens, head_dim // 2, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated pairwise by table (T, D/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1, self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False), nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Keys / values per layer, grown as positions are fed (B, H, T, D)."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.wqkv(x).split([c, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), table).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k.view(b, t, self.n_kv, self.head_dim), table).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            if cache.k[layer] is not None:
                past = cache.k[layer].shape[2]
                k, v = torch.cat([cache.k[layer], k], dim=2), torch.cat([cache.v[layer], v], dim=2)
            cache.k[layer], cache.v[layer] = k, v
        rep = self.n_head // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        allowed = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)  # (T, past + T) causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, table, cache, layer):
        h = x + self.attention(self.attention_norm(x), table, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + (cfg.class_dropout_prob > 0), cfg.dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)[:, None]  # (B, 1, C)


class CaptionMLP(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.caption_dim, cfg.dim, bias=False)
        self.fc2 = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cap_proj = CaptionMLP(cfg)
        self.register_buffer("uncond_embedding", torch.zeros(cfg.cls_token_num, cfg.caption_dim))  # stored

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(captions)  # (B, 120, C)


@register_family("llamagen", LlamaGenConfig, role="transformer")
class LlamaGenGPT(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg) if cfg.model_type == "c2i" else CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm, self.output = RMSNorm(cfg.dim, cfg.norm_eps), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(math.isqrt(cfg.block_size), cfg.dim // cfg.n_head, cfg.rope_base,
                                             cfg.cls_token_num), persistent=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """labels [B] (c2i; `null_class` for CFG's unconditional rows) or caption states [B,120,caption_dim]."""
        return self.cls_embedding(cond)

    def forward(self, cond: torch.Tensor | None, ids: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """The sequence [condition; image ids] (either part may be absent when the cache holds the earlier
        positions) -> logits [B, T, vocab] (float); logits[:, i] predicts the token after position i."""
        parts = ([self.embed_condition(cond)] if cond is not None else []) + \
            ([self.tok_embeddings(ids)] if ids is not None else [])
        h = torch.cat(parts, dim=1)  # (B, T, C)
        start = cache.length if cache is not None else 0
        if start + h.shape[1] > self.rope.shape[0]:
            raise ValueError(f"{start + h.shape[1]} positions: this model takes {self.rope.shape[0]}")
        table = self.rope[start:start + h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer(h, table, cache, i)
        if cache is not None:
            cache.length = start + h.shape[1]
        return self.output(self.norm(h)).float()
