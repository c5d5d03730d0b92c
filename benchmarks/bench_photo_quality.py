"""Real-photo quality of the tokenizers and SR models (issue 23) on the project's EXTERNAL evaluation set,
which no Tessera model trains on: photographic Plasma wallpapers + scikit-image's colour photos, cut into
tiles by `benchmarks/photo_tiles.py`. Prints markdown tables for benchmarks/RESULTS.md.

    python benchmarks/photo_tiles.py EXT/usr/share/wallpapers EXT/sk/skimage/data --tile 128 --short 128 --per-image 1 -o tiles/w128
    python benchmarks/photo_tiles.py ... --tile 128 --short 256 -o tiles/t128
    python benchmarks/photo_tiles.py ... --tile 256 --short 256 --per-image 1 -o tiles/w256
    python benchmarks/photo_tiles.py ... --tile 256 --short 512 -o tiles/t256
    python benchmarks/bench_photo_quality.py --tokenizer-data tiles/w128 tiles/t128 --sr-data tiles/w256 tiles/t256
"""
from __future__ import annotations

import argparse


def tokenizer_table(folders: list[str], models: list[str]) -> list[str]:
    from tessera.eval.reconstruction import evaluate_tokenizer

    rows = ["| tiles | tokenizer | images | PSNR dB (median) | SSIM | rFD | codebook usage | perplexity |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for folder in folders:
        for m in models:
            r = evaluate_tokenizer(m, folder, rfd=True)
            rows.append(f"| {folder} | {m} | {r['images']} | {r['psnr']:.2f} ({r['psnr_median']:.2f}) | {r['ssim']:.3f} | "
                        f"{r['rfd']:.1f} | {100 * r['codebook_usage']:.1f}% of {r['tokens']} tokens | {r['perplexity']:.0f} |")
    return rows


def sr_table(folders: list[str], models: list[str], scale: int) -> list[str]:
    from tessera.eval.sr import evaluate_sr_models

    rows = [f"| tiles (x{scale}) | method | PSNR dB (min-max) | vs bicubic | SSIM | perceptual distance | s / image |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for folder in folders:
        res = evaluate_sr_models(folder, tuple(models), scale=scale)
        base = res["bicubic"]["psnr"]
        for name, r in res.items():
            rows.append(f"| {folder} | {name} | {r['psnr']:.2f} ({r['psnr_min']:.1f}-{r['psnr_max']:.1f}) | "
                        f"{r['psnr'] - base:+.2f} | {r['ssim']:.3f} | {r['perceptual']:.3f} | {r['seconds']:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-data", nargs="*", default=[])
    ap.add_argument("--tokenizers", nargs="*", default=["vq-f8", "vq-f8-photo"])
    ap.add_argument("--sr-data", nargs="*", default=[])
    ap.add_argument("--sr-models", nargs="*", default=["fidelity", "perceptual", "x4plus", "realesr-animevideov3"])
    ap.add_argument("--scales", nargs="*", type=int, default=[4, 2])
    a = ap.parse_args()
    if a.tokenizer_data:
        print("\n".join(tokenizer_table(a.tokenizer_data, a.tokenizers)) + "\n")
    for scale in a.scales if a.sr_data else []:
        models = a.sr_models if scale == 4 else [m for m in a.sr_models if m in ("fidelity", "perceptual")]
        print("\n".join(sr_table(a.sr_data, models, scale)) + "\n")


if __name__ == "__main__":
    main()
