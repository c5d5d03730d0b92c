"""Training task for the AR generator: next-token cross-entropy over cached token grids (seed 000),
prompts from the caption-embedding cache, captions dropped for `cond_drop` of the samples (CFG)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from tessera.config import Config
from tessera.data.caches import TokenTextData
from tessera.eval.captions import ar_margin
from tessera.generators.ar import ARTransformer
from tessera.sampling.ar import token_nll


@dataclasses.dataclass
class ARTaskConfig(Config):
    tokens: str = ""               # DATA/tokens/<name> folder written by `tessera tokenize` ('' = the only one)
    text: str = "minilm"           # DATA/text/<name> folder written by `tessera data embed-captions`
    cond_drop: float = 0.1         # caption -> null condition (classifier-free guidance training)
    val_images: int = 256


class ARTask:
    def __init__(self, model: ARTransformer, data_dir: str | Path, cfg: ARTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.data = TokenTextData(data_dir, cfg.tokens, cfg.text, mc.conditional).check(mc)
        self.dataset = self.data.view("train")
        self.val_idx = self.data.indices("val")[: cfg.val_images]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step: int):
        if self.model.config.conditional:
            tokens, cond, mask = batch
            drop = (torch.rand(tokens.shape[0]) < self.cfg.cond_drop).to(tokens.device)
            loss = token_nll(self.model, tokens, cond, mask, drop).mean()
        else:
            loss = token_nll(self.model, batch).mean()
        return {"model": loss}, {"loss": float(loss.detach())}

    def validate(self, model: ARTransformer, out_dir: Path, step: int) -> dict[str, float]:
        if len(self.val_idx) < 2:
            return {}
        m = ar_margin(model, self.data, self.val_idx)
        return {k: v for k, v in m.items() if k != "images"}


# what `tessera train ar` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = ARTask, ARTaskConfig, "ar-s"
