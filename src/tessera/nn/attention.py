"""Transformer pieces shared by the AR, masked and DiT models: SDPA attention with a static KV cache,
an MLP, and a pre-norm block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normal_init(m: nn.Module) -> None:
    """GPT-2's initialisation for `model.apply`: Linear / Embedding weights N(0, 0.02), Linear biases zero."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class KVCache:
    """Static, preallocated keys/values per layer: (B, heads, max_len, head_dim), written by index."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # padding mask of cached keys
        self.length = 0  # positions filled so far
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # residual dropout on the output, not on the attention probabilities: dropout_p > 0 forces SDPA's
        # unfused math path and a Bernoulli draw per (B, heads, T, S) entry, ~3x slower on CPU.
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x [B,T,D]; mask [B,1,T,S] bool (True = attend). With a cache, x holds positions
        cache.length .. cache.length+T-1 and attends to every cached position before it."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k.to(cache.k[layer].dtype)
            cache.v[layer][:, :, start:start + t] = v.to(cache.v[layer].dtype)
            k = cache.k[layer][:, :, :start + t].to(q.dtype)  # (B, heads, S, head_dim), S = start + T
            v = cache.v[layer][:, :, :start + t].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, head_dim)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, t, d)))


class CrossAttention(nn.Module):
    """Queries from x [B,T,D], keys/values from a context [B,L,C] (prompt states); `mask` [B,L] bool
    marks real context tokens (True = attend)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        kv = self.kv(context).view(b, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, L, hd)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, T, hd)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)) (seed 000 Figure 11, GPT-2 ordering)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-norm, bidirectional: x + self-attn(norm(x)), x + cross-attn(norm(x), context), x + mlp(norm(x))
    (Muse's and Stable Diffusion's transformer block). `mask` [B,L] marks real context tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2, self.cross = nn.LayerNorm(dim), CrossAttention(dim, context_dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), context, mask)
        return x + self.mlp(self.norm3(x))
