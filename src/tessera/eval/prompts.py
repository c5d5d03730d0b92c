"""Prompt benchmark (seed 003 PartiPrompts; seed 004 "a prompt benchmark"): generate for every prompt of
a prompt file, then report image-text alignment (CLIPScore) and timing per category.

Prompt files: a TSV with a `Prompt` column and optionally a `Category` column (PartiPrompts.tsv), or a
text file with one prompt per line."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from tessera.eval.samples import Prompt, read_samples


def read_prompts(path: str | Path, per_category: int | None = None, categories: list[str] | None = None
                 ) -> list[Prompt]:
    """-> prompts in file order; `per_category` keeps the first N of each category, `categories` only those."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        column = next((c for c in ("Prompt", "Prompts") if rows and c in rows[0]), None)
        if column is None:
            raise ValueError(f"{path}: a {path.suffix[1:].upper()} prompt file needs a 'Prompt' column "
                             f"(PartiPrompts' TSV) or 'Prompts' (DrawBench's CSV), with an optional 'Category'")
        prompts = [Prompt(r[column].strip(), (r.get("Category") or "").strip()) for r in rows]
    else:
        prompts = [Prompt(line.strip()) for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p.prompt]
    if categories:
        known = {p.category for p in prompts}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise ValueError(f"{path}: no categories {unknown}; it has {sorted(known)}")
        prompts = [p for p in prompts if p.category in categories]
    if per_category is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for p in prompts:
            if taken[p.category] < per_category:
                taken[p.category] += 1
                kept.append(p)
        prompts = kept
    if not prompts:
        raise ValueError(f"{path}: no prompts selected")
    return prompts


def score_samples(folder: str | Path, scorer, batch_size: int = 64) -> tuple[dict, np.ndarray]:
    """CLIPScore of every image of a samples folder with its prompt -> (record, scores [N])."""
    from tessera.eval.clipscore import clip_scores
    from tessera.eval.frechet import read_image

    record, files = read_samples(folder)
    prompts = [r["prompt"] for r in record["images"]]
    scores = []
    for s in range(0, len(files), batch_size):
        images = [read_image(f) for f in files[s:s + batch_size]]
        scores.append(clip_scores(scorer, images, prompts[s:s + batch_size]).numpy())
    return record, np.concatenate(scores).astype(np.float64)


def per_category(record: dict, scores: np.ndarray) -> dict[str, dict]:
    """Mean CLIPScore (with its standard error) and seconds per image for each category and overall.
    Seconds per image of a category: its images' share of their batches' time."""
    per_batch = {b["batch"]: b["seconds"] / b["images"] for b in record["timing"]["batches"]}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(record["images"]):
        groups[r["category"] or "(none)"].append(i)
    groups["ALL"] = list(range(len(scores)))
    out = {}
    for cat, idx in groups.items():
        s = scores[idx]
        secs = [per_batch[record["images"][i]["batch"]] for i in idx]
        out[cat] = {"images": len(idx), "clipscore": float(s.mean()),
                    "clipscore_sem": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan"),
                    "seconds_per_image": float(np.mean(secs))}
    return out


def markdown_table(rows: dict[str, dict], space: str) -> str:
    lines = [f"CLIPScore = 100·max(cos, 0) in {space}", "",
             "| category | images | CLIPScore (± sem) | s / image |", "| --- | ---: | ---: | ---: |"]
    for cat, r in rows.items():
        lines.append(f"| {cat} | {r['images']} | {r['clipscore']:.2f} ± {r['clipscore_sem']:.2f} | "
                     f"{r['seconds_per_image']:.3f} |")
    return "\n".join(lines) + "\n"


def prompt_benchmark(prompt_file: str, model: str, out: str, settings: dict | None = None, batch_size: int = 16,
                     tokenizer: str | None = None, text_encoder: str | None = None, first_per_category: int | None = None,
                     categories: list[str] | None = None, clip_model: str = "clip-xs", price_per_hour: float = 0.10,
                     device: str | None = None, dtype: str | None = None, safety: bool = True) -> str:
    """`tessera eval prompts`: generate for each prompt, then CLIPScore and seconds per image per category;
    writes OUT/report.json and OUT/report.md and returns the table."""
    import json

    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.samples import generate_samples, timing_summary

    prompts = read_prompts(prompt_file, first_per_category, categories or None)
    scorer = load_image_text_model(clip_model)
    generate_samples(model, prompts, out, settings, batch_size, tokenizer, text_encoder, device=device, dtype=dtype,
                     safety=safety)
    record, scores = score_samples(out, scorer)
    rows = per_category(record, scores)
    report = {"prompts": prompt_file, "skipped": record.get("skipped", []), "models": record["models"],
              "settings": record["settings"], "feature_space": scorer.space,
              "timing": timing_summary(record, price_per_hour), "per_category": rows}
    Path(out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(rows, scorer.space)
    Path(out, "report.md").write_text(table)
    return table


def clipscore_report(samples: str, clip_model: str = "clip-xs") -> dict:
    """`tessera eval clipscore`: per-category CLIPScore of a samples folder, with the feature space named."""
    from tessera.eval.clipscore import load_image_text_model

    scorer = load_image_text_model(clip_model)
    record, scores = score_samples(samples, scorer)
    return {"feature_space": scorer.space, "per_category": per_category(record, scores)}
