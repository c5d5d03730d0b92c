"""Super-resolution fidelity on held-out photos: each HR image is downscaled by the scale factor with
Pillow's bicubic (the classic SR benchmark degradation), upscaled back by each method, and compared with
the original: PSNR (8-bit RGB), SSIM and the LPIPS-style perceptual distance in the open_nsfw ResNet-50
feature space (tokenizer/perceptual.py; lower is closer), ignoring `border` pixels at the edges."""
from __future__ import annotations

import time
from typing import Callable

import torch
from PIL import Image

from tessera.data.dataset import eval_images, to_tensor
from tessera.eval.metrics import psnr, ssim
from tessera.superres.degrade import bicubic_down

Upscaler = Callable[[Image.Image], Image.Image]


def pillow_upscaler(scale: int, method: Image.Resampling) -> Upscaler:
    return lambda im: im.resize((im.width * scale, im.height * scale), method)


def model_upscaler(model, scale: int, placement=None, tile: int = 192) -> Upscaler:
    from tessera.superres.cascade import from_unit, to_unit
    from tessera.superres.tiling import upscale_tiled

    return lambda im: from_unit(upscale_tiled(model, to_unit(im), scale, tile=tile, placement=placement))


def tokenizer_degrader(vq) -> Callable[[Image.Image], Image.Image]:
    """Bicubic LR -> the tokenizer's encode + decode of it (what SR sees behind a generator)."""
    from tessera.superres.degrade import to_uint8, tokenizer_round_trip

    def degrade(im: Image.Image) -> Image.Image:
        out = tokenizer_round_trip(vq, to_uint8(im)[None])[0]  # (3, h, w) uint8
        return Image.fromarray(out.permute(1, 2, 0).numpy())
    return degrade


@torch.no_grad()
def evaluate_sr(methods: dict[str, Upscaler], data_dir: str, scale: int = 4, split: str = "val",
                border: int = 4, limit: int | None = None,
                degrade: Callable[[Image.Image], Image.Image] | None = None,
                perceptual: Callable | None = None) -> dict[str, dict[str, float]]:
    """`degrade` (optional) is applied to the bicubic low-resolution image before upscaling. DATA is a
    prepared folder (its `split`) or a plain folder of images (all of them). `perceptual(x, ref)`, on
    images in [-1, 1], adds a per-image perceptual distance."""
    ds = eval_images(data_dir, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no images")
    crop = (slice(None), slice(None), slice(border, -border or None), slice(border, -border or None))
    keys = ("psnr", "ssim", "seconds") + (("perceptual",) if perceptual is not None else ())
    scores: dict[str, dict[str, list]] = {k: {m: [] for m in keys} for k in methods}
    for i in range(n):
        hr = ds.image(i)
        lr = bicubic_down(hr, scale)
        lr = degrade(lr) if degrade is not None else lr
        ref = to_tensor(hr)[None][crop]
        for name, up in methods.items():
            t0 = time.perf_counter()
            out = up(lr)
            scores[name]["seconds"].append(time.perf_counter() - t0)
            if out.size != hr.size:
                raise ValueError(f"{name}: output {out.size} != original {hr.size}")
            x = to_tensor(out)[None][crop]
            scores[name]["psnr"].append(float(psnr(x, ref)))
            scores[name]["ssim"].append(float(ssim(x, ref)))
            if perceptual is not None:
                scores[name]["perceptual"].append(float(perceptual(x, ref).mean()))
    return {name: {"images": n, **{k: sum(v) / n for k, v in s.items()},
                   "psnr_min": min(s["psnr"]), "psnr_max": max(s["psnr"])} for name, s in scores.items()}


def evaluate_sr_models(data_dir: str, models: tuple[str, ...] = ("fidelity",), scale: int = 4, split: str = "val",
                       limit: int | None = None, degrade: str = "bicubic", tokenizer: str = "vq-f8",
                       device: str | None = None, dtype: str | None = None) -> dict[str, dict[str, float]]:
    """`tessera eval sr`: bicubic and Lanczos baselines beside each SR model (by name, folder or preset)."""
    import tessera
    from tessera.device import placement as make_placement
    from tessera.errors import InvalidInputError
    from tessera.superres.cascade import load_sr_models

    if degrade not in ("bicubic", "tokenizer"):
        raise InvalidInputError(f"--degrade {degrade}: must be bicubic or tokenizer")
    placement = make_placement(device or "cpu", dtype or "float32")
    degrader = tokenizer_degrader(tessera.load(tokenizer)) if degrade == "tokenizer" else None
    methods = {"bicubic": pillow_upscaler(scale, Image.Resampling.BICUBIC),
               "lanczos": pillow_upscaler(scale, Image.Resampling.LANCZOS)}
    for name in models:
        found = load_sr_models(name, placement.device)
        if scale not in found:
            raise InvalidInputError(f"--model {name}: has no x{scale} model (has x{sorted(found)})")
        methods[name] = model_upscaler(found[scale], scale, placement)
    from tessera.tokenizer.perceptual import PerceptualLoss

    return evaluate_sr(methods, data_dir, scale, split, limit=limit, degrade=degrader,
                       perceptual=PerceptualLoss.open_nsfw().eval())
