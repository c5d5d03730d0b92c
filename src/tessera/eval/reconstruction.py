"""Tokenizer reconstruction quality: PSNR, SSIM, codebook usage and perplexity on a prepared split
(`evaluate_reconstruction`), and `tessera reconstruct` on image files (`reconstruct_files`)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tessera.data.dataset import eval_images, to_pil, to_tensor
from tessera.device import Placement
from tessera.eval.metrics import psnr, ssim


@torch.no_grad()
def evaluate_reconstruction(model, data_dir: str, split: str | None = "val", batch_size: int = 16,
                            placement=None, limit: int | None = None, rfd: bool = False) -> dict:
    """Round-trip every image of `split` through encode -> decode_tokens; images never seen in training
    when split='val' (the split is fixed by each image's sha256 at prepare time). A plain folder of
    same-size images (no catalog) is evaluated whole."""
    ds = eval_images(data_dir, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no images")
    model.eval()
    place = placement or Placement(next(model.parameters()).device)
    k = model.config.codebook_size
    counts = torch.zeros(k, dtype=torch.int64)
    p_all, s_all, t0 = [], [], time.time()
    originals, recons = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([ds[i][0] for i in range(start, min(n, start + batch_size))])
        with place.autocast():
            tokens = model.encode(x.to(place.device))
            rec = model.decode_tokens(tokens).float().clamp(-1, 1).cpu()
        tokens = tokens.cpu()
        counts += torch.bincount(tokens.flatten(), minlength=k)
        p_all.append(psnr(rec, x))
        s_all.append(ssim(rec, x))
        if rfd:
            originals += [to_pil(im) for im in x]
            recons += [to_pil(im) for im in rec]
    p, s = torch.cat(p_all), torch.cat(s_all)
    prob = counts.double() / counts.sum()
    extra = {}
    if rfd:  # Fréchet distance between the originals and their reconstructions ("rFD")
        from tessera.eval.frechet import OPEN_NSFW_SPACE, frechet_distance, open_nsfw_pooled, statistics

        a, b = open_nsfw_pooled(originals), open_nsfw_pooled(recons)
        extra = {"rfd": frechet_distance(*statistics(a), *statistics(b)), "rfd_feature_space": OPEN_NSFW_SPACE}
    return {**extra, "split": split, "images": n, "psnr": float(p.mean()), "psnr_median": float(p.median()),
            "ssim": float(s.mean()), "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(prob * prob.clamp_min(1e-12).log()).sum())),
            "tokens": int(counts.sum()), "seconds": round(time.time() - t0, 2)}


def evaluate_tokenizer(model: str, data_dir: str, split: str = "val", limit: int | None = None, rfd: bool = False,
                       device: str | None = None, dtype: str | None = None) -> dict:
    """`tessera eval reconstruction`: a tokenizer by folder or preset, on a split ('all': every image);
    float32 on the CPU unless --device / --dtype say otherwise (the measured quality is float32's)."""
    from tessera.device import placement
    from tessera.tokenizer.tools import load_tokenizer

    place = placement(device or "cpu", dtype or "float32")
    return evaluate_reconstruction(load_tokenizer(model).to(place.device), data_dir, None if split == "all" else split,
                                   placement=place, limit=limit, rfd=rfd)


def reconstruct_files(inputs: list[str], out: str, model: str = "vq-f8-photo", device: str | None = None,
                      dtype: str | None = None) -> list[dict]:
    """`tessera reconstruct`: each image through encode -> decode at its own size (float32 on the CPU by
    default, so the printed PSNR / SSIM are float32's)."""
    from tessera.data.decode import Rejected, decode_image
    from tessera.device import placement
    from tessera.paths import check_output_path
    from tessera.tokenizer.tools import crop_to_multiple, load_tokenizer, roundtrip

    place = placement(device or "cpu", dtype or "float32")
    m = load_tokenizer(model).to(place.device)
    out_path = Path(out)
    single = len(inputs) == 1 and out_path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    if single:
        check_output_path(out_path, (".png", ".jpg", ".jpeg", ".webp"))
    else:
        _check_output_folder(inputs, out_path)
    rows = []
    for inp in inputs:
        try:
            im = decode_image(Path(inp).read_bytes())
        except Rejected as r:
            raise ValueError(f"{inp}: cannot be used ({r})") from None
        im = crop_to_multiple(im, m.factor)
        x = to_tensor(im)[None]
        tokens, rec = roundtrip(m, x, place)
        dest = out_path if single else out_path / (Path(inp).stem + ".png")
        to_pil(rec[0]).save(dest)
        rows.append({"input": inp, "output": str(dest), "width": im.size[0], "height": im.size[1],
                     "tokens": int(tokens.numel()), "psnr": float(psnr(rec, x)[0]), "ssim": float(ssim(rec, x)[0])})
    return rows


def _check_output_folder(inputs: list[str], out: Path) -> None:
    """Several inputs go to OUT/<stem>.png: OUT must be (or become) a folder, and no two inputs may share a
    stem (one would overwrite the other)."""
    from collections import Counter

    from tessera.errors import InvalidInputError

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"-o {out}: {len(inputs)} inputs need an output folder, and this is a file")
    twice = sorted(s for s, k in Counter(Path(i).stem for i in inputs).items() if k > 1)
    if twice:
        raise InvalidInputError(f"-o {out}: inputs share the file name(s) {twice}; each would overwrite the other "
                                f"in {out}/<name>.png (reconstruct them into separate folders)")
    out.mkdir(parents=True, exist_ok=True)
