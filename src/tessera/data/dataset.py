"""Read prepared shards back as training samples (normalization to [-1, 1] happens here)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.data.catalog import Catalog


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3,H,W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """float [3,H,W] in [-1, 1] -> PIL RGB."""
    a = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def random_crop_flip(x: torch.Tensor, crop: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """A random `crop` x `crop` window (0: the whole image) and a coin-flip mirror, drawn from `g`."""
    if crop:
        _, h, w = x.shape
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        x = x[:, top:top + crop, left:left + crop]
    if flip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
    return x


class ShardImages(torch.utils.data.Dataset):
    """Kept images of one split of a prepared folder, in catalog key order. Items: (image, caption, key)."""

    def __init__(self, root: str | Path, split: str | None = "train"):
        self.root = Path(root)
        with Catalog.read(root) as cat:
            rows = cat.kept(split)
        self.keys = [r[0] for r in rows]
        self.captions = [r[2] or "" for r in rows]
        self._where: list[tuple[str, int, int]] = []
        index = {}
        for shard in sorted({r[1] for r in rows}):
            with tarfile.open(self.root / "shards" / shard) as tf:
                for m in tf:
                    stem, ext = m.name.split(".", 1)
                    if ext in ("png", "jpg"):
                        index[stem] = (shard, m.offset_data, m.size)
        missing = [k for k in self.keys if k not in index]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} catalog keys missing from shards, e.g. {missing[:3]}")
        self._where = [index[k] for k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> Image.Image:
        shard, off, size = self._where[i]
        with open(self.root / "shards" / shard, "rb") as f:
            f.seek(off)
            return Image.open(io.BytesIO(f.read(size))).convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        return to_tensor(self.image(i)), self.captions[i], self.keys[i]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class FolderImages(torch.utils.data.Dataset):
    """Every image file directly in a plain folder (sorted by name), for evaluating on photos that were
    never prepared: the same items as ShardImages, with the file name as key and no caption."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"{root}: no catalog.sqlite and no image files ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        return to_tensor(self.image(i)), "", self.files[i].name


def eval_images(root: str | Path, split: str | None) -> ShardImages | FolderImages:
    """A prepared folder's split, or (no catalog) every image of a plain folder, whose split is all of it."""
    if (Path(root) / "catalog.sqlite").exists() or not Path(root).is_dir():
        return ShardImages(root, split)
    return FolderImages(root)
