"""Caption-embedding cache (seed 004: "pre-compute and cache caption embeddings"), so training never
runs the prompt encoder: DATA/text/<encoder>/{tokens.npy [N,L,D] fp16, mask.npy [N,L], pooled.npy, index.json}."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from tessera.data.dataset import ShardImages


def cache_dir(data_dir: str | Path, encoder_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(encoder_name).name if "/" in encoder_name else encoder_name)
    return Path(data_dir) / "text" / safe


def embed_captions(data_dir: str | Path, encoder, encoder_name: str, batch_size: int = 64,
                   progress: bool = True) -> Path:
    from tqdm import tqdm

    ds = ShardImages(data_dir, split=None)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: no kept images")
    out = cache_dir(data_dir, encoder_name)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("keys") == ds.keys:
        return out  # complete cache for exactly these images: nothing to redo
    chunks = []
    for start in tqdm(range(0, len(ds), batch_size), disable=not progress, desc="embed captions"):
        chunks.append(encoder.encode(ds.captions[start:start + batch_size]))
    length = max(c.tokens.shape[1] for c in chunks)
    tokens = np.zeros((len(ds), length, encoder.dim), dtype=np.float16)
    mask = np.zeros((len(ds), length), dtype=bool)
    pooled = np.zeros((len(ds), encoder.dim), dtype=np.float16)
    row = 0
    for c in chunks:
        n, ell = c.tokens.shape[:2]
        tokens[row:row + n, :ell] = c.tokens.numpy()
        mask[row:row + n, :ell] = c.mask.numpy()
        pooled[row:row + n] = c.pooled.numpy()
        row += n
    np.save(out / "tokens.npy", tokens)
    np.save(out / "mask.npy", mask)
    np.save(out / "pooled.npy", pooled)
    index_path.write_text(json.dumps({"keys": ds.keys, "encoder": encoder_name, "dim": encoder.dim,
                                      "length": length}))  # written last: marks the cache complete
    return out


def load_caption_cache(data_dir: str | Path, name: str, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DATA/text/<name> -> (states [N,L,D] fp16, mask [N,L] bool, D), rows aligned with `keys`."""
    text_dir = Path(data_dir) / "text" / name
    if not (text_dir / "index.json").is_file():
        raise FileNotFoundError(f"{text_dir}: no caption cache; run `tessera data embed-captions` first")
    index = json.loads((text_dir / "index.json").read_text())
    if index["keys"] != keys:
        raise ValueError(f"{text_dir} covers other images than the token/latent cache; rebuild one of them")
    states = torch.from_numpy(np.load(text_dir / "tokens.npy"))
    mask = torch.from_numpy(np.load(text_dir / "mask.npy"))
    return states, mask, index["dim"]


def trim_padding(cond: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no row of a batch uses (cached captions are left-aligned)."""
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return cond[:, :used], mask[:, :used]
