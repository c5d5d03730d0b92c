"""Tokenizer utilities behind the CLI: load one, round-trip images, cache token grids / latents of a dataset
(`tessera reconstruct` itself, which reports PSNR / SSIM, is `tessera.eval.reconstruction.reconstruct_files`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.data.dataset import ShardImages
from tessera.device import Placement
from tessera.errors import WrongModelError


def load_tokenizer(model: str):
    import tessera

    m = tessera.load(model)
    if not hasattr(m, "encode") or not hasattr(m, "decode_tokens"):
        raise WrongModelError(f"{model} is not an image tokenizer (kind {getattr(m, 'kind', None)!r})")
    return m


def crop_to_multiple(im: Image.Image, factor: int) -> Image.Image:
    w, h = im.size
    nw, nh = w - w % factor, h - h % factor
    if nw == 0 or nh == 0:
        raise ValueError(f"image {w}x{h} is smaller than the tokenizer factor {factor}")
    left, top = (w - nw) // 2, (h - nh) // 2
    return im.crop((left, top, left + nw, top + nh))


@torch.no_grad()
def roundtrip(model, x: torch.Tensor, placement: Placement | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,3,H,W] (CPU) -> (tokens [B,h,w], reconstruction [B,3,H,W] float in [-1,1]) on the CPU; computed
    on `placement` (default: float32 where the model is)."""
    place = placement or Placement(next(model.parameters()).device)
    with place.autocast():
        tokens = model.encode(x.to(place.device))
        rec = model.decode_tokens(tokens).float().clamp(-1, 1)
    return tokens.cpu(), rec.cpu()


def tokenize_dataset(data_dir: str, model: str = "vq-f8", batch_size: int = 32, progress: bool = True,
                     downscale: int = 1) -> Path:
    """Write DATA/tokens/<name>/tokens.npy (memmap [N,h,w] int16/int32) + index.json (keys in row order);
    `downscale` k > 1: of the images reduced k times first (bicubic, antialiased), in <name>-down<k>."""
    return cache_dataset(data_dir, model, "tokens", batch_size, progress, downscale)


def cache_latents(data_dir: str, model: str = "vq-f8", batch_size: int = 32, progress: bool = True) -> Path:
    """Write DATA/latents/<name>/latents.npy (memmap [N,d,h,w] float16): the continuous pre-quantization
    latents that latent diffusion trains on (seed 004 "Latent diffusion models")."""
    return cache_dataset(data_dir, model, "latents", batch_size, progress)


def downscaled(x: torch.Tensor, k: int) -> torch.Tensor:
    """Images [B,3,H,W] in [-1,1] reduced k times (bicubic, antialiased): the low-resolution view of an image."""
    if k == 1:
        return x
    return torch.nn.functional.interpolate(x, scale_factor=1 / k, mode="bicubic", antialias=True).clamp(-1, 1)


def cache_dataset(data_dir: str, model: str, what: str, batch_size: int = 32, progress: bool = True,
                  downscale: int = 1) -> Path:
    """Encode every kept image of a prepared folder with a tokenizer into DATA/<what>/<model>-<sha12>/.

    Resumable: rows are written in order and `done` in progress.json marks how many are final."""
    from tqdm import tqdm

    m = load_tokenizer(model)
    ds = ShardImages(data_dir, split=None)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: no kept images to encode")
    sha = (m.meta.sha256 if m.meta is not None else "random")[:12]
    out = Path(data_dir) / what / (f"{Path(model).name}-{sha}" + (f"-down{downscale}" if downscale > 1 else ""))
    out.mkdir(parents=True, exist_ok=True)
    x0 = downscaled(ds[0][0][None], downscale)[0]
    h, w = x0.shape[1] // m.factor, x0.shape[2] // m.factor
    if what == "tokens":
        dtype = np.int16 if m.config.codebook_size <= 32767 else np.int32
        shape, encode = (len(ds), h, w), m.encode
    else:
        dtype, shape, encode = np.float16, (len(ds), m.config.codebook_dim, h, w), m.encode_latents
    path = out / f"{what}.npy"
    index = {"keys": ds.keys, "model": str(model), "model_sha256": sha, "grid": [h, w],
             "codebook_size": m.config.codebook_size, "channels": m.config.codebook_dim}
    if (out / "index.json").exists():
        old = json.loads((out / "index.json").read_text())
        if old["keys"] != ds.keys or old["grid"] != [h, w]:
            raise ValueError(f"{out} caches {what} of other images; move it away to re-encode")
    arr = np.lib.format.open_memmap(path, mode="r+" if path.exists() else "w+", dtype=dtype, shape=shape)
    progress_file = out / "progress.json"
    done = json.loads(progress_file.read_text())["done"] if progress_file.exists() else 0
    (out / "index.json").write_text(json.dumps(index))
    bar = tqdm(total=len(ds), initial=done, disable=not progress, desc=what, unit="img")
    for start in range(done, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        x = downscaled(torch.stack([ds[i][0] for i in idx]), downscale)
        if x.shape[-2:] != x0.shape[-2:]:
            raise ValueError(f"{data_dir}: images differ in size; encoding needs one resolution")
        with torch.no_grad():
            arr[start:start + len(idx)] = encode(x).numpy().astype(dtype)
        arr.flush()
        progress_file.write_text(json.dumps({"done": start + len(idx)}))
        bar.update(len(idx))
    bar.close()
    return out
