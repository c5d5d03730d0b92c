"""Caption checks of `data prepare` (seed 004: "Handle missing or non-English captions: an image captioning
model ... Enhance captions: below a threshold, replace the caption with an auto-generated one"): their
config, and captioners by name. The captioners themselves (they run image-text models, which live above
data/) are plug-ins registered as `tessera.captioners` entry points (eval/captioners.py):

    caption-xs                          offline: nearest-neighbour captioning over the bundled clip-xs
    retrieval?bank=DIR|FILE&model=M     the same over your captions (a prepared folder's, or one per line)
    hf?path=DIR  (or just DIR)          a Hugging Face BLIP / BLIP-2 / GIT folder, through `transformers`
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from PIL import Image

from tessera.config import Config
from tessera.data.filters import check_arguments, parse_spec, plugin_factory
from tessera.data.language import LANGUAGES, check_languages
from tessera.errors import InvalidInputError

CAPTIONER_GROUP = "tessera.captioners"
EMOJI_BANK = Path(__file__).with_name("emoji_captions.txt")          # caption-xs's bank (package data)
EMOJI_FEATURES = Path(__file__).with_name("emoji_captions.safetensors")  # its clip-xs text features


@dataclasses.dataclass
class CaptionConfig(Config):
    """`data prepare`'s caption checks: language of every caption, and which captions a captioner replaces."""
    captioner: str = "none"             # none | caption-xs | retrieval?bank=..&model=.. | a HF captioner folder
    language: bool = True               # detect and record each caption's language
    languages: tuple[str, ...] = LANGUAGES
    language_margin: float = 3.0        # non-English when another language beats English by this factor
    recaption_non_english: bool = True  # with a captioner: replace non-English captions (else keep, recorded)
    recaption_below: float | None = None  # with a captioner and the caption_match scorer: replace below this

    def __post_init__(self):
        check_captioner_spec(self.captioner)
        if self.language:
            check_languages(self.languages)
        if self.language_margin < 1:
            raise ValueError(f"language_margin must be >= 1, got {self.language_margin}")


class Captioner(Protocol):
    name: str

    def caption(self, images: list[Image.Image]) -> list[tuple[str, float | None]]:
        """-> (caption, the captioner's own score of it or None) per image."""


def read_bank(bank: str | Path) -> list[str]:
    """Distinct non-empty captions of a prepared folder (its kept images) or a text file."""
    path = Path(bank)
    if path.is_dir():
        from tessera.data.catalog import Catalog

        with Catalog.read(path) as cat:
            captions = [c for _, _, c in cat.kept()]
    elif path.is_file():
        captions = path.read_text(encoding="utf-8").splitlines()
    else:
        raise InvalidInputError(f"caption bank {bank}: no such folder or file")
    captions = sorted({c.strip() for c in captions if c and c.strip()})
    if not captions:
        raise InvalidInputError(f"caption bank {bank}: no captions in it")
    return captions


def _named(spec: str) -> str:
    """A bare folder is the `hf` captioner's path."""
    return f"hf?path={spec}" if "?" not in spec and (Path(spec) / "config.json").is_file() else spec


def check_captioner_spec(spec: str) -> tuple[str, dict[str, str]] | None:
    """Names only (the models load in the workers): 'none', a registered captioner with key=value arguments,
    or a captioner folder."""
    if spec == "none":
        return None
    if "?" not in spec and ("/" in spec or Path(spec).exists()) and not (Path(spec) / "config.json").is_file():
        raise ValueError(f"captioner {spec!r}: not a Hugging Face captioner folder (no config.json); give none, "
                         f"caption-xs, 'retrieval?bank=PATH&model=clip-xs' or a BLIP / BLIP-2 / GIT folder")
    name, kwargs = parse_spec(_named(spec), CAPTIONER_GROUP, "captioner", "caption-xs")
    check_arguments(plugin_factory(CAPTIONER_GROUP, name), kwargs, spec, "captioner")
    return name, kwargs


def load_captioner(spec: str) -> Captioner | None:
    parsed = check_captioner_spec(spec)
    if parsed is None:
        return None
    name, kwargs = parsed
    return plugin_factory(CAPTIONER_GROUP, name)(**kwargs)
