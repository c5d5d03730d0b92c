"""The x4 / x2 super-resolution cascade (seed 000: 1024 -> 2048 with a 2x model; seed 004: a cascade of
SR stages), planned to reach EXACTLY the requested size.

`plan(src, target)` picks the power of two P nearest (in log scale) to the requested magnification,
resizes the input to target / P (rounded up) only if it is not that size already, runs an x4 stage
first when P >= 4 and x2 stages after it (128 -> 512 -> 1024 -> 2048), and resamples the last few pixels
if target / P was not a whole number.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from PIL import Image
from torch import nn

from tessera.data.dataset import to_pil, to_tensor
from tessera.errors import WrongModelError
from tessera.superres.tiling import upscale_tiled

Size = tuple[int, int]  # (width, height), as Pillow


@dataclasses.dataclass(frozen=True)
class Plan:
    src: Size
    target: Size
    pre: Size | None          # resize the input to this first (None: already right)
    stages: tuple[int, ...]   # SR factors in order, e.g. (4, 2, 2)
    post: Size | None         # resample to exactly `target` at the end (None: exact already)


def plan(src: Size, target: Size) -> Plan:
    (sw, sh), (tw, th) = src, target
    if min(sw, sh, tw, th) < 1:
        raise ValueError(f"sizes must be positive: src={src}, target={target}")
    ratio = min(tw / sw, th / sh)
    if ratio < 1:
        raise ValueError(f"target {tw}x{th} is smaller than the input {sw}x{sh}: super-resolution only enlarges")
    k = max(0, round(math.log2(ratio)))  # P = 2**k
    stages = (4,) + (2,) * (k - 2) if k >= 2 else (2,) * k
    p = 2 ** k
    pre = (math.ceil(tw / p), math.ceil(th / p))
    out = (pre[0] * p, pre[1] * p)
    return Plan(src, target, None if pre == src else pre, stages, None if out == target else target)


def to_unit(img: Image.Image) -> torch.Tensor:
    """PIL -> [1,3,H,W] in [0, 1], the SR networks' range (the data pipeline's tensors are in [-1, 1])."""
    return (to_tensor(img)[None] + 1) / 2


def from_unit(x: torch.Tensor) -> Image.Image:
    return to_pil(x[0] * 2 - 1)


def run_stage(models: dict[int, nn.Module], factor: int, x: torch.Tensor, **tiling) -> torch.Tensor:
    """One xN stage with the model for N. Without an x4 model, x4 is two x2 stages; without an x2 model,
    x2 runs the x4 model and halves the result by area averaging (the realesr-animevideov3-x2 ncnn file
    does the same with nearest)."""
    if factor in models:
        return upscale_tiled(models[factor], x, factor, **tiling)
    if factor == 4 and 2 in models:
        return upscale_tiled(models[2], upscale_tiled(models[2], x, 2, **tiling), 2, **tiling)
    if factor == 2 and 4 in models:
        y = upscale_tiled(models[4], x, 4, **tiling)
        return torch.nn.functional.avg_pool2d(y, 2)
    raise ValueError(f"no model for an x{factor} stage (have x{sorted(models)})")


def upscale(img: Image.Image, target: Size, models: dict[int, nn.Module], **tiling) -> Image.Image:
    """`img` enlarged to exactly `target` (width, height) through the planned cascade."""
    p = plan(img.size, target)
    if p.pre is not None:
        img = img.resize(p.pre, Image.Resampling.LANCZOS)
    x = to_unit(img)
    for factor in p.stages:
        x = run_stage(models, factor, x, **tiling)
    out = from_unit(x)
    return out if p.post is None else out.resize(p.post, Image.Resampling.LANCZOS)


# the bundled cascades, each named for what it is for (docs/superres.md):
CASCADES = {
    "fidelity": ("sr-fidelity-x4", "sr-fidelity-x2"),      # bicubic degradation, L1: photos (`tessera upscale`)
    "perceptual": ("sr-perceptual-x4", "sr-perceptual-x2"),  # Real-ESRGAN degradation + tokenizer round trip,
}                                                           #   L1 + perceptual + GAN: generated images
ALIASES = {"fast": "perceptual"}  # the name of the bundled cascade before issue 23


def describe_sr(name: str | None) -> str | None:
    """What a cascade name stands for, for records: 'perceptual (sr-perceptual-x4 + sr-perceptual-x2)'."""
    cascade = ALIASES.get(name, name)
    return f"{cascade} ({' + '.join(CASCADES[cascade])})" if cascade in CASCADES else name


def load_sr_models(name: str, device: torch.device | str = "cpu") -> dict[int, nn.Module]:
    """{scale: model} for a cascade. 'fidelity' / 'perceptual' ('fast' = 'perceptual'): Tessera's bundled
    x4 + x2 pairs (CASCADES); 'x4plus': the imported Real-ESRGAN x4plus (x2 stages = x4 then halve);
    anything else: one model folder or preset (its own scale)."""
    from tessera import load
    from tessera.superres.pretrained import NCNN_MODELS, load_pretrained

    cascade = ALIASES.get(name, name)
    if cascade in CASCADES:
        x4, x2 = CASCADES[cascade]
        return {4: load(x4, device), 2: load(x2, device)}
    if name == "x4plus":
        name = "realesrgan-x4plus"
    if name in NCNN_MODELS:
        m = load_pretrained(name)
    else:
        m = load(name)
    if not hasattr(m, "scale"):
        raise WrongModelError(f"{name!r} is not a super-resolution model (it is a {type(m).__name__})")
    return {m.scale: m.to(device)}


def parse_size(text: str) -> Size:
    """'1024' (square) or '1024x768' (width x height)."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected N or WxH, e.g. 1024 or 1024x768") from None
    if len(parts) > 2 or w < 1 or h < 1:
        raise ValueError(f"--size {text!r}: expected N or WxH with positive sides")
    return w, h


MAX_OUTPUT_PIXELS = 2048 * 2048  # the generate limit: a 99999^2 output would take hours and tens of GB


def upscale_file(src: str, out: str, size: Size | None = None, scale: int | None = None, model: str = "fidelity",
                 max_pixels: int = MAX_OUTPUT_PIXELS, device: str | None = None, dtype: str | None = None,
                 **tiling) -> Image.Image:
    """Read `src` (safely decoded), upscale it to `size` or by `scale`, write `out` (a PNG also records the
    models in its `parameters` / `tessera` text chunks). Returns the image. The output path and size are
    checked before any work; outputs beyond `max_pixels` are refused.
    `device` / `dtype`: where it runs (tessera.device), unless `tiling` gives a placement."""
    from pathlib import Path

    from tessera.data.decode import Rejected, decode_image
    from tessera.errors import InvalidInputError
    from tessera.paths import check_output_path

    if (size is None) == (scale is None):
        raise InvalidInputError("give exactly one of --size and --scale")
    check_output_path(out, (".png", ".jpg", ".jpeg", ".webp"))
    if size is not None and size[0] * size[1] > max_pixels:
        raise InvalidInputError(f"--size {size[0]}x{size[1]}: at most {max_pixels} output pixels (2048x2048)")
    try:
        img = decode_image(Path(src).read_bytes())
    except Rejected as e:
        raise ValueError(f"{src}: cannot be read as an image ({e})") from None
    if scale is not None:
        if scale not in (2, 4):
            raise ValueError(f"--scale {scale}: must be 2 or 4")
        size = (img.width * scale, img.height * scale)
        if size[0] * size[1] > max_pixels:
            raise InvalidInputError(f"--scale {scale}: {img.width}x{img.height} would become {size[0]}x{size[1]}, "
                                    f"beyond {max_pixels} output pixels (2048x2048); give a smaller --size")
    if "placement" not in tiling:
        from tessera.device import placement

        tiling["placement"] = placement(device, dtype)
    place = tiling["placement"]
    result = upscale(img, size, load_sr_models(model, place.device), **tiling)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if Path(out).suffix.lower() == ".png":
        from tessera.records import png_info

        record = {"task": "upscale", "source": Path(src).name, "source_size": f"{img.width}x{img.height}",
                  "size": f"{size[0]}x{size[1]}", "sr_model": describe_sr(model)}
        result.save(out, pnginfo=png_info("", record))
    else:
        result.save(out)
    return result
