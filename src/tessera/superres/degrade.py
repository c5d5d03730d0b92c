"""The degradations an SR model is trained to undo (seed 003: Parti trains its SR network on top of the
detokenizer): bicubic downscaling, and the tokenizer's own encode -> quantize -> decode round trip of
the low-resolution image, which is exactly what a generator's decoded output looks like; and Real-ESRGAN's
second-order blur / resize / noise / JPEG model, for the perceptual models that enlarge generated images."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def bicubic_down(img: Image.Image, factor: int) -> Image.Image:
    """Pillow's antialiased bicubic downscale by an integer factor (sides must divide)."""
    w, h = img.size
    if w % factor or h % factor:
        raise ValueError(f"image {w}x{h} is not divisible by the scale factor {factor}")
    return img.resize((w // factor, h // factor), Image.Resampling.BICUBIC)


def to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def tokenizer_round_trip(vq, lr: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """uint8 [N,3,h,w] -> uint8 [N,3,h,w] after the VQ tokenizer's encode + decode (sides divisible by
    its downsampling factor)."""
    outs = []
    for b in lr.split(batch):
        x = b.float().div(127.5).sub(1)  # [-1, 1], the tokenizer's range
        y = vq.decode_tokens(vq.encode(x))
        outs.append(y.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8))
    return torch.cat(outs)


# --- Real-ESRGAN's second-order degradation (Wang et al. 2021, sec. 3): blur -> resize -> noise -> JPEG,
# twice, then a final resize to the low resolution. Ranges as the paper's training config. ---------------

def _pick(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """An (an)isotropic 2-D Gaussian [size, size], rotated by theta, summing to 1 (paper eq. 2)."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def random_blur(x: torch.Tensor, g: torch.Generator, sigma: tuple[float, float]) -> torch.Tensor:
    """x [3,H,W] in [0, 1] convolved with a random Gaussian kernel (7-21 px, half of them anisotropic)."""
    size = 7 + 2 * int(torch.randint(0, 8, (1,), generator=g))
    sx = _pick(g, *sigma)
    sy = sx if float(torch.rand((), generator=g)) < 0.5 else _pick(g, *sigma)
    k = gaussian_kernel(size, sx, sy, _pick(g, 0, math.pi)).to(x.dtype)
    pad = size // 2
    y = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")                      # [1,3,H+2p,W+2p]
    return F.conv2d(y, k.expand(3, 1, size, size), groups=3)[0]                      # [3,H,W]


def random_resize(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float]) -> torch.Tensor:
    """Resize by a factor in `scale` with area, bilinear or bicubic (each a third of the time)."""
    f = _pick(g, *scale)
    h, w = max(4, round(x.shape[1] * f)), max(4, round(x.shape[2] * f))
    mode = ("area", "bilinear", "bicubic")[int(torch.randint(0, 3, (1,), generator=g))]
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x[None], size=(h, w), mode=mode, **kw)[0].clamp(0, 1)


def random_noise(x: torch.Tensor, g: torch.Generator, sigma: tuple[float, float],
                 poisson: tuple[float, float]) -> torch.Tensor:
    """Gaussian (sigma / 255) or Poisson noise, half of each; 40% of the time the same for all channels."""
    gray = float(torch.rand((), generator=g)) < 0.4
    shape = (1, *x.shape[1:]) if gray else x.shape
    if float(torch.rand((), generator=g)) < 0.5:
        noise = torch.randn(shape, generator=g) * _pick(g, *sigma) / 255
    else:
        lam = 10 ** _pick(g, *poisson) * 255  # photon counts per unit intensity
        ref = x.mean(0, keepdim=True) if gray else x
        noise = torch.poisson(ref * lam, generator=g) / lam - ref
    return (x + noise).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip through Pillow at `quality`."""
    buf = io.BytesIO()
    Image.fromarray(x.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
    return to_uint8(Image.open(buf)).float() / 255


def realesrgan_degrade(hr: torch.Tensor, scale: int, g: torch.Generator) -> torch.Tensor:
    """hr [3,H,W] in [0, 1] -> the low-resolution [3,H/scale,W/scale] of Real-ESRGAN's second-order model."""
    x = random_blur(hr, g, (0.2, 3.0))
    x = random_resize(x, g, (0.15, 1.5))
    x = random_noise(x, g, (1, 30), (math.log10(0.05), math.log10(3)))
    x = jpeg(x, int(_pick(g, 30, 95)))
    if float(torch.rand((), generator=g)) < 0.8:
        x = random_blur(x, g, (0.2, 1.5))
    x = random_resize(x, g, (0.3, 1.2))
    x = random_noise(x, g, (1, 25), (math.log10(0.05), math.log10(2.5)))
    h, w = hr.shape[1] // scale, hr.shape[2] // scale
    x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return jpeg(x, int(_pick(g, 30, 95)))
