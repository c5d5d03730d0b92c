"""Prompt enhancement (seed 004 Figure 22): a deterministic, explainable rewrite that adds detail in
the vocabulary of the training captions (`caption_vocab.json`, built from them by
scripts/build_prompt_vocab.py), since the generators only learned what those words look like.

    subject   a typical colour for a known subject that has none ("an apple" -> "a red apple")
    style     the caption style the prompt's words belong to: emoji names ("... emoji") or the photo
              cut-out captions ("A red apple.") — decided by the words' relative frequency in each
    (setting and lighting words are almost absent from those captions, so none are added)

For a CLIP-conditioned model (Stable Diffusion: `enhance(prompt, clip=ClipBudget(...))`) the emoji /
cut-out vocabulary is wrong; instead, in SD's own prompt idiom, comma-separated modifiers for what the
prompt leaves unsaid (detail, lighting, focus; none for drawings, icons and the like), each added only
while the prompt still fits CLIP's 77 tokens as the model's own tokenizer counts them: the user's words
are never cut, and a modifier that does not fit is listed as left out.

Every change is listed in `Enhanced.changes`; the result is the request's `revised_prompt`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Callable

STYLE_WORDS = {"emoji", "icon", "photo", "photograph", "drawing", "painting", "cartoon", "sketch", "illustration",
               "render", "watercolor", "watercolour"}
COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray",
           "golden", "gold", "silver"}
TYPICAL_COLOUR = {"apple": "red", "banana": "yellow", "lemon": "yellow", "strawberry": "red", "tomato": "red",
                  "cherry": "red", "grass": "green", "leaf": "green", "frog": "green", "sky": "blue", "sea": "blue",
                  "ocean": "blue", "sun": "yellow", "heart": "red", "rose": "red", "carrot": "orange",
                  "pumpkin": "orange", "snow": "white", "cloud": "white", "elephant": "grey", "crow": "black",
                  "pig": "pink", "flamingo": "pink", "fox": "orange", "tiger": "orange", "bear": "brown",
                  "broccoli": "green", "cucumber": "green", "corn": "yellow", "chick": "yellow", "swan": "white"}
STOPWORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "at", "to", "is", "for", "by", "its", "his", "her"}


@dataclasses.dataclass(frozen=True)
class Enhanced:
    prompt: str
    changes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ClipBudget:
    """A CLIP text encoder's prompt budget: `count(prompt)` -> its tokens (start / end included)."""
    count: Callable[[str], int]
    max_tokens: int = 77


# (aspect, modifier, words that already say it) in the order they are added for a CLIP-conditioned model
CLIP_MODIFIERS = (
    ("detail", "highly detailed", {"detailed", "detail", "details", "intricate", "minimalist", "simple"}),
    ("lighting", "soft natural light", {"light", "lighting", "lit", "sunlight", "sunlit", "moonlight", "sunset",
                                        "sunrise", "dusk", "dawn", "night", "neon", "shadow", "shadows", "backlit",
                                        "overcast", "dark", "glowing", "candlelight"}),
    ("focus", "sharp focus", {"focus", "sharp", "blurry", "blur", "bokeh", "motion"}),
)
DRAWN = {"emoji", "icon", "drawing", "cartoon", "sketch", "illustration", "logo", "clipart", "pixel", "vector"}


@functools.lru_cache(maxsize=1)
def caption_vocab() -> dict:
    return json.loads((Path(__file__).with_name("caption_vocab.json")).read_text())


def _style(words: list[str]) -> str | None:
    """'emoji' | 'photo' by which caption set uses the prompt's words more (relative frequency)."""
    v = caption_vocab()
    n_e, n_o = max(1, sum(v["emoji"].values())), max(1, sum(v["other"].values()))
    known = [w for w in words if w in v["emoji"] or w in v["other"]]
    if not known:
        return None
    e = sum(v["emoji"].get(w, 0) / n_e for w in known)
    o = sum(v["other"].get(w, 0) / n_o for w in known)
    return "emoji" if e > o else "photo"


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _colour(text: str, words: list[str], changes: list[str]) -> str:
    """A typical colour for the first known subject, when the prompt names no colour."""
    if COLOURS & set(words):
        return text
    for w in words:
        colour = TYPICAL_COLOUR.get(w) or TYPICAL_COLOUR.get(w.rstrip("s"))
        if colour:
            changes.append(f"subject: added the colour '{colour}' for '{w}'")
            text = re.sub(rf"\b{re.escape(w)}\b", f"{colour} {w}", text, count=1, flags=re.IGNORECASE)
            return re.sub(rf"\b(an?)(\s+{colour} )", lambda m: _article(colour).lower() + m.group(2)
                          if m.group(1).islower() else _article(colour) + m.group(2), text, count=1, flags=re.IGNORECASE)
    return text


def _enhance_clip(text: str, words: list[str], clip: ClipBudget) -> Enhanced:
    changes: list[str] = []
    coloured = _colour(text, words, changes)
    if coloured != text and clip.count(coloured) > clip.max_tokens:
        changes = [f"{changes[0]}: left out (the prompt would pass CLIP's {clip.max_tokens} tokens)"]
    else:
        text = coloured
    drawn = bool(DRAWN & set(words))
    for aspect, modifier, said in CLIP_MODIFIERS:
        if said & set(words) or (drawn and aspect != "detail"):
            continue
        candidate = f"{text.rstrip(' .,')}, {modifier}"
        if clip.count(candidate) > clip.max_tokens:
            changes.append(f"{aspect}: '{modifier}' left out (the prompt would pass CLIP's {clip.max_tokens} tokens)")
            continue
        text = candidate
        changes.append(f"{aspect}: added '{modifier}' (the prompt says nothing of its {aspect})")
    return Enhanced(text, tuple(changes))


def enhance(prompt: str, clip: ClipBudget | None = None) -> Enhanced:
    """The rewrite for the bundled models (their caption vocabulary), or with `clip` for a CLIP-conditioned
    model (SD's prompt idiom, within its token budget)."""
    text = " ".join(prompt.split())
    if not text:
        return Enhanced(text, ())
    words = re.findall(r"[a-z]+", text.lower())
    if clip is not None:
        return _enhance_clip(text, words, clip)
    changes: list[str] = []
    text = _colour(text, words, changes)
    if not STYLE_WORDS & set(words):
        style = _style([w for w in words if w not in STOPWORDS])
        if style == "emoji":
            text = f"{text} emoji"
            changes.append("style: added 'emoji' (its words are mostly emoji-name vocabulary)")
        elif style == "photo":
            body = re.sub(r"^(a|an|the)\s+", "", text.rstrip("."), flags=re.IGNORECASE)
            text = f"{_article(body)} {body}."
            changes.append("style: photo cut-out caption form 'A ... .' (its words are mostly photo-caption vocabulary)")
    return Enhanced(text, tuple(changes))
