"""Cut held-out photo tiles for the real-photo quality checks (issue 23): each source photo is resized
(Pillow, antialiased) so its shorter side is --short, then cut into a centred grid of --tile px tiles.

The sources are the project's external evaluation set, never used in training: the
`plasma-workspace-wallpapers` Debian package (extract it anywhere: `apt-get download
plasma-workspace-wallpapers && dpkg -x plasma-workspace-wallpapers_*.deb ext`) and the colour sample
photos of scikit-image (`pip install --target ext/sk scikit-image`).

    python benchmarks/photo_tiles.py ext/usr/share/wallpapers ext/sk/skimage/data --tile 128 --short 256 -o tiles128
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
# the Plasma wallpapers that are photographs (the others are vector art and gradients)
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "MilkyWay", "OneStandsOut", "Path", "Volna", "summer_1am")


def sources(roots: list[Path], all_themes: bool = False) -> list[Path]:
    """One file per photo: scikit-image's colour photos, the largest landscape image of each photographic
    Plasma wallpaper (all_themes: of every wallpaper)."""
    found = []
    for root in roots:
        for name in SKIMAGE_PHOTOS:
            if (root / name).is_file():
                found.append(root / name)
        for theme in sorted(p for p in root.iterdir() if (p / "contents" / "images").is_dir()
                            and (p.name in PLASMA_PHOTOS or all_themes)):
            imgs = sorted((theme / "contents" / "images").iterdir())
            def area(p):
                w, _, h = p.stem.partition("x")
                return int(w) * int(h) if w.isdigit() and h.isdigit() and int(w) >= int(h) else 0
            best = max(imgs, key=area, default=None)
            if best is not None and area(best):
                found.append(best)
    return found


def tiles(path: Path, tile: int, short: int, per_image: int):
    im = Image.open(path).convert("RGB")
    s = short / min(im.size)
    im = im.resize((max(tile, round(im.width * s)), max(tile, round(im.height * s))), Image.BICUBIC, reducing_gap=None)
    nx, ny = im.width // tile, im.height // tile
    x0, y0 = (im.width - nx * tile) // 2, (im.height - ny * tile) // 2
    boxes = [(x0 + i * tile, y0 + j * tile) for j in range(ny) for i in range(nx)]
    step = max(1, len(boxes) // per_image)
    for x, y in boxes[::step][:per_image]:
        yield (x, y), im.crop((x, y, x + tile, y + tile))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--short", type=int, default=256, help="shorter side after resizing, before tiling")
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--all-themes", action="store_true", help="also the non-photographic Plasma wallpapers")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    n = 0
    found = sources(a.roots, a.all_themes)
    for src in found:
        name = src.parent.parent.parent.name if src.parent.name == "images" else src.stem
        for (x, y), t in tiles(src, a.tile, a.short, a.per_image):
            t.save(a.out / f"{name}_{x}_{y}.png")
            n += 1
    print(f"{n} tiles of {a.tile} px from {len(found)} photos in {a.out}")


if __name__ == "__main__":
    main()
