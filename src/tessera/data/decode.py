"""Safe image decoding: every failure becomes a `Rejected(reason)`, never a crash.

Handles truncated / corrupt / zero-byte files, non-images, decompression bombs (pixel cap checked
from the header before any pixel is decoded), EXIF orientation, and converts P / LA / RGBA (alpha
composited on white) / CMYK / I;16 / I / F / L / 1 to 8-bit RGB.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from tessera.errors import plain

DEFAULT_MAX_PIXELS = 64_000_000


class Rejected(Exception):
    """An input that is skipped; `reason` is a short stable code used in the catalog and report."""

    def __init__(self, reason: str, detail: str = ""):
        detail = plain(detail)  # "<_io.BytesIO object at 0x7f..>" says nothing to a user
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> upright 8-bit RGB PIL image, or raise `Rejected`."""
    if not data:
        raise Rejected("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for non-images
        raise Rejected("not_an_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise Rejected("corrupt", f"size {w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise Rejected(reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise Rejected("corrupt", f"{type(e).__name__}: {e}") from None


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (Lanczos, antialiased), then center-crop to size x size."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0 if s < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def native_crops(im: Image.Image, size: int, n: int, mode: str = "random", max_downscale: float = 1.0,
                 seed: int = 0) -> list[tuple[Image.Image, dict]]:
    """Up to `n` crops of size x size from `im` at its native resolution, or each after its own downscale by a
    factor drawn log-uniformly in [1, max_downscale] (never an upscale; never below the crop size), so one
    photo gives detail at several scales. No more crops than the image holds disjoint native tiles
    (w * h // size**2: a small stamp gives a few, a 5K photo the full `n`). Random positions, or a grid
    spread over the image. -> [(crop, {"box": [l, t, r, b] in the source's pixels, "scale": factor})]. The
    draws come from `seed` (the source's hash: the same crops on every run)."""
    w, h = im.size
    if min(w, h) < size:
        raise ValueError(f"{w}x{h} is smaller than the {size}px crop")
    rng = np.random.default_rng(seed)
    n = max(1, min(n, w * h // size**2))
    top_scale = min(max_downscale, min(w, h) / size)
    scales = np.exp(rng.uniform(0.0, np.log(top_scale), n)) if top_scale > 1 else np.ones(n)
    sides = [min(round(size * s), w, h) for s in scales]  # the box each crop is reduced from
    if mode == "grid":
        cols = max(1, round((n * w / h) ** 0.5))
        rows = -(-n // cols)
        fx = np.linspace(0, 1, cols) if cols > 1 else [0.5]
        fy = np.linspace(0, 1, rows) if rows > 1 else [0.5]
        spots = [(x, y) for y in fy for x in fx][:n]
    else:
        spots = list(zip(rng.uniform(0, 1, n).tolist(), rng.uniform(0, 1, n).tolist()))
    out = []
    for (fx_, fy_), side in zip(spots, sides):
        left, top = round(fx_ * (w - side)), round(fy_ * (h - side))
        box = [left, top, left + side, top + side]
        crop = im.crop(box)
        if side != size:
            crop = crop.resize((size, size), Image.Resampling.LANCZOS)
        out.append((crop, {"box": box, "scale": round(side / size, 4)}))
    return out
