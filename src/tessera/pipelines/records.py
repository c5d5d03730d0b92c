"""Generated images on disk: the PNG record (tessera/records.py) and grids, used by the CLI, the serving
worker and evaluation."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tessera.records import png_info, read_record  # noqa: F401  (the record's home; re-exported here)


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
