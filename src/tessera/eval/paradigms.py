"""`tessera bench paradigms`: autoregressive vs masked vs diffusion generators of matched size, trained on
the same data with the same tokenizer, sampled for the same held-out captions, measured the same way:

    quality    Fréchet distance and KID to the held-out real images (open_nsfw feature space, named)
    alignment  mean CLIPScore with the prompt, and R-precision: how often an image's own prompt ranks
               first among all the held-out prompts under the image-text model
    speed      seconds per image (median over batches after a warm-up batch) on this machine

at several step counts per model (seed 004: "diffusion: flexible speed/quality"). Reference rows put
the numbers in context: real train images against the held-out ones (the floor for the distances) and
the held-out images with their own captions (the ceiling for alignment).
Every configuration writes a samples folder (eval/samples.py), so any number here can be recomputed from
files, and an interrupted run resumes."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from tessera.eval.samples import Prompt, generate_samples, read_samples, timing_summary


@dataclasses.dataclass
class Case:
    paradigm: str                  # autoregressive | masked | diffusion (U-Net) | diffusion (DiT)
    model: str
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def slug(self) -> str:
        extra = "-".join(f"{k}{v}" for k, v in sorted(self.settings.items()))
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(self.model).name}-{extra}".strip("-"))


DEFAULT_CONFIGS = [
    Case("autoregressive", "ar-xs"),
    *[Case("masked", "models/masked-xs", {"steps": s}) for s in (4, 8, 16)],
    *[Case("diffusion (U-Net)", "unet-xs", {"steps": s}) for s in (5, 10, 25)],
    *[Case("diffusion (DiT)", "models/dit-xs", {"steps": s}) for s in (5, 10, 25)],
]


def parse_config(spec: str) -> Case:
    """'PARADIGM=MODEL[:key=value,...]', e.g. 'masked=models/masked-xs:steps=8'."""
    paradigm, eq, rest = spec.partition("=")
    if not eq:
        raise ValueError(f"--config {spec!r} must be PARADIGM=MODEL[:key=value,...]")
    model, _, opts = rest.partition(":")
    settings = {}
    for kv in filter(None, opts.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(f"--config {spec!r}: {kv!r} must be key=value")
        settings[k] = json.loads(v) if re.fullmatch(r"-?[0-9.eE+-]+|true|false", v) else v
    return Case(paradigm, model, settings)


def _alignment(scorer, images, prompts: list[str], per_image: dict | None = None) -> dict:
    """Mean CLIPScore with the own prompt, and R-precision over the prompt list (identical prompts count);
    `per_image` (a dict) receives each image's "clipscore" and "hit" (its own prompt ranked first)."""
    from tessera.data.dataset import to_tensor

    with torch.no_grad():
        img = torch.cat([scorer.image_features(torch.stack([to_tensor(im) for im in images[s:s + 64]]))
                         for s in range(0, len(images), 64)])
        unique = sorted(set(prompts))
        txt = torch.cat([scorer.text_features(unique[s:s + 64]) for s in range(0, len(unique), 64)])
    sim = img @ txt.T  # (N, U)
    own = torch.tensor([unique.index(p) for p in prompts])
    clip = 100 * sim.gather(1, own[:, None]).squeeze(1).clamp_min(0)
    if per_image is not None:
        per_image.update(clipscore=clip.double().numpy(), hit=(sim.argmax(1) == own).double().numpy())
    return {"clipscore": float(clip.double().mean()), "clipscore_sem": float(clip.double().std() / len(clip) ** 0.5),
            "r_precision": float((sim.argmax(1) == own).double().mean()), "candidates": len(unique)}


def _distances(real_feats: np.ndarray, feats: np.ndarray) -> dict:
    from tessera.eval.frechet import frechet_distance, kernel_distance, statistics

    kid, kid_std = kernel_distance(real_feats, feats, subsets=100, subset_size=min(len(real_feats), len(feats), 1000))
    return {"fd": frechet_distance(*statistics(real_feats), *statistics(feats)), "kid": kid, "kid_std": kid_std}


def _reference_rows(data_dir, split: str, prompts: list[Prompt], real, real_feats, scorer, net) -> list[dict]:
    from tessera.data.dataset import ShardImages
    from tessera.eval.frechet import open_nsfw_pooled

    train = ShardImages(data_dir, "train")
    pick = np.random.default_rng(0).choice(len(train), size=min(len(real), len(train)), replace=False)
    train_feats = open_nsfw_pooled([train.image(int(i)) for i in sorted(pick)], net)
    return [{"paradigm": "reference", "config": f"real train images vs {split}", **_distances(real_feats, train_feats),
             "seconds_per_image": None, "images": len(pick)},
            {"paradigm": "reference", "config": f"real {split} images, own captions",
             **_alignment(scorer, real, [p.prompt for p in prompts]), "seconds_per_image": None,
             "images": len(real)}]


def run_paradigms(data_dir: str | Path, out: str | Path, configs: list[Case], split: str = "val",
                  limit: int | None = None, batch_size: int = 16, clip_model: str = "clip-xs",
                  text_encoder: str = "minilm", progress: bool = True) -> list[dict]:
    """Sample every config for the held-out captions, measure, and write OUT/results.json."""
    from tessera.data.dataset import ShardImages
    from tessera.eval.bootstrap import SCORES_FILE, save_scores
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.frechet import open_nsfw_pooled, read_image
    from tessera.tokenizer.perceptual import load_open_nsfw

    out = Path(out)
    ds = ShardImages(data_dir, split)
    idx = [i for i, c in enumerate(ds.captions) if c.strip()]
    if limit is not None and limit < len(idx):  # evenly spaced: catalog order groups sources together
        idx = [idx[int(j)] for j in np.linspace(0, len(idx) - 1, limit).round()]
    if len(idx) < 2:
        raise ValueError(f"{data_dir}: the {split} split has {len(idx)} captioned images; need at least 2")
    prompts = [Prompt(ds.captions[i]) for i in idx]
    real = [ds.image(i) for i in idx]
    net, scorer = load_open_nsfw(), load_image_text_model(clip_model)
    real_feats = open_nsfw_pooled(real, net)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "real_features.npz", feats=real_feats.astype(np.float32))  # the paired bootstrap's reference
    rows = _reference_rows(data_dir, split, prompts, real, real_feats, scorer, net)
    for c in configs:
        folder = out / c.slug
        generate_samples(c.model, prompts, folder, c.settings, batch_size, text_encoder=text_encoder,
                         progress=progress)
        record, files = read_samples(folder)
        images = [read_image(f) for f in files]
        feats, own = open_nsfw_pooled(images, net), [r["prompt"] for r in record["images"]]
        per_image: dict = {}
        rows.append({"paradigm": c.paradigm, "config": c.slug, "model": c.model, "settings": record["settings"],
                     "params_m": _params_m(c.model), **_distances(real_feats, feats),
                     **_alignment(scorer, images, own, per_image),  # skipped / withheld out
                     "samples": str(folder),
                     "seconds_per_image": timing_summary(record)["seconds_per_image"], "images": len(images)})
        save_scores(folder / SCORES_FILE, feats, per_image["clipscore"], per_image["hit"], own)
    meta = {"data": str(data_dir), "split": split, "images": len(prompts), "batch_size": batch_size,
            "feature_space": "open_nsfw ResNet-50 pooled (1024-d); NOT Inception", "alignment_model": scorer.space}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


def _params_m(model: str) -> float:
    import tessera

    return round(sum(p.numel() for p in tessera.load(model).parameters()) / 1e6, 2)


def markdown(rows: list[dict]) -> str:
    lines = ["| paradigm | config | params (M) | FD ↓ | KID ↓ | CLIPScore ↑ | R-precision ↑ | s / image ↓ |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fd = f"{r['fd']:.1f}" if "fd" in r else ""
        kid = f"{r['kid']:.4f}" if "kid" in r else ""
        clip = f"{r['clipscore']:.2f} ± {r['clipscore_sem']:.2f}" if "clipscore" in r else ""
        rp = f"{r['r_precision']:.3f}" if "r_precision" in r else ""
        sec = f"{r['seconds_per_image']:.3f}" if r.get("seconds_per_image") is not None else ""
        lines.append(f"| {r['paradigm']} | {r['config']} | {r.get('params_m', '')} | {fd} | {kid} | {clip} | {rp} | {sec} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path) -> Path:
    """Quality (FD) and alignment (CLIPScore) against seconds per image, one line per model."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models: dict[str, list[dict]] = {}
    for r in rows:
        if r["paradigm"] != "reference":
            models.setdefault(f"{r['paradigm']}: {Path(r['model']).name}", []).append(r)
    for ax, key, label in ((axes[0], "fd", "Fréchet distance (open_nsfw features) ↓"),
                           (axes[1], "clipscore", "CLIPScore (clip-xs) ↑")):
        for name, rs in models.items():
            rs = sorted(rs, key=lambda r: r["seconds_per_image"])
            ax.plot([r["seconds_per_image"] for r in rs], [r[key] for r in rs], "o-", label=name)
            for r in rs:
                steps = r["settings"].get("steps")
                if steps is not None and r["paradigm"] != "autoregressive":
                    ax.annotate(f"{steps}", (r["seconds_per_image"], r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        for r in rows:
            if r["paradigm"] == "reference" and key in r:
                ax.axhline(r[key], color="gray", ls="--", lw=1)
                ax.text(0.01, r[key], r["config"], transform=ax.get_yaxis_transform(), fontsize=7, color="gray",
                        va="bottom")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("seconds per image (2-core CPU, batch 16; labels: steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("AR vs masked vs diffusion on the held-out demo captions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def bench_paradigms(data_dir: str | Path, out: str | Path, configs: list[str] | None = None, split: str = "val",
                    limit: int | None = None, batch_size: int = 16, clip_model: str = "clip-xs",
                    text_encoder: str = "minilm") -> str:
    """`tessera bench paradigms`: run, then write OUT/results.md and OUT/paradigms.png; returns the table."""
    chosen = [parse_config(c) for c in configs or ()] or DEFAULT_CONFIGS
    rows = run_paradigms(data_dir, out, chosen, split, limit, batch_size, clip_model, text_encoder)
    table = markdown(rows)
    Path(out, "results.md").write_text(table)
    plot(rows, Path(out, "paradigms.png"))
    return table
