"""Training task for the masked generator (seed 003 Muse / MaskGIT): mask a fraction r of each token
grid, r drawn from the cosine schedule (p(r) = 2/pi (1 - r^2)^(-1/2), i.e. r = cos(pi u / 2) with u
uniform), cross-entropy on the masked positions only; captions dropped for `cond_drop` of the samples."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from tessera.data.caches import TokenTextData
from tessera.eval.captions import VAL_RATIOS, masked_margin
from tessera.generators.masked import MaskedTransformer
from tessera.sampling.masked import masked_nll, random_mask
from tessera.train.ar import ARTaskConfig


@dataclasses.dataclass
class MaskedTaskConfig(ARTaskConfig):
    """The token-task fields of `train/ar.py`, plus the mask ratios of the caption test."""
    val_ratios: tuple[float, ...] = VAL_RATIOS   # mask ratios of the held-out caption test


class MaskedTask:
    def __init__(self, model: MaskedTransformer, data_dir: str | Path, cfg: MaskedTaskConfig):
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
        tokens, cond, mask = batch if self.model.config.conditional else (batch, None, None)
        b, n = tokens.shape
        ratio = torch.cos(torch.rand(b) * math.pi / 2).to(tokens.device)  # r ~ p(r) = 2/pi (1 - r^2)^(-1/2)
        masked = random_mask(b, n, ratio)
        drop = (torch.rand(b) < self.cfg.cond_drop).to(tokens.device) if cond is not None else None
        loss = masked_nll(self.model, tokens, masked, cond, mask, drop).mean()
        return {"model": loss}, {"loss": float(loss.detach()), "mask_ratio": float(ratio.mean())}

    def validate(self, model: MaskedTransformer, out_dir: Path, step: int) -> dict[str, float]:
        if not model.config.conditional or len(self.val_idx) < 2:
            return {}
        m = masked_margin(model, self.data, self.val_idx, self.cfg.val_ratios)
        return {k: v for k, v in m.items() if k != "images"}


# what `tessera train masked` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = MaskedTask, MaskedTaskConfig, "masked-s"
