"""The sample-files contract: generation for evaluation writes images plus ONE JSON of every setting,
and metrics read only those files (seeds 000 / 004 "Evaluation"; FID that cannot be reproduced is
the complaint users have about peers).

    OUT/00000.png ...          one image per prompt, PNG with its parameters (parameters + tessera chunks)
    OUT/samples.json           {"format", "models": {role: {name, sha256, ...}}, "kind", "settings": {seed,
                               sampler, steps, cfg, top-k/p, temperature, ...}, "batch_size",
                               "images": [{file, prompt, category, batch, seed}],
                               "timing": {"load_seconds", "batches": [{batch, images, seconds}], "peak_rss_mb"}}

Batch b of `batch_size` prompts is drawn with seed `settings.seed + b`, so the same file rebuilds the
same images. Writing resumes: finished batches are kept, and a folder holding samples of other
settings is refused rather than mixed.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tessera.checkpoint import atomic_write_bytes

FORMAT = "tessera-samples/1"
SAMPLES_JSON = "samples.json"


@dataclasses.dataclass
class Prompt:
    prompt: str
    category: str = ""
    original: str = ""   # the prompt before fairness diversification ("" = not diversified)


def expand_prompts(prompts: list[Prompt], repeat: int = 1, diversify: bool = False, seed: int = 0) -> list[Prompt]:
    """Each prompt `repeat` times in a row; with `diversify`, the copies of a people prompt get the balanced
    attributes of prompts.diversify (the request path of `tessera generate --diversify`), the prompt they came
    from kept as `original`."""
    from tessera.prompts import diversify as vary

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    out = []
    for p in prompts:
        texts = [t for t, _ in vary(p.prompt, repeat, seed)] if diversify else [p.prompt] * repeat
        out += [Prompt(t, p.category, p.prompt if diversify else "") for t in texts]
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _header(pipe, params, batch_size: int) -> dict:
    from tessera.registry import family

    settings = {k: v for k, v in dataclasses.asdict(params).items() if k != "n"}
    settings["sampler"] = settings.get("method") or family(pipe.generator.kind).sampler
    return {"format": FORMAT, "kind": pipe.paradigm, "models": pipe.models, "settings": settings,
            "batch_size": batch_size}


def _resume(out: Path, header: dict, prompts: list[Prompt]) -> dict:
    path = out / SAMPLES_JSON
    if not path.is_file():
        return {**header, "images": [], "timing": {"batches": []}}
    record = json.loads(path.read_text())
    for key in ("format", "kind", "models", "settings", "batch_size"):
        if record.get(key) != header[key]:
            raise ValueError(f"{out} holds samples of other {key} ({record.get(key)} vs {header[key]}); "
                             f"choose a new --out (nothing there was changed)")
    done = [(r["prompt"], r["category"]) for r in record["images"]]
    if done != [(p.prompt, p.category) for p in prompts[:len(done)]]:
        raise ValueError(f"{out} holds samples of another prompt list; choose a new --out")
    return record


def write_samples(loaded, prompts: list[Prompt], out: str | Path, params, batch_size: int = 16,
                  load_seconds: float | None = None, progress: bool = True,
                  on_batch: Callable[[int, int], None] | None = None, skipped: list[dict] | None = None,
                  image_safety=None) -> dict:
    """Draw one image per prompt with `loaded` (a pipelines.Pipeline) and `params` (its sampling
    parameters; `n` is ignored) into OUT; returns the samples.json record. `skipped` (prompts the caller
    left out, with the reason) is recorded as such. With `image_safety` (safety.image.ImageSafety), an image
    it flags is not written: its row keeps the prompt, with `file` None and the verdict under `withheld`."""
    from tqdm import tqdm

    from tessera.pipelines.records import png_info

    if not prompts:
        raise ValueError("no prompts to sample")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = _header(loaded, params, batch_size)
    record = _resume(out, header, prompts)
    record["skipped"] = skipped or []
    if load_seconds is not None and "load_seconds" not in record["timing"]:
        record["timing"]["load_seconds"] = round(load_seconds, 3)
    batches = range(len(record["images"]) // batch_size, (len(prompts) + batch_size - 1) // batch_size)
    for b in tqdm(batches, desc="sample batches", disable=not progress):
        chunk = prompts[b * batch_size:(b + 1) * batch_size]
        p = dataclasses.replace(params, seed=params.seed + b)
        t0 = time.perf_counter()
        images = loaded.run([c.prompt for c in chunk], p)
        seconds = time.perf_counter() - t0
        verdicts = image_safety.check(images) if image_safety else [None] * len(images)
        rows = []
        for j, (im, c, v) in enumerate(zip(images, chunk, verdicts)):
            row = {"file": f"{b * batch_size + j:05d}.png", "prompt": c.prompt, "category": c.category,
                   "batch": b, "seed": p.seed, **({"original": c.original} if c.original else {})}
            if v is not None and v.flagged:
                rows.append({**row, "file": None, "withheld": {"category": v.category, "score": round(v.score, 4)}})
                continue
            info = {**header["settings"], "seed": p.seed, "batch": b, "index_in_batch": j,
                    "generator": loaded.models["generator"]["name"]}
            im.save(out / row["file"], pnginfo=png_info(c.prompt, info))
            rows.append(row)
        record["images"] += rows
        record["timing"]["batches"].append({"batch": b, "images": len(chunk), "seconds": round(seconds, 4)})
        record["timing"]["peak_rss_mb"] = round(max(peak_rss_mb(), record["timing"].get("peak_rss_mb", 0)), 1)
        atomic_write_bytes(out / SAMPLES_JSON, (json.dumps(record, indent=1) + "\n").encode())
        if on_batch:
            on_batch(b, len(chunk))
    return record


def read_samples(folder: str | Path) -> tuple[dict, list[Path]]:
    """samples.json and the image paths it lists (all must exist); rows withheld by harm detection are
    moved from "images" to "withheld", so that "images" and the paths stay aligned."""
    folder = Path(folder)
    path = folder / SAMPLES_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SAMPLES_JSON}; write samples with `tessera eval sample`")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")
    record = {**record, "images": [r for r in record["images"] if r["file"]],
              "withheld": [r for r in record["images"] if not r["file"]]}  # harm detection held these back
    files = [folder / r["file"] for r in record["images"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} listed images are missing, e.g. {missing[:3]}")
    return record, files


def timing_summary(record: dict, price_per_hour: float = 0.0, warmup_batches: int = 1) -> dict:
    """Latency and cost per image from a samples record (seed 000 "cost per generation"): seconds per
    image (median over batches, the first `warmup_batches` left out when there are more), images/s, peak
    memory, and the cost of one image on a machine that costs `price_per_hour` (any currency) per hour."""
    batches = record["timing"]["batches"]
    if not batches:
        raise ValueError("the samples record has no timed batches")
    timed = batches[warmup_batches:] if len(batches) > warmup_batches else batches
    per_image = np.array([b["seconds"] / b["images"] for b in timed])
    total_images = sum(b["images"] for b in timed)
    total_seconds = sum(b["seconds"] for b in timed)
    s = float(np.median(per_image))
    return {"seconds_per_image": s, "images_per_second": total_images / total_seconds,
            "batch_size": record["batch_size"], "timed_batches": len(timed),
            "load_seconds": record["timing"].get("load_seconds"),
            "peak_rss_mb": record["timing"].get("peak_rss_mb"), "price_per_hour": price_per_hour,
            "cost_per_image": price_per_hour * s / 3600, "cost_per_1000_images": price_per_hour * s / 3.6}


def latency_report(folder: str | Path, price_per_hour: float = 0.0) -> dict:
    """`tessera eval latency`: a samples folder's models, settings and `timing_summary`."""
    record, _ = read_samples(folder)
    return {"samples": str(folder), "models": record["models"], "settings": record["settings"],
            **timing_summary(record, price_per_hour)}


def dataset_prompts(data_dir: str | Path, split: str = "val", limit: int | None = None) -> list[Prompt]:
    """The captions of a prepared folder's split, in catalog order (images without a caption are skipped)."""
    from tessera.data.dataset import ShardImages

    captions = [c for c in ShardImages(data_dir, split).captions if c.strip()]
    if not captions:
        raise ValueError(f"{data_dir}: the {split} split has no captions")
    return [Prompt(c) for c in captions[:limit]]


def generate_samples(model: str, prompts: list[Prompt], out: str | Path, settings: dict | None = None,
                     batch_size: int = 16, tokenizer: str | None = None, text_encoder: str | None = None,
                     progress: bool = True, device: str | None = None, dtype: str | None = None,
                     safety: bool = True) -> dict:
    """Load `model` (any generator kind), build its sampling parameters from `settings` (unknown keys are
    an error) and write the samples folder. Prompts longer than the generator takes are left out and
    listed under "skipped" with the reason (a benchmark run is not lost to one long prompt). `safety`
    (default): the stages of `tessera generate` — prompts the usage policy rejects are skipped with their
    category, images harm detection flags are withheld; `safety=False` (`eval sample --no-safety`) is for
    measuring models only."""
    from tessera.pipelines.folder import load_pipeline

    t0 = time.perf_counter()
    loaded = load_pipeline(model, tokenizer, text_encoder, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - t0
    params = loaded.params(**(settings or {}))
    reasons = loaded.too_long([p.prompt for p in prompts])
    image_safety = None
    if safety:
        from tessera.safety.image import ImageSafety
        from tessera.safety.prompt import PromptSafety

        verdicts = PromptSafety().check([p.prompt for p in prompts])
        reasons = [r or (f"rejected by the usage policy: category {v.category!r}" if v.flagged else "")
                   for r, v in zip(reasons, verdicts)]
        image_safety = ImageSafety()
    skipped = [{"prompt": p.prompt, "category": p.category, **({"original": p.original} if p.original else {}),
                "reason": r} for p, r in zip(prompts, reasons) if r]
    kept = [p for p, r in zip(prompts, reasons) if not r]
    if not kept:
        raise ValueError(f"every prompt was too long for {model}: {skipped[0]['reason']}")
    if skipped and progress:
        print(f"skipping {len(skipped)} prompt(s) the generator cannot take, e.g. {skipped[0]['reason']}")
    return write_samples(loaded, kept, out, params, batch_size, load_seconds, progress, skipped=skipped,
                         image_safety=image_safety)


def generate_prompt_samples(model: str, out: str, prompt_file: str | None = None, data_dir: str | None = None,
                            split: str = "val", limit: int | None = None, settings: dict | None = None,
                            batch_size: int = 16, tokenizer: str | None = None, text_encoder: str | None = None,
                            device: str | None = None, dtype: str | None = None, safety: bool = True,
                            repeat: int = 1, diversify: bool = False) -> dict:
    """`tessera eval sample`: the prompts of a file (PartiPrompts TSV or one per line) or of a prepared
    folder's split, sampled into OUT; each `repeat` times (fairness measurement), diversified if asked."""
    from tessera.errors import InvalidInputError
    from tessera.eval.prompts import read_prompts

    if (prompt_file is None) == (data_dir is None):
        raise InvalidInputError("give exactly one of --prompts FILE or --data DIR")
    prompts = read_prompts(prompt_file)[:limit] if prompt_file else dataset_prompts(data_dir, split, limit)
    prompts = expand_prompts(prompts, repeat, diversify, int((settings or {}).get("seed", 0)))
    return generate_samples(model, prompts, out, settings, batch_size, tokenizer, text_encoder, device=device,
                            dtype=dtype, safety=safety)
