"""Training task for the VQ tokenizer: random-crop batches, VQ + perceptual + GAN losses, codebook
usage / perplexity tracking with dead-code restarts, and validation PSNR / SSIM with an image grid."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from tessera.config import Config
from tessera.data.dataset import ShardImages, random_crop_flip, to_pil
from tessera.eval.metrics import psnr, ssim
from tessera.tokenizer.losses import VQLoss, VQLossConfig
from tessera.tokenizer.vq import VQModel


@dataclasses.dataclass
class TokenizerTaskConfig(Config):
    crop: int = 64                  # random training crop (fully convolutional model); 0 = whole image
    flip: bool = True
    usage_window: int = 100         # steps over which codebook usage is measured
    dead_code_restart: bool = True  # re-seed codes unused for a whole window from encoder outputs
    val_images: int = 64
    stream: str = ""                # WebDataset shard URLs to stream instead of DATA's shards (data/stream.py)
    stream_epoch: int = 0           # samples per streamed epoch (0: DATA's train-split size)
    stream_resampled: bool = True   # resampled shards (ranks stay even) or each shard once (split by node/worker)
    loss: VQLossConfig = dataclasses.field(default_factory=VQLossConfig)


class CropDataset(torch.utils.data.Dataset):
    """(index, aug_seed) -> a random crop (and flip) of image `index`, reproducible from the seed."""

    def __init__(self, images: ShardImages, crop: int, flip: bool):
        self.images, self.crop, self.flip = images, crop, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        i, seed = item
        return random_crop_flip(self.images[i][0], self.crop, self.flip, torch.Generator().manual_seed(seed))


class UsageTracker(nn.Module):
    """Code counts over the last `window` steps (a ring buffer, saved with the training state)."""

    def __init__(self, size: int, window: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(window, size, dtype=torch.int32))
        self.register_buffer("pos", torch.zeros((), dtype=torch.int64))

    def add(self, tokens: torch.Tensor) -> None:
        i = int(self.pos) % self.counts.shape[0]
        self.counts[i] = torch.bincount(tokens.flatten(), minlength=self.counts.shape[1]).int()
        self.pos += 1

    def stats(self) -> dict[str, float]:
        total = self.counts.sum(0).double()
        p = total / total.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        return {"usage": float((total > 0).double().mean()), "perplexity": float(perplexity)}

    def full(self) -> bool:
        return int(self.pos) >= self.counts.shape[0]

    def dead(self) -> torch.Tensor:
        return self.counts.sum(0) == 0


class TokenizerTask:
    def __init__(self, model: VQModel, data_dir: str | Path, cfg: TokenizerTaskConfig,
                 pretrained_perceptual: bool = True):
        self.model, self.cfg = model, cfg
        self.loss = VQLoss(cfg.loss, pretrained_perceptual)
        self.usage = UsageTracker(model.config.codebook_size, cfg.usage_window)
        if cfg.stream:
            from tessera.data.stream import ImageStream

            epoch = cfg.stream_epoch or len(ShardImages(data_dir, "train"))
            self.dataset = ImageStream(cfg.stream, epoch, cfg.crop, cfg.flip, resampled=cfg.stream_resampled)
        else:
            self.dataset = CropDataset(ShardImages(data_dir, "train"), cfg.crop, cfg.flip)
        val = ShardImages(data_dir, "val")
        if len(val) == 0:
            raise ValueError(f"{data_dir}: the val split is empty; prepare with a larger --val-fraction")
        self.val_batch = torch.stack([val[i][0] for i in range(min(cfg.val_images, len(val)))])

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.model, "usage": self.usage}
        if self.loss.discriminator is not None:
            mods["disc"] = self.loss.discriminator
        return mods

    def optim_groups(self) -> dict[str, list]:
        groups = {"model": list(self.model.parameters())}
        if self.loss.discriminator is not None:
            groups["disc"] = list(self.loss.discriminator.parameters())
        return groups

    def losses(self, x: torch.Tensor, step: int):
        xrec, qloss, tokens = self.model(x)
        loss, logs = self.loss.generator_loss(x, xrec, qloss, step, self.model.last_layer())
        losses = {"model": loss}
        if self.loss.gan_active(step):
            d_loss = self.loss.discriminator_loss(x, xrec)
            losses["disc"] = d_loss
            logs["d"] = float(d_loss.detach())
        self.usage.add(tokens)
        logs.update(self.usage.stats())
        logs["loss"] = float(loss.detach())
        return losses, logs

    def after_step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        if self.cfg.dead_code_restart and self.usage.full() and (step + 1) % self.cfg.usage_window == 0:
            return {"restarted": float(self._restart_dead(x))}
        return {}

    @torch.no_grad()
    def _restart_dead(self, x: torch.Tensor) -> int:
        """Move never-used codes onto random current encoder outputs (plus a little noise)."""
        dead = self.usage.dead().nonzero().flatten()
        if dead.numel() == 0:
            return 0
        z = self.model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, self.model.config.codebook_dim)
        pick = torch.randint(0, z.shape[0], (dead.numel(),)).to(z.device)
        new = z[pick] + 0.01 * torch.randn(dead.numel(), z.shape[1]).to(z.device)
        self.model.quantizer.embedding.weight[dead] = new.to(self.model.quantizer.embedding.weight.dtype)
        self.usage.counts[:, dead] = 1  # give restarted codes one window to get used
        return int(dead.numel())

    @torch.no_grad()
    def validate(self, model: VQModel, out_dir: Path, step: int) -> dict[str, float]:
        model.eval()
        recs = torch.cat([model.decode_tokens(model.encode(b)) for b in self.val_batch.split(16)])
        metrics = {"psnr": float(psnr(recs, self.val_batch).mean()), "ssim": float(ssim(recs, self.val_batch).mean())}
        n = min(8, len(recs))
        grid = torch.cat([torch.cat(list(self.val_batch[:n]), -1), torch.cat(list(recs[:n]), -1)], -2)
        to_pil(grid).save(out_dir / f"step_{step:07d}.png")
        return metrics


# what `tessera train tokenizer` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = TokenizerTask, TokenizerTaskConfig, "vq-f8"
