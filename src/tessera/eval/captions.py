"""Held-out caption test for a text-conditioned generator: the model should explain an image better
with its TRUE caption than with another image's caption (a derangement of the val split).

    AR:        mean token NLL, true vs shuffled caption
    masked:    masked-token NLL at fixed mask ratios and masks, true vs shuffled caption
    diffusion: denoising loss at fixed timesteps and noise, true vs shuffled caption

Reported as the mean margin with its spread (std, standard error) and the fraction of images where the
true caption wins. Training runs the same functions as its validation (`train/ar.py`, ...); this module
reads the caches itself (`tessera.data.caches`) and never imports the training tasks."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from tessera.data.caches import DiffusionData, TokenTextData
from tessera.errors import WrongModelError
from tessera.eval.metrics import margin_stats
from tessera.registry import family
from tessera.sampling.ar import token_nll
from tessera.sampling.diffusion import DiffusionConfig, Schedule, diffusion_loss
from tessera.sampling.masked import masked_nll, random_mask

VAL_RATIOS = (0.25, 0.5, 0.75, 1.0)                # mask ratios of the masked test
VAL_TIMESTEPS = (50, 200, 400, 600, 800, 950)      # timesteps of the diffusion test


def _pairs(idx, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, rows j, rows k whose captions j gets instead): k is j rolled by one, so no image keeps its own."""
    idx = torch.as_tensor(idx)
    if len(idx) < 2:
        raise ValueError("need at least 2 held-out images for the caption test")
    perm = torch.roll(torch.arange(len(idx)), 1)
    for s in range(0, len(idx), batch_size):
        yield s, idx[s:s + batch_size], idx[perm[s:s + batch_size]]


def _margin(score: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], data, idx, batch_size: int,
            name: str) -> dict[str, float]:
    """score(start, rows, caption rows) -> per-image loss [b]; lower is better."""
    true, shuffled = [], []
    for s, j, k in _pairs(idx, batch_size):
        true.append(score(s, j, j))
        shuffled.append(score(s, j, k))
    m = margin_stats(torch.cat(true), torch.cat(shuffled))
    return {f"{name}_true": m.pop("true"), f"{name}_shuffled": m.pop("shuffled"), **m}


def _caption(data, rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    return data.cond[rows].float().to(device), data.mask[rows].to(device)


@torch.no_grad()
def ar_margin(model: nn.Module, data: TokenTextData, idx, batch_size: int = 32) -> dict[str, float]:
    """Held-out mean token NLL with the true caption vs. a shuffled one (unconditional: NLL only)."""
    model.eval()
    dev = next(model.parameters()).device
    if not model.config.conditional:
        t = torch.cat([token_nll(model, data.x[j].to(dev)) for _, j, _ in _pairs(idx, batch_size)])
        return {"nll_true": float(t.mean()), "images": len(t)}
    return _margin(lambda s, j, k: token_nll(model, data.x[j].to(dev), *_caption(data, k, dev)),
                   data, idx, batch_size, "nll")


@torch.no_grad()
def masked_margin(model: nn.Module, data: TokenTextData, idx, ratios=VAL_RATIOS,
                  batch_size: int = 32) -> dict[str, float]:
    """Held-out masked-token NLL, each image at the same fixed masks (seeded by its row), mean over `ratios`."""
    model.eval()
    dev = next(model.parameters()).device

    def score(s, j, k):
        tokens, total = data.x[j].to(dev), torch.zeros(len(j), device=dev)
        for r in ratios:
            g = torch.Generator().manual_seed(int(r * 1000) * 100_003 + s)
            masked = random_mask(len(j), tokens.shape[1], torch.full((len(j),), float(r)), g).to(dev)
            total += masked_nll(model, tokens, masked, *_caption(data, k, dev))
        return total.cpu() / len(ratios)
    return _margin(score, data, idx, batch_size, "nll")


@torch.no_grad()
def diffusion_margin(model: nn.Module, data: DiffusionData, idx, schedule: Schedule, timesteps=VAL_TIMESTEPS,
                     batch_size: int = 32) -> dict[str, float]:
    """Held-out denoising loss, each image at the same timesteps and noise (seeded by its row), mean over t."""
    model.eval()
    dev = next(model.parameters()).device

    def score(s, j, k):
        x0, total = data.x[j].to(dev), torch.zeros(len(j), device=dev)
        c, m = _caption(data, k, dev)
        for t_val in timesteps:
            g = torch.Generator().manual_seed(int(t_val) * 100_003 + s)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            t = torch.full((len(j),), int(t_val), dtype=torch.long, device=dev)
            total += diffusion_loss(lambda x, tt: model(x, tt, c, m, None), schedule, x0, t, noise)
        return total.cpu() / len(timesteps)
    return _margin(score, data, idx, batch_size, "loss")


def caption_margin(model: nn.Module, data_dir: str | Path, cache: str | None = None, text: str | None = None,
                   limit: int | None = None, batch_size: int = 32) -> dict:
    """`cache` / `text` name the token-or-latent and caption caches under DATA; by default those the model
    was trained on (its meta's task settings), so the test scores the inputs the model expects."""
    kind = getattr(model, "kind", None)
    fam = family(kind) if kind else None
    if fam is None or fam.role != "generator":
        raise WrongModelError(f"no caption test for model kind {kind!r} (it needs a text-conditioned generator)")
    mc = model.config
    if not mc.conditional:
        raise ValueError("the caption test needs a text-conditioned model (cond_dim > 0)")
    task = dict((model.meta.task if model.meta else None) or {})
    text = text or task.get("text", "minilm")
    key = "latents" if fam.paradigm == "diffusion" else "tokens"
    cache = cache if cache is not None else task.get(key, "")
    if fam.paradigm == "diffusion":
        data = DiffusionData(data_dir, task.get("space", "latent"), cache, task.get("latent_scale", 1.0), text,
                             mc.sample_size, conditional=True).check(mc)
        schedule = Schedule(DiffusionConfig.from_dict(task.get("diffusion", {})))
        scores = diffusion_margin(model, data, data.indices("val")[:limit], schedule,
                                  task.get("val_timesteps", VAL_TIMESTEPS), batch_size)
    else:
        data = TokenTextData(data_dir, cache, text, conditional=True).check(mc)
        idx = data.indices("val")[:limit]
        scores = (masked_margin(model, data, idx, task.get("val_ratios", VAL_RATIOS), batch_size)
                  if fam.paradigm == "masked" else ar_margin(model, data, idx, batch_size))
    return {"kind": kind, key: cache, "text": text, **scores}
