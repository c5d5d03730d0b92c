"""The degradations an SR model is trained to undo (seed 003: Parti trains its SR network on top of the
detokenizer): bicubic downscaling, and the tokenizer's own encode -> quantize -> decode round trip of
the low-resolution image, which is exactly what a generator's decoded output looks like."""
from __future__ import annotations

import numpy as np
import torch
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
