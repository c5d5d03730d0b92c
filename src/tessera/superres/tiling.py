"""Tiled super-resolution with bounded memory: the image is cut into tiles, each tile is run with
`pad` pixels of surrounding context (so the network sees what lies beyond the tile edge), cropped back,
and neighbouring tiles are cross-faded over `overlap` pixels with linear (feathered) weights. Peak
memory is one tile's activations plus the output canvas, whatever the image size.
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.device import Placement


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours overlapping >= `overlap`."""
    if tile <= overlap:
        raise ValueError(f"tile={tile} must be larger than overlap={overlap}")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def feather(length: int, ramp: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """1-D weights [length]: 1 inside, linear ramps of `ramp` samples at the ends that face a neighbour."""
    w = torch.ones(length)
    r = min(ramp, length)
    edge = (torch.arange(r, dtype=torch.float32) + 0.5) / r  # (r,) rising
    if fade_in and r:
        w[:r] = torch.minimum(w[:r], edge)
    if fade_out and r:
        w[length - r:] = torch.minimum(w[length - r:], edge.flip(0))
    return w


@torch.no_grad()
def upscale_tiled(model: nn.Module, x: torch.Tensor, scale: int, tile: int = 192, pad: int = 16,
                  overlap: int = 8, placement: Placement | None = None) -> torch.Tensor:
    """x [B,C,H,W] in [0,1] -> model(x) [B,C,H*scale,W*scale], computed tile by tile and clamped to [0,1].
    Each tile runs on `placement`'s device and dtype (default: float32 where the model is); the
    blended output stays on the CPU, so only one tile's activations are ever on the device."""
    place = placement or Placement(next(model.parameters()).device)
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B,C,H,W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h * scale, w * scale)
    weight = torch.zeros(1, 1, h * scale, w * scale)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for y0 in ys:
        th = min(tile, h)
        wy = feather(th * scale, overlap * scale, y0 > 0, y0 + th < h)
        for x0 in xs:
            tw = min(tile, w)
            wx = feather(tw * scale, overlap * scale, x0 > 0, x0 + tw < w)
            cy0, cx0 = max(0, y0 - pad), max(0, x0 - pad)  # tile plus its context, clamped to the image
            cy1, cx1 = min(h, y0 + th + pad), min(w, x0 + tw + pad)
            inp = x[:, :, cy0:cy1, cx0:cx1].to(place.device).contiguous(memory_format=torch.channels_last)
            with place.autocast():
                pred = model(inp).float().cpu()  # (B, C, (cy1-cy0)*s, (cx1-cx0)*s)
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            core = pred[:, :, oy:oy + th * scale, ox:ox + tw * scale]  # the tile itself, context cut away
            wt = wy[:, None] * wx[None, :]  # (th*s, tw*s)
            ys_, xs_ = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, ys_, xs_] += core * wt
            weight[:, :, ys_, xs_] += wt
    return (out / weight).clamp_(0, 1)
