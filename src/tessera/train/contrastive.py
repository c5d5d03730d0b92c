"""Training task for the contrastive image-text model (eval/contrastive.py): symmetric InfoNCE over
(image, caption) pairs of a prepared folder, captions as the frozen prompt encoder's pooled vectors
from the caption cache (`tessera data embed-captions`), images as seeded random crops + flips.
Validation: retrieval accuracy on the held-out split, both directions."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.data.dataset import ShardImages
from tessera.eval.clipscore import retrieval_metrics
from tessera.eval.contrastive import ImageTextModel, clip_loss
from tessera.superres.degrade import to_uint8


@dataclasses.dataclass
class ContrastiveTaskConfig(Config):
    text: str = "minilm"            # DATA/text/<name> caption cache; must be the model's text_encoder
    min_crop: float = 0.7           # random crops keep at least this fraction of each side
    flip: bool = True
    val_images: int = 1024

    def __post_init__(self):
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min_crop={self.min_crop} must be in (0, 1]")


def pooled_captions(data_dir: str | Path, name: str, keys: list[str]) -> torch.Tensor:
    """DATA/text/<name>/pooled.npy rows for `keys` -> [N,D] float."""
    text_dir = Path(data_dir) / "text" / name
    if not (text_dir / "index.json").is_file():
        raise FileNotFoundError(f"{text_dir}: no caption cache; run `tessera data embed-captions` first")
    index = json.loads((text_dir / "index.json").read_text())
    row = {k: i for i, k in enumerate(index["keys"])}
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{text_dir} lacks {len(missing)} images of the split, e.g. {missing[:3]}; re-embed")
    pooled = np.load(text_dir / "pooled.npy")
    return torch.from_numpy(pooled[[row[k] for k in keys]].astype(np.float32))


class Pairs(torch.utils.data.Dataset):
    """(index, aug_seed) -> (image [3,s,s] in [-1,1], pooled caption [D])."""

    def __init__(self, images: torch.Tensor, pooled: torch.Tensor, size: int, cfg: ContrastiveTaskConfig):
        self.images, self.pooled, self.size, self.cfg = images, pooled, size, cfg

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        g = torch.Generator().manual_seed(seed)
        x = self.images[i]
        _, h, w = x.shape
        frac = self.cfg.min_crop + (1 - self.cfg.min_crop) * float(torch.rand((), generator=g))
        ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        x = x[:, top:top + ch, left:left + cw].float().div(127.5).sub(1)[None]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        if self.cfg.flip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        return x, self.pooled[i]


def _load_split(data_dir, split: str, text: str, limit: int | None = None):
    ds = ShardImages(data_dir, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError(f"{data_dir}: the {split} split is empty")
    images = torch.stack([to_uint8(ds.image(i)) for i in range(n)])  # (N, 3, H, W) uint8
    return images, pooled_captions(data_dir, text, ds.keys[:n]), ds.captions[:n]


class ContrastiveTask:
    def __init__(self, model: ImageTextModel, data_dir: str | Path, cfg: ContrastiveTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        if Path(mc.text_encoder).name != cfg.text:
            raise ValueError(f"the model's text_encoder is {mc.text_encoder!r} but the caption cache is {cfg.text!r}")
        images, pooled, _ = _load_split(data_dir, "train", cfg.text)
        if pooled.shape[1] != mc.text_dim:
            raise ValueError(f"caption cache is {pooled.shape[1]}-d; the model expects text_dim={mc.text_dim}")
        self.dataset = Pairs(images, pooled, mc.image_size, cfg)
        self.val_images, self.val_pooled, self.val_captions = _load_split(data_dir, "val", cfg.text, cfg.val_images)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step: int):
        images, pooled = batch
        logits = self.model(images, pooled).float()
        loss = clip_loss(logits)
        acc = float((logits.argmax(1) == torch.arange(len(logits))).float().mean())
        return {"model": loss}, {"loss": float(loss.detach()), "batch_acc": acc,
                                 "logit_scale": float(self.model.logit_scale.detach().exp())}

    @torch.no_grad()
    def validate(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float]:
        model.eval()
        img = torch.cat([model.encode_image(x.float().div(127.5).sub(1)) for x in self.val_images.split(128)])
        txt = model.encode_text(self.val_pooled)
        return retrieval_metrics(img, txt, self.val_captions)


# what `tessera train contrastive` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = ContrastiveTask, ContrastiveTaskConfig, "clip-xs"
