"""The one PNG record of everything Tessera writes (generated images, upscaled images): an A1111-style
`parameters` text chunk + a `tessera` JSON chunk of every setting. No dependencies beyond Pillow, so any
package may write one."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin


def png_info(prompt: str, params: dict) -> PngImagePlugin.PngInfo:
    """A1111-style `parameters` text chunk + a JSON chunk with every parameter."""
    info = PngImagePlugin.PngInfo()
    kv = ", ".join(f"{k}: {v}" for k, v in params.items())
    info.add_text("parameters", f"{prompt}\n{kv}")
    info.add_text("tessera", json.dumps({"prompt": prompt, **params}, default=str))
    return info


def read_record(path: str | Path) -> dict:
    """The JSON record a Tessera PNG carries ({} when it has none)."""
    with Image.open(path) as im:
        text = im.text.get("tessera") if hasattr(im, "text") else None
    return json.loads(text) if text else {}
