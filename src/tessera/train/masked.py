"""Training task for the masked generator (seed 003 Muse / MaskGIT): mask a fraction r of each token
grid, r drawn from the cosine schedule (p(r) = 2/pi (1 - r^2)^(-1/2), i.e. r = cos(pi u / 2) with u
uniform), cross-entropy on the masked positions only; captions dropped for `cond_drop` of the samples."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.eval.metrics import margin_stats
from tessera.generators.masked import MaskedTransformer
from tessera.text.cache import trim_padding
from tessera.train.ar import TokenSplit, TokenTextData


@dataclasses.dataclass
class MaskedTaskConfig(Config):
    tokens: str = ""               # DATA/tokens/<name> ('' = the only one)
    text: str = "minilm"           # DATA/text/<name>
    cond_drop: float = 0.1
    val_images: int = 256
    val_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)   # mask ratios of the held-out caption test


def random_mask(b: int, n: int, ratio: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B,N] bool with ceil(ratio_b * N) (at least 1) random positions True per row."""
    k = torch.ceil(ratio * n).long().clamp(1, n)  # (B,)
    scores = torch.rand(b, n, generator=generator).to(ratio.device)
    rank = scores.argsort(1).argsort(1)  # (B, N): a random permutation rank per position
    return rank < k[:, None]


class MaskedTask:
    def __init__(self, model: MaskedTransformer, data_dir: str | Path, cfg: MaskedTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.data = TokenTextData(data_dir, cfg, mc.conditional).check(mc)
        self.dataset = TokenSplit(self.data, self.data.indices("train"))
        self.val_idx = self.data.indices("val")[: cfg.val_images]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def _nll(self, model: MaskedTransformer, tokens, masked, cond=None, mask=None, drop=None) -> torch.Tensor:
        """Per-image mean NLL over the masked positions [B]."""
        if mask is not None:
            cond, mask = trim_padding(cond, mask)
        inp = torch.where(masked, torch.full_like(tokens, model.config.mask_id), tokens)
        logits = model(inp, cond, mask, drop)  # (B, N, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # (B, N)
        return (nll * masked).sum(1) / masked.sum(1)

    def losses(self, batch, step: int):
        tokens, cond, mask = batch if self.model.config.conditional else (batch, None, None)
        b, n = tokens.shape
        ratio = torch.cos(torch.rand(b) * math.pi / 2).to(tokens.device)  # r ~ p(r) = 2/pi (1 - r^2)^(-1/2)
        masked = random_mask(b, n, ratio)
        drop = (torch.rand(b) < self.cfg.cond_drop).to(tokens.device) if cond is not None else None
        loss = self._nll(self.model, tokens, masked, cond, mask, drop).mean()
        return {"model": loss}, {"loss": float(loss.detach()), "mask_ratio": float(ratio.mean())}

    @torch.no_grad()
    def caption_margin(self, model: MaskedTransformer, batch_size: int = 32) -> dict[str, float]:
        """Held-out masked-token NLL with the true caption vs. a shuffled caption (a derangement), each
        image at the same fixed masks (seeded by its row), averaged over `val_ratios`."""
        model.eval()
        idx = torch.as_tensor(self.val_idx)
        if len(idx) < 2:
            raise ValueError("need at least 2 held-out images for the caption test")
        perm = torch.roll(torch.arange(len(idx)), 1)
        true_nll, shuf_nll = [], []
        for s in range(0, len(idx), batch_size):
            j, k = idx[s:s + batch_size], idx[perm[s:s + batch_size]]
            tokens = self.data.tokens[j].flatten(1)
            tl, sl = torch.zeros(len(j)), torch.zeros(len(j))
            for r in self.cfg.val_ratios:
                g = torch.Generator().manual_seed(int(r * 1000) * 100_003 + s)
                masked = random_mask(len(j), tokens.shape[1], torch.full((len(j),), float(r)), g)
                tl += self._nll(model, tokens, masked, self.data.cond[j].float(), self.data.mask[j])
                sl += self._nll(model, tokens, masked, self.data.cond[k].float(), self.data.mask[k])
            true_nll.append(tl / len(self.cfg.val_ratios))
            shuf_nll.append(sl / len(self.cfg.val_ratios))
        m = margin_stats(torch.cat(true_nll), torch.cat(shuf_nll))
        return {"nll_true": m.pop("true"), "nll_shuffled": m.pop("shuffled"), **m}

    def validate(self, model: MaskedTransformer, out_dir: Path, step: int) -> dict[str, float]:
        if not model.config.conditional or len(self.val_idx) < 2:
            return {}
        return {k: v for k, v in self.caption_margin(model).items() if k != "images"}


# what `tessera train masked` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = MaskedTask, MaskedTaskConfig, "masked-s"
