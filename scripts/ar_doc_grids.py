"""Sample grids for docs/: a dozen prompts x N samples from an AR generator, one labelled sheet.

    .venv/bin/python scripts/ar_doc_grids.py --model ar-xs -o docs/images/ar-xs-samples.jpg
"""
from __future__ import annotations

import argparse
import json

from PIL import Image, ImageDraw

import tessera
from tessera.pipelines.ar import ARPipeline, ARSampleParams, grid
from tessera.text import load_text_encoder
from tessera.tokenizer.tools import load_tokenizer

PROMPTS = ["red apple emoji", "A strawberry.", "cat face emoji", "grinning face emoji", "A palm tree.", "A frog.",
           "rocket emoji", "sunflower emoji", "A red apple.", "A dog.", "A house.", "snowman emoji"]


def sheet(rows: list[tuple[str, Image.Image]], label_w: int = 170) -> Image.Image:
    w, h = rows[0][1].size
    out = Image.new("RGB", (label_w + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, (prompt, g) in enumerate(rows):
        out.paste(g, (label_w, i * h))
        draw.text((6, i * h + h // 2 - 6), prompt, fill="black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ar-xs")
    ap.add_argument("--tokenizer", default="vq-f8")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    gen = tessera.load(a.model)
    pipe = ARPipeline(gen, load_tokenizer(a.tokenizer), load_text_encoder("minilm"))
    params = ARSampleParams(seed=a.seed, n=a.n, cfg_scale=a.cfg, top_k=a.top_k)
    rows = [(p, grid(pipe(p, params), cols=a.n)) for p in PROMPTS]
    sheet(rows).save(a.out)
    print(json.dumps({"out": a.out, "model": a.model, "prompts": PROMPTS, **vars(params)}))


if __name__ == "__main__":
    main()
