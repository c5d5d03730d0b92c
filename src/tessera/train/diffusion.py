"""Training task for diffusion denoisers (U-Net or DiT): epsilon- or v-prediction MSE on the forward
process (seed 004), in the tokenizer's latent space (default) or in pixel space for small images;
prompts from the caption-embedding cache, dropped for `cond_drop` of the samples (CFG)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.eval.metrics import margin_stats
from tessera.sampling.diffusion import DiffusionConfig, Schedule, diffusion_loss
from tessera.text.cache import load_caption_cache, trim_padding
from tessera.train.ar import cache_subdir


@dataclasses.dataclass
class DiffusionTaskConfig(Config):
    space: str = "latent"          # latent: the tokenizer's pre-quantization latents; pixel: images
    tokenizer: str = "vq-f8"       # decodes latents at sampling time (latent space)
    latents: str = ""              # DATA/latents/<name> written by the latent cache ('' = the only one)
    text: str = "minilm"           # DATA/text/<name>
    latent_scale: float = 1.0      # x_0 = latents * scale (unit variance; measured by `prepare_diffusion_inputs`)
    cond_drop: float = 0.1
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    val_images: int = 256
    val_timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950)

    def __post_init__(self):
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"space={self.space!r}: expected 'latent' or 'pixel'")


def latent_dir(data_dir: str | Path, name: str) -> Path:
    root = Path(data_dir)
    d = root / "latents" / name if name else cache_subdir(root / "latents", "latents")
    if not (d / "index.json").is_file():
        raise FileNotFoundError(f"{d}: no latent cache; train with --tokenizer to build it")
    return d


def pixel_data(data_dir: str | Path, size: int) -> tuple[list[str], torch.Tensor]:
    """Every kept image of a prepared folder, resized to size x size, in [-1, 1]: [N,3,size,size]."""
    from tessera.data.dataset import ShardImages

    ds = ShardImages(data_dir, split=None)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
    return ds.keys, x


def split_mask(data_dir: str | Path, keys: list[str], split: str) -> np.ndarray:
    """Boolean [N]: which of `keys` the catalog puts in `split`."""
    import sqlite3

    db = sqlite3.connect(Path(data_dir) / "catalog.sqlite")
    splits = dict(db.execute("SELECT id, split FROM images WHERE status='kept'"))
    db.close()
    return np.array([splits[k] == split for k in keys])


class DiffusionData:
    """x_0 (scaled latents or pixels) + caption embeddings of a prepared folder, split by the catalog."""

    def __init__(self, data_dir: str | Path, cfg: DiffusionTaskConfig, sample_size: int, conditional: bool):
        root = Path(data_dir)
        if cfg.space == "latent":
            d = latent_dir(root, cfg.latents)
            self.keys = json.loads((d / "index.json").read_text())["keys"]
            self.x0 = torch.from_numpy(np.load(d / "latents.npy")).float() * cfg.latent_scale  # (N, C, h, w)
        else:
            self.keys, self.x0 = pixel_data(root, sample_size)
        self.train_mask = split_mask(root, self.keys, "train")
        self.val_mask = split_mask(root, self.keys, "val")
        self.cond = self.mask = None
        if conditional:
            self.cond, self.mask, self.text_dim = load_caption_cache(root, cfg.text, self.keys)

    def indices(self, split: str) -> np.ndarray:
        return np.nonzero(self.train_mask if split == "train" else self.val_mask)[0]


class _SplitView(torch.utils.data.Dataset):
    def __init__(self, data: DiffusionData, idx: np.ndarray):
        self.data, self.idx = data, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item: tuple[int, int]):
        j = int(self.idx[item[0]])
        if self.data.cond is None:
            return self.data.x0[j]
        return self.data.x0[j], self.data.cond[j].float(), self.data.mask[j]


class DiffusionTask:
    def __init__(self, model: nn.Module, data_dir: str | Path, cfg: DiffusionTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.schedule = Schedule(cfg.diffusion)
        self.data = DiffusionData(data_dir, cfg, mc.sample_size, mc.conditional)
        shape = tuple(self.data.x0.shape[1:])
        if shape != (mc.in_channels, mc.sample_size, mc.sample_size):
            raise ValueError(f"training data is {shape}; the model expects "
                             f"{(mc.in_channels, mc.sample_size, mc.sample_size)}")
        if mc.conditional and self.data.text_dim != mc.cond_dim:
            raise ValueError(f"caption cache is {self.data.text_dim}-d; the model expects cond_dim={mc.cond_dim}")
        self.dataset = _SplitView(self.data, self.data.indices("train"))
        self.val_idx = self.data.indices("val")[: cfg.val_images]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step: int):
        if self.model.config.conditional:
            x0, cond, mask = batch
            cond, mask = trim_padding(cond, mask)
            drop = (torch.rand(x0.shape[0]) < self.cfg.cond_drop).to(x0.device)
            loss = diffusion_loss(lambda x, t: self.model(x, t, cond, mask, drop), self.schedule, x0).mean()
        else:
            loss = diffusion_loss(lambda x, t: self.model(x, t), self.schedule, batch).mean()
        return {"model": loss}, {"loss": float(loss.detach())}

    @torch.no_grad()
    def caption_margin(self, model: nn.Module, batch_size: int = 32) -> dict[str, float]:
        """Held-out denoising loss with the true caption vs. a shuffled caption (a derangement), each
        image at the same fixed timesteps and noise (seeded by its row), averaged over the timesteps."""
        model.eval()
        idx = torch.as_tensor(self.val_idx)
        if len(idx) < 2:
            raise ValueError("need at least 2 held-out images for the caption test")
        perm = torch.roll(torch.arange(len(idx)), 1)  # every image gets another image's caption
        true_loss, shuf_loss = [], []
        for s in range(0, len(idx), batch_size):
            j, k = idx[s:s + batch_size], idx[perm[s:s + batch_size]]
            x0 = self.data.x0[j]
            tl, sl = torch.zeros(len(j)), torch.zeros(len(j))
            for t_val in self.cfg.val_timesteps:
                g = torch.Generator().manual_seed(int(t_val) * 100_003 + s)
                noise = torch.randn(x0.shape, generator=g)
                t = torch.full((len(j),), int(t_val), dtype=torch.long)
                for acc, rows in ((tl, j), (sl, k)):
                    c, m = trim_padding(self.data.cond[rows].float(), self.data.mask[rows])
                    acc += diffusion_loss(lambda x, tt: model(x, tt, c, m, None), self.schedule, x0, t, noise)
            true_loss.append(tl / len(self.cfg.val_timesteps))
            shuf_loss.append(sl / len(self.cfg.val_timesteps))
        m = margin_stats(torch.cat(true_loss), torch.cat(shuf_loss))
        return {"loss_true": m.pop("true"), "loss_shuffled": m.pop("shuffled"), **m}

    def validate(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float]:
        if not model.config.conditional or len(self.val_idx) < 2:
            return {}
        return {k: v for k, v in self.caption_margin(model).items() if k != "images"}


# what `tessera train diffusion` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = DiffusionTask, DiffusionTaskConfig, "unet-s"
