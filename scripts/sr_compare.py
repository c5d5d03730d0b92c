"""The x4 comparison sheet in docs/superres.md: held-out photo stamps (val split of data/photos256)
downscaled x4 with bicubic, then upscaled by Pillow bicubic, sr-compact-x4 and Real-ESRGAN x4plus.

    .venv/bin/python scripts/sr_compare.py [-o docs/images/sr-x4-compare.jpg]
"""
import argparse

from PIL import Image, ImageDraw

from tessera.data.decode import decode_image, resize_center_crop
from tessera.superres.cascade import load_sr_models, upscale

PATHS = ["/usr/share/tuxpaint/stamps/animals/fish/lobster.png", "/usr/share/tuxpaint/stamps/town/houses/cartoon/igloo.png",
         "/usr/share/tuxpaint/stamps/vehicles/wheel_tractor.png"]
COLS = ["input 64 px", "Pillow bicubic", "sr-compact-x4", "Real-ESRGAN x4plus", "original 256 px"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default="docs/images/sr-x4-compare.jpg")
    out = ap.parse_args().out
    fast, x4 = load_sr_models("fast"), load_sr_models("x4plus")
    sheet = Image.new("RGB", (5 * 256, 20 + 256 * len(PATHS)), "white")
    d = ImageDraw.Draw(sheet)
    for j, c in enumerate(COLS):
        d.text((j * 256 + 8, 4), c, fill="black")
    for i, p in enumerate(PATHS):
        hr = resize_center_crop(decode_image(open(p, "rb").read()), 256)
        lr = hr.resize((64, 64), Image.Resampling.BICUBIC)
        ims = [lr.resize((256, 256), Image.Resampling.NEAREST), lr.resize((256, 256), Image.Resampling.BICUBIC),
               upscale(lr, (256, 256), fast), upscale(lr, (256, 256), x4), hr]
        for j, im in enumerate(ims):
            sheet.paste(im, (j * 256, 20 + i * 256))
    sheet.save(out, quality=90)


if __name__ == "__main__":
    main()
