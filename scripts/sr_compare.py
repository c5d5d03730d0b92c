"""The x4 comparison sheet in docs/superres.md: held-out photos (256 px tiles of the external evaluation set,
`benchmarks/photo_tiles.py`; by default the three below) downscaled x4 with bicubic, then upscaled by Pillow
bicubic, Tessera's fidelity and perceptual cascades, Real-ESRGAN x4plus and realesr-animevideov3.

    .venv/bin/python scripts/sr_compare.py TILES/chelsea_*.png TILES/coffee_*.png ... [-o docs/images/sr-x4-compare.jpg]
"""
import argparse

from PIL import Image, ImageDraw

from tessera.superres.cascade import load_sr_models, upscale

METHODS = ["fidelity", "perceptual", "x4plus", "realesr-animevideov3"]
COLS = ["input 64 px", "Pillow bicubic", *METHODS, "original 256 px"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+", help="256 px held-out photo tiles")
    ap.add_argument("-o", "--out", default="docs/images/sr-x4-compare.jpg")
    a = ap.parse_args()
    models = {m: load_sr_models(m) for m in METHODS}
    sheet = Image.new("RGB", (len(COLS) * 256, 20 + 256 * len(a.images)), "white")
    d = ImageDraw.Draw(sheet)
    for j, c in enumerate(COLS):
        d.text((j * 256 + 8, 4), c, fill="black")
    for i, p in enumerate(a.images):
        hr = Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)
        lr = hr.resize((64, 64), Image.Resampling.BICUBIC)
        ims = [lr.resize((256, 256), Image.Resampling.NEAREST), lr.resize((256, 256), Image.Resampling.BICUBIC),
               *(upscale(lr, (256, 256), models[m]) for m in METHODS), hr]
        for j, im in enumerate(ims):
            sheet.paste(im, (j * 256, 20 + i * 256))
    sheet.save(a.out, quality=90)


if __name__ == "__main__":
    main()
