"""Fairness diversification (seed 004: images should not be biased by age, race or gender). For a prompt
that depicts people without saying their skin tone, gender or age, the n images of a request get
attributes drawn in turn from balanced lists (in the training captions' vocabulary: emoji names carry
"light / medium-light / medium / medium-dark / dark skin tone", "man / woman / person", "baby / boy /
girl / older ..."), starting at a seed-dependent offset, so that over many requests each value appears
equally often. Prompts that already name an attribute keep it."""
from __future__ import annotations

import re

SKIN_TONES = ("light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone", "dark skin tone")
GENDERS = ("man", "woman", "person")
NEUTRAL_PEOPLE = {"person", "people", "doctor", "teacher", "worker", "scientist", "farmer", "cook", "chef",
                  "student", "nurse", "pilot", "firefighter", "police", "officer", "artist", "singer", "judge",
                  "astronaut", "runner", "surfer", "swimmer"}
PEOPLE = NEUTRAL_PEOPLE | {"man", "woman", "men", "women", "boy", "girl", "baby", "child", "children", "kid",
                           "kids", "adult", "elder", "grandmother", "grandfather", "king", "queen", "family"}
GENDERED = {"man", "woman", "men", "women", "boy", "girl", "king", "queen", "grandmother", "grandfather", "he",
            "she", "male", "female", "mother", "father"}
SKIN = {"skin", "tone", "black", "white", "asian", "african", "european", "latino", "latina", "indian"}


def depicts_people(prompt: str) -> bool:
    return bool(PEOPLE & set(re.findall(r"[a-z]+", prompt.lower())))


def diversify(prompt: str, n: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """-> n (prompt, changes) pairs; unchanged when the prompt depicts no people."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    if not PEOPLE & words:
        return [(prompt, ())] * n
    out = []
    for i in range(n):
        text, changes = prompt, []
        if not GENDERED & words and NEUTRAL_PEOPLE & words:
            g = GENDERS[(seed + i) % len(GENDERS)]
            if g != "person":
                noun = sorted(NEUTRAL_PEOPLE & words)[0]
                text = re.sub(rf"\b{noun}\b", f"{g} {noun}" if noun != "person" else g, text, count=1,
                              flags=re.IGNORECASE)
                changes.append(f"gender: {g}")
        if not SKIN & words:
            tone = SKIN_TONES[(seed // len(GENDERS) + i) % len(SKIN_TONES)]
            text = f"{text}, {tone}"
            changes.append(f"skin tone: {tone}")
        out.append((text, tuple(changes)))
    return out
