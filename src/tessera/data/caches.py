"""The tensor caches of a prepared folder, aligned by image key and split by its catalog: token grids
(DATA/tokens/<name>, `tessera tokenize`), latents (DATA/latents/<name>) or pixels, and caption embeddings
(DATA/text/<name>, `tessera data embed-captions`). Training tasks and the held-out caption test
(`tessera.eval.captions`) read their inputs through these two classes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tessera.data.captions import load_caption_cache
from tessera.data.catalog import Catalog


def cache_subdir(parent: Path, what: str) -> Path:
    """The only cache folder under `parent` (a prepared folder may hold caches of several tokenizers)."""
    subs = sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []
    if len(subs) != 1:
        raise FileNotFoundError(f"{parent}: expected exactly one {what} cache, found {[p.name for p in subs]}; "
                                f"name it with --set task.{what}=NAME")
    return subs[0]


def latent_dir(data_dir: str | Path, name: str) -> Path:
    root = Path(data_dir)
    d = root / "latents" / name if name else cache_subdir(root / "latents", "latents")
    if not (d / "index.json").is_file():
        raise FileNotFoundError(f"{d}: no latent cache; train with --tokenizer to build it")
    return d


def pixel_data(data_dir: str | Path, size: int) -> tuple[list[str], torch.Tensor]:
    """Every kept image of a prepared folder, resized to size x size, in [-1, 1]: [N,3,size,size]."""
    from tessera.data.dataset import ShardImages

    ds = ShardImages(data_dir, split=None)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
    return ds.keys, x


def split_of(data_dir: str | Path, keys: list[str]) -> np.ndarray:
    """The catalog's split ('train' | 'val') of each of `keys`: [N] str."""
    with Catalog.read(data_dir) as cat:
        splits = cat.splits()
    return np.array([splits[k] for k in keys])


class _Cached:
    """x [N, ...] plus optional caption embeddings (cond [N,L,D] fp16, mask [N,L]) and catalog splits."""
    x: torch.Tensor
    keys: list[str]
    cond: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    text_dim: int = 0

    def _load_text(self, root: Path, text: str, conditional: bool) -> None:
        self.split = split_of(root, self.keys)
        if conditional:
            self.cond, self.mask, self.text_dim = load_caption_cache(root, text, self.keys)

    def indices(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]

    def item(self, j: int):
        """One training sample: x_j, or (x_j, caption states, caption mask)."""
        if self.cond is None:
            return self.x[j]
        return self.x[j], self.cond[j].float(), self.mask[j]

    def view(self, split: str) -> "SplitView":
        return SplitView(self, self.indices(split))


class TokenTextData(_Cached):
    """Token grids (x: [N, h*w] int64) + caption embeddings."""

    def __init__(self, data_dir: str | Path, tokens: str = "", text: str = "minilm", conditional: bool = True):
        root = Path(data_dir)
        tok_dir = root / "tokens" / tokens if tokens else cache_subdir(root / "tokens", "tokens")
        if not (tok_dir / "index.json").is_file():
            raise FileNotFoundError(f"{tok_dir}: no token cache; run `tessera tokenize --data {root}` first")
        index = json.loads((tok_dir / "index.json").read_text())
        self.keys: list[str] = index["keys"]
        grids = torch.from_numpy(np.load(tok_dir / "tokens.npy").astype(np.int64))  # (N, h, w)
        self.x = grids.flatten(1)  # (N, h*w)
        self.codebook_size, self.grid = index["codebook_size"], tuple(index["grid"])
        self._load_text(root, text, conditional)

    def check(self, mc) -> "TokenTextData":
        """Fail loudly when the caches do not fit the model config `mc` (vocabulary, grid, text width)."""
        if self.codebook_size != mc.vocab_size or self.grid != tuple(mc.grid):
            raise ValueError(f"token cache has vocab {self.codebook_size}, grid {self.grid}; the model "
                             f"expects vocab {mc.vocab_size}, grid {tuple(mc.grid)}")
        if mc.conditional and self.text_dim != mc.cond_dim:
            raise ValueError(f"caption cache is {self.text_dim}-d; the model expects cond_dim={mc.cond_dim}")
        return self


class SRTokenTextData(TokenTextData):
    """Pairs of token grids of one image (x: the full-resolution grid [N, h*w]; low: the grid of the image
    reduced `scale` times [N, h*w / scale²]) + caption embeddings: the super-resolution transformer's data."""

    def __init__(self, data_dir: str | Path, tokens: str, low_tokens: str, text: str = "minilm",
                 conditional: bool = True):
        super().__init__(data_dir, tokens, text, conditional)
        low = TokenTextData(data_dir, low_tokens, text, conditional=False)
        if low.keys != self.keys or low.codebook_size != self.codebook_size:
            raise ValueError(f"token caches {tokens} and {low_tokens} are not of the same images and tokenizer")
        self.low, self.low_grid = low.x, low.grid

    def check(self, mc) -> "SRTokenTextData":
        super().check(mc)
        if self.low_grid != tuple(mc.low_grid):
            raise ValueError(f"low-resolution cache grid {self.low_grid}; the model expects {tuple(mc.low_grid)}")
        return self

    def item(self, j: int):
        """(high ids, low ids) or (high ids, low ids, caption states, caption mask)."""
        if self.cond is None:
            return self.x[j], self.low[j]
        return self.x[j], self.low[j], self.cond[j].float(), self.mask[j]


class DiffusionData(_Cached):
    """x_0 (scaled latents or pixels: [N, C, h, w]) + caption embeddings."""

    def __init__(self, data_dir: str | Path, space: str = "latent", latents: str = "", latent_scale: float = 1.0,
                 text: str = "minilm", sample_size: int = 32, conditional: bool = True):
        root = Path(data_dir)
        if space == "latent":
            d = latent_dir(root, latents)
            self.keys = json.loads((d / "index.json").read_text())["keys"]
            self.x = torch.from_numpy(np.load(d / "latents.npy")).float() * latent_scale  # (N, C, h, w)
        else:
            self.keys, self.x = pixel_data(root, sample_size)
        self._load_text(root, text, conditional)

    def check(self, mc) -> "DiffusionData":
        shape = tuple(self.x.shape[1:])
        if shape != (mc.in_channels, mc.sample_size, mc.sample_size):
            raise ValueError(f"training data is {shape}; the model expects "
                             f"{(mc.in_channels, mc.sample_size, mc.sample_size)}")
        if mc.conditional and self.text_dim != mc.cond_dim:
            raise ValueError(f"caption cache is {self.text_dim}-d; the model expects cond_dim={mc.cond_dim}")
        return self


class SplitView(torch.utils.data.Dataset):
    """The rows `idx` of a cache, indexed as the trainer's sampler does: (row, epoch-seed) tuples."""

    def __init__(self, data: _Cached, idx: np.ndarray):
        self.data, self.idx = data, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item: tuple[int, int]):
        return self.data.item(int(self.idx[item[0]]))
