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
    """Static keys / values per layer, (B, kv_heads, max_len, head_dim), preallocated and written at the fed
    positions. Attention reads the whole buffer with the unfed positions masked, so every decode step has
    the same shapes: no copy of the past per step, and one compiled graph serves every step."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False: a padded caption position
        self.max_len, self.length = max_len, 0


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor, cache: KVCache | None,
                layer: int, pos: torch.Tensor) -> torch.Tensor:
        """x [B,T,C] at positions `pos` [T]; `allowed` [T,S] the causal mask over the S keys (the cache's
        max_len with a cache, else T)."""
        b, t, c = x.shape
        q, k, v = self.wqkv(x).split([c, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), table).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k.view(b, t, self.n_kv, self.head_dim), table).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            cache.k[layer].index_copy_(2, pos, k.to(cache.k[layer].dtype))  # written at their positions
            cache.v[layer].index_copy_(2, pos, v.to(cache.v[layer].dtype))
            k, v = cache.k[layer].to(q.dtype), cache.v[layer].to(q.dtype)  # (B, H_kv, max_len, D)
        if self.n_head != self.n_kv:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, table, allowed, cache, layer, pos):
        h = x + self.attention(self.attention_norm(x), table, allowed, cache, layer, pos)
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
        self._step = None  # compile_step()
        self.register_buffer("rope", rope_2d(math.isqrt(cfg.block_size), cfg.dim // cfg.n_head, cfg.rope_base,
                                             cfg.cls_token_num), persistent=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """labels [B] (c2i; `null_class` for CFG's unconditional rows) or caption states [B,120,caption_dim]."""
        return self.cls_embedding(cond)

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """A static cache for `batch` rows over the whole sequence (condition + image tokens)."""
        cfg, w = self.config, self.tok_embeddings.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head or cfg.n_head, self.rope.shape[0], cfg.dim // cfg.n_head,
                       dtype or w.dtype, w.device)

    def forward(self, cond: torch.Tensor | None, ids: torch.Tensor | None, cache: KVCache | None = None,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sequence [condition; image ids] (either part may be absent when the cache holds the earlier
        positions) -> logits [B, T, vocab] (float); logits[:, i] predicts the token after position i.
        `cond_mask` [B,L] (t2i): False marks padded caption positions, which no position attends to (but
        itself, so that its attention is defined), as LlamaGen's generate masks them."""
        parts = ([self.embed_condition(cond)] if cond is not None else []) + \
            ([self.tok_embeddings(ids)] if ids is not None else [])
        h = torch.cat(parts, dim=1)  # (B, T, C)
        start = cache.length if cache is not None else 0
        if start + h.shape[1] > self.rope.shape[0]:
            raise ValueError(f"{start + h.shape[1]} positions: this model takes {self.rope.shape[0]}")
        pos = torch.arange(start, start + h.shape[1], device=h.device)
        valid = None
        if cond_mask is not None:
            if cond is None or cond_mask.shape != h.shape[:1] + (self.config.cls_token_num,):
                raise ValueError(f"cond_mask: one flag per condition position, [B, {self.config.cls_token_num}]")
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            valid[:, :cond_mask.shape[1]] = cond_mask.bool()
            if cache is not None:
                cache.valid[:, start:start + h.shape[1]] = valid
        logits = self.run(h, pos, cache, valid)
        if cache is not None:
            cache.length = start + h.shape[1]
        return logits

    def decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, ids [B,1], at the cache's next position -> logits [B, vocab] (through the compiled
        step after `compile_step()`: one graph for every position, the position being a tensor input)."""
        if cache.length >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} positions)")
        pos = torch.tensor([cache.length], device=ids.device)
        logits = (self._step or self.run)(self.tok_embeddings(ids), pos, cache)[:, -1]
        cache.length += 1
        return logits

    def compile_step(self, on: bool = True) -> None:
        """torch.compile the one-token step (inductor, weights frozen into the graph: compile after any change
        to them); the first step compiles (~20 s for GPT-B on 2 cores)."""
        self._step = torch.compile(self.run, dynamic=False, options={"freezing": True}) if on else None

    def run(self, h: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None,
            valid: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded positions h [B,T,C] at `pos` [T] -> logits [B,T,vocab] (float). With a cache every key
        position is read, the unfed ones masked: a one-token step has one set of shapes (`compiled_step`).
        `valid` [B,S] (else the cache's): keys that may be attended to besides the query's own position."""
        keys = torch.arange(cache.max_len if cache is not None else h.shape[1], device=h.device)
        allowed = keys[None] <= pos[:, None]  # (T, S) causal
        valid = cache.valid if cache is not None and self.config.model_type == "t2i" else valid
        if valid is not None:
            own = keys[None] == pos[:, None]  # (T, S)
            allowed = (allowed[None] & (valid[:, None, :] | own[None]))[:, None]  # (B, 1, T, S)
        table = self.rope[pos]
        for i, layer in enumerate(self.layers):
            h = layer(h, table, allowed, cache, i, pos)
        return self.output(self.norm(h)).float()
