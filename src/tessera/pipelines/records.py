"""Generated images on disk: the one PNG record (A1111-style `parameters` text chunk + a JSON chunk of
every setting) and grids, used by the CLI, the serving worker and evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin


def png_info(prompt: str, params: dict) -> PngImagePlugin.PngInfo:
    """A1111-style `parameters` text chunk + a JSON chunk with every parameter."""
    info = PngImagePlugin.PngInfo()
    kv = ", ".join(f"{k}: {v}" for k, v in params.items())
    info.add_text("parameters", f"{prompt}\n{kv}")
    info.add_text("tessera", json.dumps({"prompt": prompt, **params}, default=str))
    return info


def read_record(path: str | Path) -> dict:
    """The JSON record a Tessera PNG carries ({} when it has none)."""
    with Image.open(path) as im:
        text = im.text.get("tessera") if hasattr(im, "text") else None
    return json.loads(text) if text else {}


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def save_png(images: list[Image.Image], out: str | Path, prompt: str, record: dict) -> Image.Image:
    """One image, or a grid of several, written with its record; returns what was written."""
    image = images[0] if len(images) == 1 else grid(images)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=png_info(prompt, record))
    return image
