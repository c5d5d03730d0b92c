"""Sample sheets for docs/: a dozen prompts x N samples from any generator (AR, masked or diffusion),
one labelled image, the same prompts and seed for every kind so the sheets compare side by side.

    .venv/bin/python scripts/doc_grids.py --model ar-xs -o docs/images/ar-xs-samples.jpg
    .venv/bin/python scripts/doc_grids.py --model runs/masked-xs/export -o docs/images/masked-xs-samples.jpg
    .venv/bin/python scripts/doc_grids.py --model runs/unet-xs/export -o docs/images/unet-xs-samples.jpg
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from PIL import Image, ImageDraw

import tessera
from tessera.pipelines.records import grid
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


def pipeline(model: str, a: argparse.Namespace):
    """(pipeline, params) for the generator's kind, with the sampler settings its docs recommend."""
    gen = tessera.load(model)
    kind = gen.meta["kind"]
    enc = load_text_encoder("minilm")
    if kind == "ar":
        from tessera.pipelines.ar import ARPipeline, ARSampleParams
        return ARPipeline(gen, load_tokenizer(a.tokenizer), enc), ARSampleParams(seed=a.seed, n=a.n, cfg_scale=a.cfg)
    if kind == "masked":
        from tessera.pipelines.masked import MaskedPipeline, MaskedSampleParams
        return (MaskedPipeline(gen, load_tokenizer(a.tokenizer), enc),
                MaskedSampleParams(seed=a.seed, n=a.n, steps=a.steps or 12, cfg_scale=a.cfg))
    if kind in ("unet", "dit"):
        from tessera.pipelines.diffusion import DiffusionPipeline, DiffusionSampleParams
        tok = load_tokenizer(gen.meta["task"].get("tokenizer", a.tokenizer)) if gen.meta["task"]["space"] == "latent" else None
        return (DiffusionPipeline(gen, tok, enc),
                DiffusionSampleParams(seed=a.seed, n=a.n, steps=a.steps or 20, cfg_scale=a.cfg))
    raise ValueError(f"{model}: kind {kind!r} is not a generator")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ar-xs")
    ap.add_argument("--tokenizer", default="vq-f8")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=0, help="masked / diffusion steps (0: 12 / 20)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    pipe, params = pipeline(a.model, a)
    rows = [(p, grid(pipe(p, params), cols=a.n)) for p in PROMPTS]
    sheet(rows).convert("RGB").save(a.out, quality=90)
    print(json.dumps({"out": a.out, "model": a.model, "prompts": PROMPTS, **dataclasses.asdict(params)}))


if __name__ == "__main__":
    main()
