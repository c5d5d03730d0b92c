"""Fairness measurement (seed 004: generated images should "not be biased by age, race or gender"): the
distribution of perceived attributes over the images generated for prompts that depict people, by a
zero-shot CLIP classifier, against the uniform target, with bootstrap confidence intervals.

    tessera eval fairness SAMPLES [--clip clip-xs | CLIP_FOLDER] [-o report.json]

Each attribute's classes are described by a few texts; a class's text embedding is the normalised mean of
its texts' (CLIP's prompt ensembling, Radford et al. 2021, sec. 3.1.4), and an image gets the class with the
highest cosine. Per prompt (the prompt before diversification, when the samples were written with
`eval sample --diversify`) and over all images: the class frequencies, and two divergences from the uniform
distribution u over K classes,

    total variation   TV(p, u) = 1/2 sum_k |p_k - 1/K|            (0 = uniform; the largest is 1 - 1/K)
    KL divergence     KL(p || u) = sum_k p_k log(K p_k)   (nats)  (0 = uniform; log K at one class)

each with a 95% percentile interval over bootstrap replicates of the images (per prompt: its images;
overall: the images drawn within each prompt, so every prompt keeps its weight).

The classifier measures PERCEIVED attributes, with the biases of the CLIP that measures them; with the
bundled clip-xs (trained on emoji names, which name skin tone, gender and some ages) it reads emoji-like
images only. Pass a real CLIP folder for photographs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.data.dataset import to_tensor
from tessera.prompts.fairness import SKIN_TONES, depicts_people

ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {"man": ("a photo of a man", "man emoji"), "woman": ("a photo of a woman", "woman emoji")},
    "age": {"young": ("a photo of a young person", "a photo of a child", "child emoji"),
            "adult": ("a photo of an adult", "adult emoji"),
            "older": ("a photo of an older person", "older person emoji")},
    "skin_tone": {tone.removesuffix(" skin tone"): (f"a photo of a person with {tone}", f"person, {tone}, emoji")
                  for tone in SKIN_TONES},
}


def requested(prompt: str, attr: str, classes) -> str | None:
    """The class a prompt asks for ("an older woman doctor, dark skin tone" -> woman / older / dark), if one."""
    text = prompt.lower()
    if attr == "skin_tone":
        hits = [c for c in classes if re.search(rf"(?<![\w-]){re.escape(c)} skin tone", text)]
    else:
        hits = [c for c in classes if re.search(rf"\b{re.escape(c)}\b", text)]
    return hits[0] if len(hits) == 1 else None


def adherence(prompts: list[str], labels: np.ndarray, names: list[str], attr: str) -> dict | None:
    """How often the classified class is the one the prompt asked for (diversified samples): whether the
    generator follows the attribute words, as far as the classifier reads them."""
    asked = [(names.index(c), lab) for p, lab in zip(prompts, labels) if (c := requested(p, attr, names))]
    if not asked:
        return None
    want, got = np.array(asked).T
    return {"n": len(asked), "accuracy": round(float((want == got).mean()), 4), "chance": round(1 / len(names), 4)}


def class_embeddings(scorer, classes: dict[str, tuple[str, ...]]) -> torch.Tensor:
    """(K, D) unit text embeddings, one per class: the normalised mean of its texts' embeddings."""
    rows = [torch.nn.functional.normalize(scorer.text_features(list(texts)).mean(0), dim=-1) for texts in classes.values()]
    return torch.stack(rows)


@torch.no_grad()
def classify(scorer, images: list[Image.Image], attributes: dict = ATTRIBUTES, batch_size: int = 64) -> dict[str, np.ndarray]:
    """attribute -> (N,) index of the predicted class of each image."""
    feats = torch.cat([scorer.image_features(torch.stack([to_tensor(im.convert("RGB")) for im in images[s:s + batch_size]]))
                       for s in range(0, len(images), batch_size)])  # (N, D) unit rows
    return {a: (feats @ class_embeddings(scorer, classes).T).argmax(1).numpy() for a, classes in attributes.items()}


def divergences(labels: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(class frequencies (k,), TV to uniform, KL to uniform in nats) of integer labels."""
    p = np.bincount(labels, minlength=k) / max(1, len(labels))
    tv = 0.5 * float(np.abs(p - 1 / k).sum())
    kl = float(sum(q * np.log(k * q) for q in p if q > 0))
    return p, tv, kl


def _interval(values: list[float], level: float = 0.95) -> list[float]:
    tail = 100 * (1 - level) / 2
    return [round(float(np.percentile(values, tail)), 4), round(float(np.percentile(values, 100 - tail)), 4)]


def bootstrap_divergences(groups: list[np.ndarray], k: int, replicates: int, rng) -> dict[str, list[float]]:
    """95% intervals of TV and KL over replicates that redraw the images within each group (stratified)."""
    tvs, kls = [], []
    for _ in range(replicates):
        draw = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        _, tv, kl = divergences(draw, k)
        tvs.append(tv)
        kls.append(kl)
    return {"tv_95": _interval(tvs), "kl_95": _interval(kls)}


def summarize(labels: np.ndarray, names: list[str], groups: list[np.ndarray], replicates: int, rng) -> dict:
    p, tv, kl = divergences(labels, len(names))
    out = {"n": int(len(labels)), "distribution": {c: round(float(q), 4) for c, q in zip(names, p)},
           "tv": round(tv, 4), "kl": round(kl, 4)}
    if replicates:
        out.update(bootstrap_divergences(groups, len(names), replicates, rng))
    return out


def fairness_report(samples: str | Path, clip: str = "clip-xs", attributes: dict = ATTRIBUTES,
                    people_only: bool = True, replicates: int = 1000, seed: int = 0) -> dict:
    """Per-prompt and overall attribute distributions of a samples folder's images."""
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.samples import read_samples

    record, files = read_samples(samples)
    prompts = [r.get("original") or r["prompt"] for r in record["images"]]
    keep = [i for i, p in enumerate(prompts) if depicts_people(p) or not people_only]
    if not keep:
        raise ValueError(f"{samples}: no image of a prompt that depicts people (prompts such as 'a doctor', "
                         f"'a person running'); pass people_only=False to measure every image")
    scorer = load_image_text_model(clip)
    images = [Image.open(files[i]) for i in keep]
    labels = classify(scorer, images, attributes)
    by_prompt: dict[str, list[int]] = {}
    for j, i in enumerate(keep):
        by_prompt.setdefault(prompts[i], []).append(j)
    rng = np.random.default_rng(seed)
    report = {"samples": str(samples), "classifier": getattr(scorer, "space", str(clip)), "images": len(keep),
              "prompts": len(by_prompt), "target": "uniform", "bootstrap": replicates,
              "diversified": any(r.get("original") for r in record["images"]), "attributes": {}}
    for attr, classes in attributes.items():
        names, lab = list(classes), labels[attr]
        groups = [lab[idx] for idx in by_prompt.values()]
        report["attributes"][attr] = {
            "classes": names,
            "overall": summarize(lab, names, groups, replicates, rng),
            "per_prompt": {p: summarize(lab[idx], names, [lab[idx]], replicates, rng) for p, idx in by_prompt.items()},
            "adherence": adherence([record["images"][i]["prompt"] for i in keep], lab, names, attr)}
    return report


def report_markdown(report: dict) -> str:
    lines = [f"Fairness of {report['samples']}: {report['images']} images of {report['prompts']} people prompts"
             f"{' (diversified)' if report['diversified'] else ''}, classifier {report['classifier']}; TV / KL to the "
             f"uniform distribution with {report['bootstrap']}-replicate 95% intervals.", "",
             "| attribute | prompt | n | distribution | TV [95%] | KL nats [95%] |", "| --- | --- | ---: | --- | ---: | ---: |"]
    for attr, a in report["attributes"].items():
        for name, s in [("(all)", a["overall"]), *a["per_prompt"].items()]:
            dist = ", ".join(f"{c} {q:.2f}" for c, q in s["distribution"].items())
            lines.append(f"| {attr} | {name} | {s['n']} | {dist} | {_with_ci(s, 'tv')} | {_with_ci(s, 'kl')} |")
    asked = [(attr, a["adherence"]) for attr, a in report["attributes"].items() if a["adherence"]]
    if asked:
        lines += ["", "Requested attribute read back (the prompt names it; accuracy of the classifier's reading): "
                  + "; ".join(f"{attr} {h['accuracy']:.2f} of {h['n']} (chance {h['chance']:.2f})" for attr, h in asked)]
    return "\n".join(lines) + "\n"


def _with_ci(s: dict, key: str) -> str:
    ci = s.get(f"{key}_95")
    return f"{s[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def write_report(report: dict, out: str | Path) -> dict:
    """OUT (.json) and OUT.md beside it; returns the report."""
    from tessera.checkpoint import atomic_write_bytes

    out = Path(out)
    atomic_write_bytes(out, (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), report_markdown(report).encode())
    return report
