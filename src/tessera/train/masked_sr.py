"""Training task for Muse's super-resolution transformer (seed 003, 3.3): the masked objective of
`train/masked.py` on the full-resolution grid (mask ratio r = cos(pi u / 2), cross-entropy on the masked
positions), conditioned on the grid of the same image at half size and on its caption (dropped for
`cond_drop` of the samples: classifier-free guidance on the text).

Validation on the held-out split: the masked NLL with everything masked (pure super-resolution) and at
half masked, and the same with the low-resolution grids shuffled among the images (`low_margin` > 0: the
model reads its low-resolution input)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from tessera.data.caches import SRTokenTextData
from tessera.generators.masked_sr import MaskedSRTransformer, WithLow
from tessera.sampling.masked import masked_nll, random_mask
from tessera.train.ar import ARTaskConfig


@dataclasses.dataclass
class MaskedSRTaskConfig(ARTaskConfig):
    low_tokens: str = ""           # DATA/tokens/<name>-down<k>: the grids of the reduced images
    tokenizer: str = "vq-f8"       # the tokenizer of both caches (the pipeline decodes with it)
    val_images: int = 64


class MaskedSRTask:
    def __init__(self, model: MaskedSRTransformer, data_dir: str | Path, cfg: MaskedSRTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.data = SRTokenTextData(data_dir, cfg.tokens, cfg.low_tokens, cfg.text, mc.conditional).check(mc)
        self.dataset = self.data.view("train")
        self.val_idx = self.data.indices("val")[: cfg.val_images]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step: int):
        tokens, low, cond, mask = batch if self.model.config.conditional else (*batch, None, None)
        b, n = tokens.shape
        ratio = torch.cos(torch.rand(b) * math.pi / 2).to(tokens.device)  # r ~ p(r) = 2/pi (1 - r^2)^(-1/2)
        drop = (torch.rand(b) < self.cfg.cond_drop).to(tokens.device) if cond is not None else None
        loss = masked_nll(WithLow(self.model, low), tokens, random_mask(b, n, ratio), cond, mask, drop).mean()
        return {"model": loss}, {"loss": float(loss.detach()), "mask_ratio": float(ratio.mean())}

    @torch.no_grad()
    def validate(self, model: MaskedSRTransformer, out_dir: Path, step: int) -> dict[str, float]:
        if len(self.val_idx) < 2:
            return {}
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        idx = torch.as_tensor(self.val_idx)
        tokens, low = self.data.x[idx].to(device), self.data.low[idx].to(device)
        cond = mask = None
        if self.data.cond is not None:
            cond, mask = self.data.cond[idx].float().to(device), self.data.mask[idx].to(device)
        g = torch.Generator().manual_seed(0)
        shuffled = low[torch.roll(torch.arange(len(idx)), 1)]  # every image paired with another's low grid
        out = {}
        for ratio in (1.0, 0.5):
            masked = random_mask(len(idx), tokens.shape[1], torch.full((len(idx),), ratio), g).to(device)
            nll = masked_nll(WithLow(model, low), tokens, masked, cond, mask).mean()
            other = masked_nll(WithLow(model, shuffled), tokens, masked, cond, mask).mean()
            out[f"val_nll_r{ratio:g}"], out[f"low_margin_r{ratio:g}"] = float(nll), float(other - nll)
        model.train(was)
        return out


# what `tessera train masked_sr` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = MaskedSRTask, MaskedSRTaskConfig, "masked-sr-xs"
