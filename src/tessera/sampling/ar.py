"""Autoregressive sampling over a `logits_fn` (the network never holds this loop).

    logits_fn(tokens [R, t]) -> logits [R, V] of token t, for R rows

`sample` draws N tokens one by one with temperature, top-k, top-p (nucleus) and classifier-free
guidance: with CFG the rows are [conditional; unconditional] in ONE batched call, and
    logits = l_uncond + scale * (l_cond - l_uncond)            (Parti / LlamaGen)
applied to the first `cfg_interval` tokens (all if < 0). Two interchangeable `logits_fn` builders
wrap an `ARTransformer`: `cached_logits_fn` (static KV cache) and `recompute_logits_fn` (full pass
per token); with the same generator they give the same tokens. `token_nll` is the objective the same
network trains on (used by training and by the held-out caption test).
"""
from __future__ import annotations

from typing import Callable

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass >= top_p to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = top_k_top_p_filter(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(logits_fn: LogitsFn, batch: int, num_tokens: int, *, generator: torch.Generator,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
           cfg_interval: int = -1, first_tokens: torch.Tensor | None = None,
           callback: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Returns tokens [batch, num_tokens] on `device` (where the logits_fn's network runs; draws stay on the
    CPU generator). `first_tokens` [batch] starts the sequence (unconditional
    models: drawn at random from the codebook by the caller). With cfg_scale != 1 the logits_fn must
    serve 2*batch rows, conditional rows first."""
    guided = cfg_scale != 1.0
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    if first_tokens is not None:
        tokens = first_tokens.view(batch, 1).long().to(device)
    while tokens.shape[1] < num_tokens:
        t = tokens.shape[1]
        logits = logits_fn(torch.cat([tokens, tokens]) if guided else tokens).float()
        if guided:
            cond, uncond = logits.chunk(2)
            scale = cfg_scale if (cfg_interval < 0 or t < cfg_interval) else 1.0
            logits = uncond + scale * (cond - uncond)
        nxt = sample_next(logits.cpu(), generator, temperature, top_k, top_p).to(device)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if callback is not None:
            callback(t + 1, num_tokens)
    return tokens


def _cond_rows(cond, cond_mask, batch: int, guided: bool):
    """Conditional rows, and with CFG the same prompts again marked 'dropped' (null condition)."""
    if cond is None:
        return None, None, None
    drop = torch.zeros(batch, dtype=torch.bool, device=cond.device)
    if guided:
        cond, cond_mask = torch.cat([cond, cond]), torch.cat([cond_mask, cond_mask])
        drop = torch.arange(2 * batch, device=cond.device) >= batch  # (2B,) the second half: null condition
    return cond, cond_mask, drop


def cached_logits_fn(model, batch: int, cond=None, cond_mask=None, guided: bool = False,
                     dtype: torch.dtype = torch.float32) -> LogitsFn:
    """KV-cached: the first call fills the prefix, every later call feeds only the newest token."""
    cond, cond_mask, drop = _cond_rows(cond, cond_mask, batch, guided)
    rows = batch * (2 if guided else 1)
    cache = model.new_cache(rows, dtype, device=next(model.parameters()).device)
    state = {"started": False, "fed": 0}  # fed = image tokens already in the cache

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        if not state["started"]:
            state["started"] = True
            if model.config.conditional:
                logits = model.prefill(cache, cond, cond_mask, drop)  # -> logits of s_0
            else:
                logits = model.prefill(cache, first_token=tokens[:, 0])  # -> logits of s_1
                state["fed"] = 1
        for i in range(state["fed"], tokens.shape[1]):
            logits = model.decode_step(tokens[:, i], i, cache)
            state["fed"] = i + 1
        return logits

    return fn


def prefix_logits_fn(model, cond: torch.Tensor, null: torch.Tensor | None = None,
                     cond_mask: torch.Tensor | None = None) -> LogitsFn:
    """KV-cached, for networks whose sequence starts with their condition (LlamaGen: `model(cond, ids, cache)`):
    the first call prefills the condition rows ([cond; null] with CFG, `null` the unconditional condition;
    `cond_mask` [R,L]: their valid condition positions), every later call feeds only the newest token."""
    rows = cond if null is None else torch.cat([cond, null])
    cache, state = model.new_cache(rows.shape[0]), {"fed": 0, "logits": None}

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        if state["logits"] is None:  # (R, V): the first image token's logits
            state["logits"] = model(rows, None, cache, cond_mask=cond_mask)[:, -1]
        for i in range(state["fed"], tokens.shape[1]):
            state["logits"] = model.decode_step(tokens[:, i:i + 1], cache)
            state["fed"] = i + 1
        return state["logits"]

    return fn


def recompute_logits_fn(model, batch: int, cond=None, cond_mask=None, guided: bool = False) -> LogitsFn:
    """No cache: every call runs the whole sequence (the reference path)."""
    cond, cond_mask, drop = _cond_rows(cond, cond_mask, batch, guided)

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        if model.config.conditional:
            return model(tokens, cond, cond_mask, drop)[:, -1]
        return model(tokens)[:, -1]

    return fn


def token_nll(model, tokens: torch.Tensor, cond=None, mask=None, drop=None) -> torch.Tensor:
    """The AR objective (seed 000, next-token cross-entropy): per-image mean token NLL [B] of `tokens`
    [B, N] under `model`, with the caption (cond [B,L,D], mask [B,L]) when the model is conditional."""
    from tessera.data.captions import trim_padding

    if mask is not None:
        cond, mask = trim_padding(cond, mask)
    logits = model(tokens[:, :-1], cond, mask, drop) if model.config.conditional else model(tokens[:, :-1])
    target = tokens if model.config.conditional else tokens[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # (B, N)
    return nll.mean(1)
