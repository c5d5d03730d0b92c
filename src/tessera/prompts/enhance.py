"""Prompt enhancement (seed 004 Figure 22): a deterministic, explainable rewrite that adds detail in
the vocabulary of the training captions (`caption_vocab.json`, built from them by
scripts/build_prompt_vocab.py), since the generators only learned what those words look like.

    subject   a typical colour for a known subject that has none ("an apple" -> "a red apple")
    style     the caption style the prompt's words belong to: emoji names ("... emoji") or the photo
              cut-out captions ("A red apple.") — decided by the words' relative frequency in each
    (setting and lighting words are almost absent from those captions, so none are added)

Every change is listed in `Enhanced.changes`; the result is the request's `revised_prompt`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

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


def enhance(prompt: str) -> Enhanced:
    text = " ".join(prompt.split())
    if not text:
        return Enhanced(text, ())
    changes = []
    words = re.findall(r"[a-z]+", text.lower())
    if not COLOURS & set(words):
        for w in words:
            colour = TYPICAL_COLOUR.get(w) or TYPICAL_COLOUR.get(w.rstrip("s"))
            if colour:
                text = re.sub(rf"\b{re.escape(w)}\b", f"{colour} {w}", text, count=1, flags=re.IGNORECASE)
                changes.append(f"subject: added the colour '{colour}' for '{w}'")
                break
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
