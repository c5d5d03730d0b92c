"""Iterative parallel decoding (seed 003 "Iterative Parallel Decoding"; MaskGIT, Chang et al. 2022).

Start from a grid where every unknown token is [MASK]. At step i of S: predict every position, sample a
token for each still-masked one, score it by its log-probability plus Gumbel noise whose temperature
anneals to 0 (MaskGIT's choice temperature), keep the most confident and re-mask the rest so that
exactly `masked_counts(n, S)[i]` unknown tokens stay masked (the cosine schedule
gamma(r) = cos(pi r / 2), seed 003). Known tokens (inpainting / outpainting) are never changed.

`sample` runs over any `logits_fn(tokens [B,N]) -> logits [B,N,V]`; `guided_logits_fn` builds one with
classifier-free guidance from a network (conditional and unconditional rows in ONE forward).
`random_mask` / `masked_nll` are the training objective (used by training and the caption test).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from tessera.sampling.categorical import categorical

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def mask_ratio(r: torch.Tensor | float) -> torch.Tensor:
    """gamma(r) = cos(pi r / 2): the fraction still masked at progress r in [0, 1] (seed 003)."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float64) * math.pi / 2)


def masked_counts(num_unknown: torch.Tensor | int, steps: int) -> torch.Tensor:
    """[B, steps]: how many unknown tokens are still masked after each step: floor(n gamma((i+1)/S)),
    at most one less than after the step before (every step reveals >= 1 while any are masked), 0 at the end."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    n = torch.as_tensor(num_unknown, dtype=torch.long).reshape(-1)
    out, prev = [], n
    for i in range(steps):
        m = torch.floor(n.double() * mask_ratio((i + 1) / steps)).long()
        m = torch.minimum(m, (prev - 1).clamp(min=0))
        out.append(m)
        prev = m
    return torch.stack(out, dim=1)


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp(min=1e-20))


@torch.no_grad()
def sample(logits_fn: LogitsFn, tokens: torch.Tensor, mask_id: int, steps: int = 12,
           generator: torch.Generator | None = None, temperature: float = 1.0, choice_temperature: float = 4.5,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """tokens [B,N]: known ids, `mask_id` where unknown. Returns [B,N] with every unknown token filled."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    x = tokens.clone()
    b, n = x.shape
    counts = masked_counts((x == mask_id).sum(1), steps)  # (B, S)
    ranks = torch.arange(n).expand(b, n)
    for i in range(steps):
        still = x == mask_id  # (B, N)
        logits = logits_fn(x).float()  # (B, N, V)
        rows = still.view(-1).nonzero().squeeze(1)  # flat positions still masked: only these are drawn
        probs = torch.softmax(logits.reshape(b * n, -1)[rows] / temperature, dim=-1)  # (M, V)
        tok = categorical(probs, generator)  # (M,)
        drawn = x.clone().view(-1)
        drawn[rows] = tok  # known / already revealed tokens stay
        logp = torch.full((b * n,), math.inf)  # never re-masked
        logp[rows] = torch.log(probs.gather(1, tok[:, None]).squeeze(1).clamp(min=1e-30))
        drawn, logp = drawn.view(b, n), logp.view(b, n)
        conf = logp + choice_temperature * (1 - (i + 1) / steps) * gumbel((b, n), generator)
        order = conf.argsort(dim=1)  # ascending: least confident first
        rank = torch.empty_like(order).scatter_(1, order, ranks)  # position -> rank
        remask = rank < counts[:, i:i + 1]  # the m least confident still-masked positions
        x = torch.where(remask, torch.full_like(x, mask_id), drawn)
        if callback is not None:
            callback(i + 1, steps)  # steps done
    return x


def guided_logits_fn(model, cond: torch.Tensor | None, mask: torch.Tensor | None,
                     cfg_scale: float = 1.0) -> LogitsFn:
    """logits = u + s (c - u) (classifier-free guidance), c and u from ONE forward over [x; x]."""
    if cond is None or cfg_scale == 1.0:
        return lambda x: model(x, cond, mask)

    def fn(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        drop = torch.arange(2 * b, device=x.device) >= b  # (2B,) the second half: null condition
        out = model(torch.cat([x, x]), torch.cat([cond, cond]), torch.cat([mask, mask]), drop)  # (2B, N, V)
        c, u = out.float().chunk(2)
        return u + cfg_scale * (c - u)

    return fn


def random_mask(b: int, n: int, ratio: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B,N] bool with ceil(ratio_b * N) (at least 1) random positions True per row."""
    k = torch.ceil(ratio * n).long().clamp(1, n)  # (B,)
    scores = torch.rand(b, n, generator=generator).to(ratio.device)
    rank = scores.argsort(1).argsort(1)  # (B, N): a random permutation rank per position
    return rank < k[:, None]


def masked_nll(model, tokens: torch.Tensor, masked: torch.Tensor, cond=None, mask=None, drop=None) -> torch.Tensor:
    """The masked objective (seed 003, MaskGIT/Muse): per-image mean NLL [B] of `tokens` [B, N] over the
    positions `masked` [B, N] replaced by the mask token."""
    from tessera.data.captions import trim_padding

    if mask is not None:
        cond, mask = trim_padding(cond, mask)
    inp = torch.where(masked, torch.full_like(tokens, model.config.mask_id), tokens)
    logits = model(inp, cond, mask, drop)  # (B, N, V)
    b, n, v = logits.shape  # the class axis last: cross_entropy over a transposed (B, V, N) view is ~10x slower
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(b * n, v), tokens.reshape(-1), reduction="none")
    nll = nll.view(b, n)  # (B, N)
    return (nll * masked).sum(1) / masked.sum(1)


# ---- aMUSEd's rule (diffusers' AmusedScheduler), for its released checkpoints --------------------------
def amused_temperatures(steps: int, temperature: float | tuple[float, float] = (2.0, 0.0)) -> torch.Tensor:
    """The choice temperature of each step: a linear ramp (start, end), or (t, 0.01) from a single value."""
    start, end = (temperature, 0.01) if isinstance(temperature, (int, float)) else temperature
    return torch.linspace(start, end, steps)


def amused_step(logits: torch.Tensor, ids: torch.Tensor, step: int, steps: int, mask_id: int,
                temperatures: torch.Tensor, generator: torch.Generator | None = None, schedule: str = "cosine",
                start_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step` (0 = first) of `steps`: logits [B,N,V], ids [B,N] -> (next ids, predicted ids). Every masked
    position gets a token drawn from its softmax; then, but at the last step, the floor(N * gamma) least
    confident (log p + Gumbel noise at this step's temperature; at least one, at most all-but-one of the
    masked) are masked again, gamma(r) = cos(pi r / 2) (or 1 - r) at r = (step + 1) / steps. The draws come
    in diffusers' order (multinomial, then the Gumbel uniforms), so the same generator gives its tokens."""
    b, n, v = logits.shape
    unknown = ids == mask_id
    probs = logits.float().softmax(-1)
    drawn = torch.multinomial(probs.reshape(-1, v), 1, generator=generator).view(b, n)
    pred = torch.where(unknown, drawn, ids)
    if step == steps - 1:
        return pred, pred
    r = torch.tensor((step + 1) / steps, dtype=torch.float32)
    gamma = torch.cos(r * math.pi / 2) if schedule == "cosine" else 1 - r
    count = (n * (start_ratio * gamma)).floor()
    count = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1, count), min=1)  # (B, 1)
    chosen = probs.gather(-1, pred[..., None])[..., 0]
    chosen = torch.where(unknown, chosen, torch.finfo(chosen.dtype).max)  # known tokens are never re-masked
    u = torch.zeros_like(chosen).uniform_(0, 1, generator=generator)
    confidence = chosen.clamp(1e-20).log() + temperatures[step] * -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))
    cutoff = confidence.sort(dim=-1).values.gather(1, count.long())
    return torch.where(confidence < cutoff, mask_id, pred), pred
