"""Write metadata.jsonl captions for the npm package emoji-datasource-google (MIT; images Apache-2.0).

    python scripts/emoji_metadata.py PACKAGE_DIR     # PACKAGE_DIR/emoji.json + img/google/64/*.png
    python scripts/emoji_metadata.py PACKAGE_DIR --bank OUT.txt   # every caption, one per line (emoji.json only)

Each emoji with a Google image gets its Unicode name as the caption ("red apple emoji"); skin-tone
variants get the tone appended ("thumbs up sign, medium skin tone, emoji").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}


def entries(emoji: list[dict]):
    """(image file, caption) of every emoji and skin-tone variant that has a Google image."""
    for e in emoji:
        name = (e.get("name") or e["short_name"].replace("_", " ")).lower()
        if e.get("has_img_google"):
            yield e["image"], f"{name} emoji"
        for key, var in (e.get("skin_variations") or {}).items():
            tones = ", ".join(TONES[t] for t in key.split("-") if t in TONES)
            if var.get("has_img_google"):
                yield var["image"], f"{name}, {tones}, emoji"


def rows(emoji: list[dict], img_dir: Path):
    for image, caption in entries(emoji):
        if (img_dir / image).is_file():
            yield {"file_name": image, "caption": caption}


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--bank":  # the caption-xs captioner's bank: every caption, no images needed
        emoji = json.loads((Path(argv[0]) / "emoji.json").read_text())
        bank = sorted({caption for _, caption in entries(emoji)})
        Path(argv[2]).write_text("\n".join(bank) + "\n")
        print(f"{argv[2]}: {len(bank)} captions")
        return
    if len(argv) != 1:
        sys.exit(__doc__)
    pkg = Path(argv[0])
    img_dir = pkg / "img" / "google" / "64"
    emoji = json.loads((pkg / "emoji.json").read_text())
    out = img_dir / "metadata.jsonl"
    lines = [json.dumps(r) for r in rows(emoji, img_dir)]
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: {len(lines)} captions")


if __name__ == "__main__":
    main(sys.argv[1:])
