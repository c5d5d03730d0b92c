"""The no-reference technical score (data/quality.py) on photographs degraded by known amounts: does each
defect lower its component and the score, and what a threshold rejects.

    .venv/bin/python benchmarks/bench_technical.py [--photos DIR_OR_FILE ...] [--side 768] [--threshold 4]

Default photos: the top level of /usr/share/backgrounds (Ubuntu / UKUI / Lomiri wallpapers; the mappings
were set on the mate/ and gnome/ sub-folders, which are left out) and scikit-learn's two sample photos (the
project's external evaluation set: measured here, never tuned on). Per degradation: the mean score, the
fraction of images whose score fell below their clean version's (ranking accuracy), and the fraction a
`technical?min_score=T` scorer would reject."""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def default_photos() -> list[Path]:
    import sklearn.datasets

    top = sorted(p for p in Path("/usr/share/backgrounds").glob("*") if p.suffix in (".jpg", ".png"))
    return top + sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def noise(im: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


DEGRADATIONS = {
    "blur sigma 1.5": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "blur sigma 4": lambda im: im.filter(ImageFilter.GaussianBlur(4)),
    "noise sigma 10": lambda im: noise(im, 10),
    "noise sigma 25": lambda im: noise(im, 25),
    "JPEG q20": lambda im: jpeg(im, 20),
    "JPEG q5": lambda im: jpeg(im, 5),
    "brightness x0.3": lambda im: ImageEnhance.Brightness(im).enhance(0.3),
    "brightness x2.5": lambda im: ImageEnhance.Brightness(im).enhance(2.5),
}


def main() -> None:
    from tessera.data.quality import technical_score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", nargs="*", type=Path)
    ap.add_argument("--side", type=int, default=768)
    ap.add_argument("--threshold", type=float, default=4.0)
    args = ap.parse_args()
    files = args.photos or default_photos()
    clean, rows = [], {}
    for f in files:
        im = Image.open(f).convert("RGB")
        im.thumbnail((args.side, args.side))
        clean.append(technical_score(im)["score"])
        for name, degrade in DEGRADATIONS.items():
            rows.setdefault(name, []).append(technical_score(degrade(im))["score"])
    clean = np.array(clean)
    out = {"photos": len(files), "clean": {"mean": round(float(clean.mean()), 2),
                                           "rejected": round(float((clean < args.threshold).mean()), 3)}}
    for name, scores in rows.items():
        s = np.array(scores)
        out[name] = {"mean": round(float(s.mean()), 2), "below_clean": round(float((s < clean).mean()), 3),
                     "rejected": round(float((s < args.threshold).mean()), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
