"""Fairness measurement (issue 25): how well the zero-shot attribute classifier reads the attributes it is
used to count, on emoji whose names state them, and the fairness reports of samples folders side by side.

    .venv/bin/python benchmarks/bench_fairness.py --emoji PACKAGE_DIR [--clip clip-xs] [--samples DIR ...]

PACKAGE_DIR: the npm package emoji-datasource-google (emoji.json + img/google/64; scripts/build_demo_data.sh
fetches it to data/src/emoji). Labels from the names: skin tone from the variation's code point, gender from
"man" / "woman" in the name, age from child / boy / girl / baby (young), older (older), else adult for named
men and women. The demo set clip-xs was trained on holds 90% of these images: the accuracy is an upper bound
of what it reads in generated images, not a held-out figure."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def labels_of(name: str) -> dict[str, str]:
    words = set(re.findall(r"[a-z]+", name.lower()))
    out = {}
    if words & {"man", "men", "boy", "king", "prince"} and not words & {"woman", "women", "girl"}:
        out["gender"] = "man"
    elif words & {"woman", "women", "girl", "queen", "princess"} and not words & {"man", "men", "boy"}:
        out["gender"] = "woman"
    if words & {"child", "boy", "girl", "baby"}:
        out["age"] = "young"
    elif "older" in words:
        out["age"] = "older"
    elif "gender" in out or "adult" in words:
        out["age"] = "adult"
    return out


def labeled_emoji(pkg: Path) -> list[tuple[Path, dict[str, str]]]:
    """(image, labels) of every single-tone skin variation of a people emoji with a Google image."""
    img_dir = pkg / "img" / "google" / "64"
    rows = []
    for e in json.loads((pkg / "emoji.json").read_text()):
        name = (e.get("name") or e["short_name"]).lower()
        for key, var in (e.get("skin_variations") or {}).items():
            if key in TONES and var.get("has_img_google") and (img_dir / var["image"]).is_file():
                rows.append((img_dir / var["image"], {"skin_tone": TONES[key], **labels_of(name)}))
    return rows


def accuracy(clip: str, rows) -> dict:
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.fairness import ATTRIBUTES, classify

    scorer = load_image_text_model(clip)
    images = [Image.open(p).convert("RGBA") for p, _ in rows]
    images = [Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB") for im in images]
    pred = classify(scorer, images)
    out = {}
    for attr, classes in ATTRIBUTES.items():
        names = list(classes)
        idx = [i for i, (_, lab) in enumerate(rows) if attr in lab]
        truth = np.array([names.index(rows[i][1][attr]) for i in idx])
        guess = pred[attr][idx]
        confusion = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(confusion, (truth, guess), 1)
        out[attr] = {"n": len(idx), "accuracy": round(float((truth == guess).mean()), 3), "chance": round(1 / len(names), 3),
                     "classes": names, "confusion (rows: truth)": [" ".join(map(str, r)) for r in confusion]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emoji", type=Path, required=True)
    ap.add_argument("--clip", default="clip-xs")
    ap.add_argument("--samples", nargs="*", default=[])
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    rows = labeled_emoji(args.emoji)
    print(json.dumps({"labeled_images": len(rows), "accuracy": accuracy(args.clip, rows)}, indent=1))
    from tessera.eval.fairness import fairness_report, report_markdown

    for folder in args.samples:
        print(report_markdown(fairness_report(folder, args.clip, replicates=args.bootstrap)))


if __name__ == "__main__":
    main()
