"""Held-out caption test for a text-conditioned generator: the model should explain an image better
with its TRUE caption than with another image's caption (a derangement of the val split).

    AR:        mean token NLL, true vs shuffled caption
    masked:    masked-token NLL at fixed mask ratios and masks, true vs shuffled caption
    diffusion: denoising loss at fixed timesteps and noise, true vs shuffled caption

Reported as the mean margin with its spread (std, standard error) and the fraction of images where the
true caption wins."""
from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from tessera.errors import WrongModelError
from tessera.registry import family


def caption_margin(model: nn.Module, data_dir: str | Path, cache: str | None = None, text: str | None = None,
                   limit: int | None = None, batch_size: int = 32) -> dict:
    """`cache` / `text` name the token-or-latent and caption caches under DATA; by default those the model
    was trained on (its meta.json), so the test scores the inputs the model expects."""
    if not model.config.conditional:
        raise ValueError("the caption test needs a text-conditioned model (cond_dim > 0)")
    kind = getattr(model, "kind", None)
    task_meta = dict((model.meta.task if model.meta else None) or {})
    if text is not None:
        task_meta["text"] = text
    task_meta["val_images"] = limit if limit is not None else 1 << 30
    fam = family(kind) if kind else None
    if fam is None or fam.role != "generator":
        raise WrongModelError(f"no caption test for model kind {kind!r} (it needs a text-conditioned generator)")
    mod = importlib.import_module(f"tessera.train.{fam.task}")
    Task, TaskConfig = mod.Task, mod.TaskConfig
    key = "latents" if fam.paradigm == "diffusion" else "tokens"
    if cache is not None:
        task_meta[key] = cache
    cfg = TaskConfig.from_dict(task_meta)
    task = Task(model, data_dir, cfg)
    return {"kind": kind, key: getattr(cfg, key), "text": cfg.text, **task.caption_margin(model, batch_size)}
