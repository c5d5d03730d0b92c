"""Captioners for `data prepare` (seed 004: "Handle missing or non-English captions: an image captioning
model ... Enhance captions: below a threshold, replace the caption with an auto-generated one").

    load_captioner("caption-xs")                      offline: retrieval over the bundled clip-xs (below)
    load_captioner("retrieval?bank=DIR|FILE&model=M") the same over your own captions: a prepared folder's
                                                      kept captions or a text file (one per line), scored
                                                      with image-text model M (clip-xs, or a CLIP folder)
    load_captioner("/path/to/blip")                   a Hugging Face BLIP / BLIP-2 / GIT folder (local
                                                      files only), generated through `transformers`

caption-xs is NOT a generative model: it returns the bank caption whose clip-xs text embedding is closest to
the image's (nearest-neighbour captioning). Its bank is the 3,780 emoji names of emoji-datasource 16.0.0
(MIT; Unicode character names: data/emoji_captions.txt), the emoji half of the demo set clip-xs was
trained on. It can name an emoji-like image (held-out top-1 retrieval of clip-xs: 31%); it cannot describe
anything else, and gives any photograph the nearest emoji name. For photographs, pass a BLIP folder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from tessera.config import Config
from tessera.data.dataset import to_tensor
from tessera.data.language import LANGUAGES, check_languages
from tessera.errors import InvalidInputError


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


EMOJI_BANK = Path(__file__).with_name("emoji_captions.txt")
EMOJI_FEATURES = Path(__file__).with_name("emoji_captions.safetensors")
HF_CAPTIONERS = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
                 "git": "GitForCausalLM"}


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


class RetrievalCaptioner:
    """The bank caption with the highest cosine to the image in an image-text model's space; its score is
    the CLIPScore of that caption (100 * cos)."""

    def __init__(self, bank: str | Path = EMOJI_BANK, model: str = "clip-xs", batch_size: int = 256):
        from tessera.eval.clipscore import load_image_text_model

        self.scorer = load_image_text_model(model)
        self.bank = read_bank(bank)
        self.name = f"retrieval:{model}:{Path(bank).name}"
        key = bank_key(self.bank, model)
        self.text = bundled_bank_features(key) if Path(bank) == EMOJI_BANK else None
        if self.text is None:
            self.text = bank_features(self.scorer, self.bank, batch_size)  # (K, D) unit rows


    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[tuple[str, float | None]]:
        x = torch.stack([to_tensor(im.convert("RGB")) for im in images])
        cos = self.scorer.image_features(x) @ self.text.T  # (B, K)
        best = cos.max(1)
        return [(self.bank[int(i)], round(100 * float(c), 3)) for c, i in zip(best.values, best.indices)]


@torch.no_grad()
def bank_features(scorer, bank: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([scorer.text_features(bank[s:s + batch_size]) for s in range(0, len(bank), batch_size)])


def bank_key(bank: list[str], model: str) -> str:
    """What the bank's text features depend on: its captions and the model's weights (bundled presets)."""
    from tessera.registry import bundled_dir

    h = hashlib.sha256("\n".join(bank).encode())
    weights = bundled_dir(model) / "model.safetensors"
    h.update(weights.read_bytes() if weights.is_file() else model.encode())
    return h.hexdigest()


def bundled_bank_features(key: str) -> torch.Tensor | None:
    """The emoji bank's clip-xs text features, precomputed (`write_bundled_bank_features`; computing them
    takes ~10-40 s on a laptop CPU); None when they were made from other captions or other clip-xs weights."""
    from safetensors import safe_open

    if not EMOJI_FEATURES.is_file():
        return None
    with safe_open(str(EMOJI_FEATURES), "pt") as f:
        if f.metadata().get("key") != key:
            return None
        return f.get_tensor("text").float()


def write_bundled_bank_features() -> Path:
    """Regenerate data/emoji_captions.safetensors (after retraining clip-xs or changing the bank)."""
    from safetensors.torch import save_file

    from tessera.eval.clipscore import load_image_text_model

    bank = read_bank(EMOJI_BANK)
    text = bank_features(load_image_text_model("clip-xs"), bank)
    save_file({"text": text.half().contiguous()}, str(EMOJI_FEATURES), metadata={"key": bank_key(bank, "clip-xs")})
    return EMOJI_FEATURES


class HFCaptioner:
    """A Hugging Face image-to-text folder (BLIP, BLIP-2, GIT) with its processor; beam search."""

    def __init__(self, path: str | Path, max_new_tokens: int = 30, num_beams: int = 3):
        import transformers

        config = json.loads((Path(path) / "config.json").read_text())
        kind = config.get("model_type")
        if kind not in HF_CAPTIONERS:
            raise InvalidInputError(f"captioner {path}: model_type {kind!r} is not a captioner Tessera runs "
                                    f"(known: {sorted(HF_CAPTIONERS)})")
        self.model = getattr(transformers, HF_CAPTIONERS[kind]).from_pretrained(path, local_files_only=True).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        self.name, self.max_new_tokens, self.num_beams = f"{kind}:{Path(path).name}", max_new_tokens, num_beams

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[tuple[str, float | None]]:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        return [(text.strip(), None) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def check_captioner_spec(spec: str) -> None:
    """Names only (the models load in the workers): 'none', 'caption-xs', 'retrieval?...', or a folder."""
    name, _, query = spec.partition("?")
    if name in ("none", "caption-xs") and not query:
        return
    if name == "retrieval":
        keys = {part.partition("=")[0] for part in filter(None, query.split("&"))}
        if not keys <= {"bank", "model"}:
            raise ValueError(f"captioner {spec!r}: retrieval takes bank= and model= (got {sorted(keys)})")
        return
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"captioner {spec!r}: give none, caption-xs, 'retrieval?bank=PATH&model=clip-xs' or a "
                         f"Hugging Face captioner folder ({', '.join(sorted(HF_CAPTIONERS))}) with a config.json")


def load_captioner(spec: str) -> Captioner | None:
    check_captioner_spec(spec)
    name, _, query = spec.partition("?")
    if name == "none":
        return None
    if name == "caption-xs":
        return RetrievalCaptioner()
    if name == "retrieval":
        kw = dict(part.partition("=")[::2] for part in filter(None, query.split("&")))
        return RetrievalCaptioner(kw.get("bank", EMOJI_BANK), kw.get("model", "clip-xs"))
    return HFCaptioner(spec)
