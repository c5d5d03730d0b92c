"""Training task for Tessera's own super-resolution models, in two kinds:
- fidelity (degradation="bicubic", L1): the low-resolution side is the bicubic downscale, the classic SR
  benchmark degradation; what `tessera upscale` runs on photos;
- perceptual (degradation="realesrgan", L1 + perceptual + GAN, as Real-ESRGAN): the low-resolution side is
  Real-ESRGAN's second-order blur / resize / noise / JPEG model drawn per sample; what the generate cascade
  runs on decoded images;
- distilled (teacher set, e.g. "x4plus"): the target is the TEACHER's output on the bicubic low-resolution
  crop instead of the photo (seed 004 "Model distillation": a compact student of Real-ESRGAN x4plus). The
  teacher runs once over the train images at start-up (bf16 where the CPU has it), its outputs cached in
  DATA/sr_teacher/<teacher>-x<scale>/ (reused by later runs and by --resume while the teacher's weights and the
  LR images are the same); validation adds the student's PSNR against the teacher's output on the held-out
  images.
A fraction `tokenizer_fraction` of the pairs instead use the bicubic downscale after the tokenizer's round
trip (what a generator's decoded output looks like). Bicubic and tokenizer images are computed once, at
start-up; crops, flips and Real-ESRGAN draws per sample from the seed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.data.dataset import ShardImages
from tessera.eval.metrics import psnr, ssim
from tessera.superres.degrade import bicubic_down, realesrgan_degrade, to_uint8, tokenizer_round_trip
from tessera.tokenizer.losses import PatchDiscriminator, hinge_d_loss
from tessera.tokenizer.perceptual import PerceptualLoss


@dataclasses.dataclass
class SRTaskConfig(Config):
    crop: int = 128                 # high-resolution crop side (a multiple of the model's scale)
    flip: bool = True
    tokenizer: str = "vq-f8"        # '' = bicubic degradation only
    tokenizer_fraction: float = 0.5
    val_images: int = 20
    border: int = 4                 # pixels ignored at the image border in validation PSNR / SSIM
    stream: str = ""                # WebDataset shard URLs to stream instead of DATA's shards (data/stream.py);
    stream_epoch: int = 0           #   bicubic degradation only (tokenizer_fraction must be 0); 0: DATA's train size
    stream_resampled: bool = True
    degradation: str = "bicubic"    # bicubic (fidelity models) | realesrgan (perceptual models)
    perceptual_weight: float = 0.0  # LPIPS-style distance in the open_nsfw feature space (tokenizer/perceptual.py)
    gan_weight: float = 0.0         # hinge GAN with a PatchGAN discriminator (Real-ESRGAN: 0.1)
    gan_start: int = 0              # step at which the GAN loss switches on
    teacher: str = ""               # distillation: an SR model (x4plus, a folder) whose outputs are the targets

    def __post_init__(self):
        if not 0 <= self.tokenizer_fraction <= 1:
            raise ValueError(f"tokenizer_fraction={self.tokenizer_fraction} must be in [0, 1]")
        if self.degradation not in ("bicubic", "realesrgan"):
            raise ValueError(f"degradation={self.degradation!r} must be bicubic or realesrgan")
        if self.perceptual_weight < 0 or self.gan_weight < 0:
            raise ValueError("perceptual_weight and gan_weight must be >= 0")
        if self.teacher and (self.degradation != "bicubic" or self.stream or (self.tokenizer and self.tokenizer_fraction > 0)):
            raise ValueError("task.teacher: the student learns the teacher's output on the bicubic downscale (set "
                             "task.tokenizer=\"\" or task.tokenizer_fraction=0; no stream; degradation bicubic)")
        if self.stream and self.tokenizer and self.tokenizer_fraction > 0:
            raise ValueError("a streamed SR run degrades by bicubic only: set task.tokenizer=\"\" or "
                             "task.tokenizer_fraction=0")


def check_crop(crop: int, scale: int) -> None:
    if crop % scale:
        raise ValueError(f"crop={crop} must be a multiple of the model's scale {scale}")


def degraded_pairs(images: ShardImages, scale: int, tokenizer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 HR [N,3,H,W], bicubic LR [N,3,H/s,W/s] and, with a tokenizer, its round-tripped LR."""
    pil = [images.image(i) for i in range(len(images))]
    hr = torch.stack([to_uint8(im) for im in pil])
    lr = torch.stack([to_uint8(bicubic_down(im, scale)) for im in pil])
    tok = None
    if tokenizer:
        from tessera import load

        tok = tokenizer_round_trip(load(tokenizer), lr)
    return hr, lr, tok


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, lr: torch.Tensor, batch: int = 8, progress: bool = True) -> torch.Tensor:
    """uint8 LR [N,3,h,w] -> the teacher's uint8 outputs [N,3,s h,s w] (on the CPU, bf16 autocast where the
    CPU has bf16: device.cpu_placement("auto"))."""
    from tqdm import tqdm

    from tessera.device import cpu_placement

    out, place = [], cpu_placement("auto")
    for i in tqdm(range(0, len(lr), batch), desc="teacher", disable=not progress):
        with place.autocast():
            y = teacher(lr[i:i + batch].float() / 255)
        out.append((y.float().clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def _teacher_key(teacher: nn.Module, lr: torch.Tensor) -> str:
    """sha256 over the teacher's weights and the LR images: what the cached targets were computed from."""
    import hashlib

    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():  # names, shapes and values (float32 bytes, any stored dtype)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    h.update(f"{tuple(lr.shape)}".encode())
    h.update(lr.contiguous().numpy().tobytes())  # uint8 [N,3,h,w]
    return h.hexdigest()


def cached_teacher_outputs(data_dir: str | Path, name: str, teacher: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """teacher_outputs, cached as DATA/sr_teacher/<name>-x<scale>/targets.npy beside key.txt, the sha256 of the
    teacher's weights and the LR images: another teacher of the same name, changed data or another degradation
    recomputes them."""
    import numpy as np

    folder = Path(data_dir) / "sr_teacher" / f"{Path(name).name}-x{teacher.scale}"
    path, key_file, key = folder / "targets.npy", folder / "key.txt", _teacher_key(teacher, lr)
    if path.is_file() and key_file.is_file() and key_file.read_text().strip() == key:
        y = torch.from_numpy(np.load(path, allow_pickle=False))
        if len(y) == len(lr) and y.shape[-1] == lr.shape[-1] * teacher.scale:
            return y
    y = teacher_outputs(teacher, lr)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.unlink(missing_ok=True)  # no key names half-written targets
    tmp = folder / "targets.tmp.npy"
    np.save(tmp, y.numpy())
    tmp.replace(path)
    key_file.write_text(key + "\n")
    return y


def load_teacher(name: str, scale: int) -> nn.Module:
    from tessera.superres.cascade import load_sr_models

    models = load_sr_models(name)
    if scale not in models:
        raise ValueError(f"task.teacher={name}: a x{sorted(models)} model; the student is x{scale}")
    return models[scale].eval().requires_grad_(False)


class PairCrops(torch.utils.data.Dataset):
    """(index, aug_seed) -> (lr [3,c/s,c/s], hr [3,c,c]) in [0, 1], aligned crops, reproducible from the seed."""

    def __init__(self, hr, lr, tok, scale: int, cfg: SRTaskConfig):
        check_crop(cfg.crop, scale)
        self.hr, self.lr, self.tok, self.scale, self.cfg = hr, lr, tok, scale, cfg

    def __len__(self) -> int:
        return len(self.hr)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        g = torch.Generator().manual_seed(seed)
        c, s = self.cfg.crop // self.scale, self.scale
        _, h, w = self.lr[i].shape
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        use_tok = self.tok is not None and bool(torch.rand((), generator=g) < self.cfg.tokenizer_fraction)
        lr = (self.tok if use_tok else self.lr)[i][:, top:top + c, left:left + c].float() / 255
        hr = self.hr[i][:, top * s:(top + c) * s, left * s:(left + c) * s].float() / 255
        if self.cfg.degradation == "realesrgan" and not use_tok:
            lr = realesrgan_degrade(hr, s, g)
        if self.cfg.flip and bool(torch.rand((), generator=g) < 0.5):
            lr, hr = lr.flip(-1), hr.flip(-1)
        return lr, hr


class StreamPairs(torch.utils.data.IterableDataset):
    """(lr, hr) in [0, 1] from streamed high-resolution crops, degraded on the fly (bicubic)."""

    def __init__(self, crops, scale: int):
        self.crops, self.scale = crops, scale

    def reseed(self, seed: int) -> None:
        self.crops.reseed(seed)

    def __iter__(self):
        from tessera.data.dataset import to_pil

        for x in self.crops:  # [3,c,c] in [-1, 1]
            hr = to_pil(x)
            yield to_uint8(bicubic_down(hr, self.scale)).float() / 255, to_uint8(hr).float() / 255


class SRTask:
    def __init__(self, model: nn.Module, data_dir: str | Path, cfg: SRTaskConfig):
        self.model, self.cfg = model, cfg
        s = model.scale
        teacher = load_teacher(cfg.teacher, s) if cfg.teacher else None
        if cfg.stream:
            from tessera.data.stream import ImageStream

            epoch = cfg.stream_epoch or len(ShardImages(data_dir, "train"))
            check_crop(cfg.crop, s)
            crops = ImageStream(cfg.stream, epoch, cfg.crop, cfg.flip, resampled=cfg.stream_resampled)
            self.dataset = StreamPairs(crops, s)
        else:
            hr, lr, tok = degraded_pairs(ShardImages(data_dir, "train"), s, cfg.tokenizer)
            if teacher is not None:  # the targets: the teacher's outputs, not the photos
                hr = cached_teacher_outputs(data_dir, cfg.teacher, teacher, lr)
            self.dataset = PairCrops(hr, lr, tok, s, cfg)
        val = ShardImages(data_dir, "val")
        if len(val) == 0:
            raise ValueError(f"{data_dir}: the val split is empty; prepare with a larger --val-fraction")
        n = min(cfg.val_images, len(val))
        self.val_hr = torch.stack([to_uint8(val.image(i)) for i in range(n)])
        self.val_lr = torch.stack([to_uint8(bicubic_down(val.image(i), s)) for i in range(n)])
        self.val_teacher = None if teacher is None else teacher_outputs(teacher, self.val_lr, progress=False)
        self.perceptual = PerceptualLoss.open_nsfw() if cfg.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(3, 64, 3) if cfg.gan_weight > 0 else None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"disc": self.discriminator} if self.discriminator is not None else {})}

    def optim_groups(self) -> dict[str, list]:
        groups = {"model": list(self.model.parameters())}
        if self.discriminator is not None:
            groups["disc"] = list(self.discriminator.parameters())
        return groups

    def losses(self, batch, step: int):
        """L = |sr - hr|_1 + w_p * LPIPS(sr, hr) + w_g * (-D(sr)); L_D = hinge (images scaled to [-1, 1])."""
        lr, hr = batch
        sr = self.model(lr).float()
        l1 = F.l1_loss(sr, hr)
        loss, logs = l1, {"l1": float(l1.detach())}
        if self.perceptual is not None:
            perc = self.perceptual(sr * 2 - 1, hr * 2 - 1).mean()
            loss = loss + self.cfg.perceptual_weight * perc
            logs["perc"] = float(perc.detach())
        losses = {"model": loss}
        if self.discriminator is not None and step >= self.cfg.gan_start:
            g_loss = -self.discriminator(sr * 2 - 1).float().mean()
            loss = loss + self.cfg.gan_weight * g_loss
            d_loss = hinge_d_loss(self.discriminator(hr * 2 - 1).float(), self.discriminator(sr.detach() * 2 - 1).float())
            losses = {"model": loss, "disc": d_loss}
            logs.update(g=float(g_loss.detach()), d=float(d_loss.detach()))
        logs["loss"] = float(loss.detach())
        return losses, logs

    @torch.no_grad()
    def validate(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float]:
        """PSNR / SSIM of model(bicubic LR) against the held-out HR images, and of bicubic upscaling."""
        model.eval()
        b = self.cfg.border
        hr = self.val_hr.float() / 127.5 - 1
        sr = torch.cat([model(x.float()[None] / 255).clamp(0, 1) * 2 - 1 for x in self.val_lr])
        up = F.interpolate(self.val_lr.float() / 127.5 - 1, scale_factor=model.scale, mode="bicubic").clamp(-1, 1)
        crop = (slice(None), slice(None), slice(b, -b or None), slice(b, -b or None))
        out = {"psnr": float(psnr(sr[crop], hr[crop]).mean()), "ssim": float(ssim(sr[crop], hr[crop]).mean()),
               "psnr_bicubic": float(psnr(up[crop], hr[crop]).mean())}
        if self.val_teacher is not None:  # how close the student is to what it imitates
            t = self.val_teacher.float() / 127.5 - 1
            out["psnr_teacher"] = float(psnr(sr[crop], t[crop]).mean())
        return out


# what `tessera train sr` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = SRTask, SRTaskConfig, "sr-compact-x4"
