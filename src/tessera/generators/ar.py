"""Stage II autoregressive generator: a decoder-only Transformer over image tokens (seed 000 Figure 11).

    unconditional:     [s_0 ... s_{N-2}]                       -> predicts s_1 ... s_{N-1}
                       (s_0 is drawn at random from the codebook, as seed 000 describes)
    text-conditioned:  [t_0 ... t_{L-1}] [SOI] [s_0 ... s_{N-2}] -> predicts s_0 ... s_{N-1}
                       (Parti / LlamaGen: projected prompt-encoder states as a prefix; padded text keys
                       are masked; a learned null condition replaces the caption for CFG)

Image positions know the 2-D grid: learned row + column embeddings. The network holds no sampling
loop; `tessera.sampling.ar` drives `forward` (recompute) or `prefill` + `decode_step` (KV cache).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.generators.tokens import TokenTransformerConfig
from tessera.nn.attention import Block, KVCache, normal_init
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class ARConfig(TokenTransformerConfig):
    """The shared token-Transformer fields; the text prefix makes the sequence longer."""

    def max_len(self) -> int:
        return self.max_text_tokens + self.num_tokens if self.conditional else self.num_tokens - 1


@register_family("ar", ARConfig, role="generator", paradigm="ar", sampler="ar-kv-cache", pipeline="tessera.pipelines.ar:ARPipeline",
                 task="ar",
                 cache="tessera.train.runs:prepare_token_inputs",
                 train=dict(batch_size=32, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=500, ema_decay=0.999,
                            max_steps=20000))
class ARTransformer(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.config = cfg
        h, w = cfg.grid
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.row_emb = nn.Parameter(torch.randn(h, cfg.dim) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(w, cfg.dim) * 0.02)
        if cfg.conditional:
            self.text_proj = nn.Linear(cfg.cond_dim, cfg.dim)
            self.text_pos = nn.Parameter(torch.randn(cfg.max_text_tokens, cfg.dim) * 0.02)
            self.null_text = nn.Parameter(torch.randn(cfg.dim) * 0.02)  # learned "no caption"
            self.soi = nn.Parameter(torch.randn(cfg.dim) * 0.02)        # start-of-image
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(normal_init)

    # ---- embeddings ---------------------------------------------------------------------------------
    def image_embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B,T] at grid indices start..start+T-1 -> [B,T,D] with 2-D positions."""
        w = self.config.grid[1]
        idx = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        pos = self.row_emb[idx // w] + self.col_emb[idx % w]  # (T, D)
        return self.tok_emb(tokens) + pos

    def prefix(self, cond: torch.Tensor, cond_mask: torch.Tensor,
               drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt states [B,L,C] -> prefix [B,L+1,D] (text + SOI) and its key mask [B,L+1].
        Rows where `drop` is True get the learned null condition instead of their caption."""
        b, length, _ = cond.shape
        if length > self.config.max_text_tokens:
            raise ValueError(f"prompt has {length} tokens; this model takes at most {self.config.max_text_tokens}")
        text = self.text_proj(cond) + self.text_pos[:length]  # (B, L, D)
        mask = cond_mask.bool()
        if drop is not None:
            d = drop.view(b, 1).bool()
            null = torch.zeros_like(text) + self.null_text
            text = torch.where(d[..., None], null, text)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            mask = torch.where(d, first, mask)
        soi = self.soi.expand(b, 1, -1)
        return torch.cat([text, soi], 1), torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], 1)

    # ---- full pass (training, and the recompute-everything sampling path) ---------------------------
    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits after every position. Conditional: tokens [B,T] (T >= 0) -> [B,T+1,V]
        predicting s_0..s_T. Unconditional: tokens [B,T] (T >= 1) -> [B,T,V] predicting s_1..s_T."""
        x = self.image_embed(tokens)
        if self.config.conditional:
            if cond is None or cond_mask is None:
                raise ValueError("this AR model is text-conditioned: pass cond and cond_mask")
            pre, key_valid = self.prefix(cond, cond_mask, drop)
            n_pre = pre.shape[1]
            x = torch.cat([pre, x], 1)
            key_valid = torch.cat([key_valid, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)], 1)
        else:
            n_pre, key_valid = 0, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        s = x.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        mask = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, S, S)
        for block in self.blocks:
            x = block(x, mask)
        start = n_pre - 1 if self.config.conditional else 0
        return self.head(self.norm(x[:, start:]))

    # ---- KV-cached decoding --------------------------------------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32, max_len: int | None = None,
                  device: torch.device | str = "cpu") -> KVCache:
        c = self.config
        return KVCache(c.depth, batch, c.heads, max_len or c.max_len(), c.dim // c.heads, dtype, device)

    def _run_cached(self, x: torch.Tensor, new_valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full")
        cache.key_valid[:, start:start + t] = new_valid
        causal = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)  # (T, S)
        mask = causal[None, None] & cache.key_valid[:, None, None, :start + t]  # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        cache.length = start + t
        return self.head(self.norm(x[:, -1]))

    def prefill(self, cache: KVCache, cond: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, first_token: torch.Tensor | None = None) -> torch.Tensor:
        """Start a sequence; returns the logits [B,V] of the next image token.
        Conditional: feeds the prefix (text + SOI) -> logits of s_0. Unconditional: feeds s_0 -> logits of s_1."""
        if self.config.conditional:
            pre, valid = self.prefix(cond, cond_mask, drop)
            return self._run_cached(pre, valid, cache)
        if first_token is None:
            raise ValueError("an unconditional model starts from a first token")
        return self._run_cached(self.image_embed(first_token.view(-1, 1)), torch.ones(cache.key_valid.shape[0], 1, device=first_token.device,
                                                                                       dtype=torch.bool), cache)

    def decode_step(self, token: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
        """Feed image token s_index [B]; returns the logits [B,V] of s_{index+1}."""
        x = self.image_embed(token.view(-1, 1), start=index)
        return self._run_cached(x, torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device), cache)

# decoder-only Transformers over 16x16 vq-f8 tokens, MiniLM (384-d) prompt prefix
register_preset("ar-s", "ar", dim=384, depth=8, heads=6, cond_dim=384, max_text_tokens=64)
register_preset("ar-m", "ar", dim=512, depth=12, heads=8, cond_dim=384, max_text_tokens=64)
# the bundled default: small enough (~5.8M parameters, 12 MB fp16) to sit beside the tokenizer
register_preset("ar-xs", "ar", default=True, dim=192, depth=6, heads=6, dropout=0.1, cond_dim=384, max_text_tokens=64)
register_preset("ar-s-uncond", "ar", dim=384, depth=8, heads=6, cond_dim=0)
